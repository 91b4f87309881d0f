"""launch/gpu_checks.sh's guards and time budget (its GPU steps are run by
hand on a lent GPU; `GPU_CHECKS_QUICK=1` dry-runs them on a CPU)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "gpu_checks.sh")


def _run(env, tmp_path):
  path = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]
  return subprocess.run(["bash", SCRIPT], cwd=ROOT, capture_output=True,
                        text=True, timeout=300,
                        env={**os.environ, "PATH": path, **env})


def test_quick_mode_needs_its_own_out(tmp_path):
  # Tiny sizes merged into the committed results would replace their rows.
  r = _run({"GPU_CHECKS_QUICK": "1", "OUT": ""}, tmp_path)
  assert r.returncode == 2
  assert "needs OUT=" in r.stderr


def test_steps_past_the_budget_are_skipped_and_logged(tmp_path):
  out = tmp_path / "out"
  r = _run({"GPU_CHECKS_QUICK": "1", "OUT": str(out),
            "GPU_CHECKS_BUDGET_S": "5"}, tmp_path)
  assert r.returncode == 0, r.stderr
  log = (out / "gpu-checks.log").read_text()
  skipped = [line for line in log.splitlines() if ": skipped," in line]
  assert len(skipped) == 5, log
  assert "s left of the 5 s budget" in skipped[-1]
  assert not list(out.glob("*.json"))  # no step ran
