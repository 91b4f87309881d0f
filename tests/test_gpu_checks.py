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


def _timeout_shim(tmp_path, body: str) -> str:
  """A PATH whose ``timeout`` runs the sh ``body`` instead (the steps'
  commands are not run), python's folder next."""
  shim = tmp_path / "bin"
  shim.mkdir()
  (shim / "timeout").write_text(f"#!/bin/sh\n{body}\n")
  (shim / "timeout").chmod(0o755)
  return os.pathsep.join([str(shim), os.path.dirname(sys.executable),
                          os.environ["PATH"]])


def test_out_is_never_the_committed_results_folder(tmp_path):
  # Tiny sizes merged into the committed results would replace their rows;
  # a real run there merged into (or was refused by) the H200's plain-named
  # files on any other card. The default is runs/gpu-checks.
  for env in ({"GPU_CHECKS_QUICK": "1", "OUT": "benchmarks/results"},
              {"OUT": "./benchmarks/results/"}):
    r = _run(env, tmp_path)
    assert r.returncode == 2
    assert "must be another folder" in r.stderr and r.stderr.count("\n") == 1


def test_steps_past_the_budget_are_skipped_and_logged(tmp_path):
  out = tmp_path / "out"
  r = _run({"GPU_CHECKS_QUICK": "1", "OUT": str(out),
            "GPU_CHECKS_BUDGET_S": "5"}, tmp_path)
  assert r.returncode == 0, r.stderr
  log = (out / "gpu-checks.log").read_text()
  skipped = [line for line in log.splitlines() if ": skipped," in line]
  assert len(skipped) == 4, log  # the default steps, 1-4
  assert "== memory peak: MEGAN: not picked" in log
  assert "s left of the 5 s budget" in skipped[-1]
  assert not list(out.glob("*.json"))  # no step ran


def test_steps_not_picked_are_logged_and_not_run(tmp_path):
  # GPU_CHECKS_STEPS="2 3": a second, memory-only call.
  out = tmp_path / "out"
  r = _run({"GPU_CHECKS_QUICK": "1", "OUT": str(out),
            "GPU_CHECKS_BUDGET_S": "5", "GPU_CHECKS_STEPS": "2 3"}, tmp_path)
  assert r.returncode == 0, r.stderr
  log = (out / "gpu-checks.log").read_text().splitlines()
  picked = [line.split(": skipped,")[0] for line in log
            if ": skipped," in line]
  not_picked = [line for line in log if "not picked" in line]
  assert picked == ["== memory compiled", "== memory peak: baselines"]
  assert len(not_picked) == 3 and all(
      "(GPU_CHECKS_STEPS=2 3)" in line for line in not_picked)


def test_same_card_picks_the_results_of_this_kind_of_device(tmp_path):
  """gpu_checks.sh adds to the committed results of the card it runs on:
  per name, the plain file or a suffixed one, by meta.device_kind."""
  import json
  from benchmarks import same_card

  def write(name, kind):
    (tmp_path / name).write_text(json.dumps({"meta": {"device_kind": kind},
                                             "results": {}}))
  write("memory-gpu.json", "NVIDIA H200")
  write("memory-gpu-h100.json", "NVIDIA H100 80GB HBM3")
  write("throughput-gpu.json", "NVIDIA H200")
  (tmp_path / "throughput-gpu-broken.json").write_text("{")
  d = str(tmp_path)
  assert same_card.pick(d, ["memory-gpu", "throughput-gpu"],
                        "NVIDIA H100 80GB HBM3") == {
      "memory-gpu": os.path.join(d, "memory-gpu-h100.json")}
  assert same_card.pick(d, ["memory-gpu", "throughput-gpu"],
                        "NVIDIA H200") == {
      "memory-gpu": os.path.join(d, "memory-gpu.json"),
      "throughput-gpu": os.path.join(d, "throughput-gpu.json")}
  write("throughput-gpu-cpu.json", "cpu")  # the command, on this machine
  r = subprocess.run([sys.executable, "-m", "benchmarks.same_card", d,
                      "memory-gpu", "throughput-gpu"], cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  assert r.stdout.split() == ["throughput-gpu",
                              os.path.join(d, "throughput-gpu-cpu.json")]


def test_each_step_gets_its_limit_and_the_last_picked_the_rest(tmp_path):
  # A `timeout` that only says what it was asked: the steps' limits, not
  # their runs.
  path = _timeout_shim(tmp_path, 'echo "ran with limit $1"')

  def limits(steps):
    out = tmp_path / f"out{steps.replace(' ', '')}"
    env = {"GPU_CHECKS_QUICK": "1", "OUT": str(out), "PATH": path,
           "GPU_CHECKS_BUDGET_S": "1000"}
    if steps:
      env["GPU_CHECKS_STEPS"] = steps
    r = _run(env, tmp_path)
    assert r.returncode == 0, r.stderr
    log = (out / "gpu-checks.log").read_text().splitlines()
    return {line.split(" (")[0][3:]: int(line.split(" (")[1].split(" s)")[0])
            for line in log if line.startswith("== ") and " s): " in line}

  got = limits("")  # the defaults: 1-4, the last taking the rest
  assert [got[k] for k in ("throughput: cascade", "memory compiled",
                           "memory peak: baselines")] == [240, 100, 135]
  assert got["op profile"] > 1000 - 240 - 100 - 135 - 60
  assert "memory peak: MEGAN" not in got
  got = limits("2 3")
  assert got["memory compiled"] == 100
  assert got["memory peak: baselines"] > 1000 - 100 - 60
  assert set(got) == {"memory compiled", "memory peak: baselines"}


def test_help_bad_settings_and_a_failed_step_say_so(tmp_path):
  # It took no --help (an argument started the whole GPU suite), bad
  # settings were bash errors or ran nothing with exit 0, a quick run could
  # write into benchmarks/results, and it exited 0 when every step failed.
  r = subprocess.run(["bash", SCRIPT, "--help"], cwd=ROOT,
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 0 and "GPU_CHECKS_STEPS" in r.stdout
  r = subprocess.run(["bash", SCRIPT, "now"], cwd=ROOT, capture_output=True,
                     text=True, timeout=60)
  assert r.returncode == 2 and "takes no arguments" in r.stderr
  a_file = tmp_path / "f"
  a_file.write_text("")
  for env, said in (({"GPU_CHECKS_BUDGET_S": "10m"}, "GPU_CHECKS_BUDGET_S"),
                    ({"GPU_CHECKS_CASE_S": "abc"}, "GPU_CHECKS_CASE_S"),
                    ({"GPU_CHECKS_STEPS": "6"}, "steps are 1-5"),

                    ({"OUT": str(a_file)}, "not a folder")):
    r = _run({"OUT": str(tmp_path / "o"), **env}, tmp_path)
    assert r.returncode == 2 and said in r.stderr, (env, r.stderr)
    assert r.stderr.count("\n") == 1
  # A step that fails (not cut by its limit): named, exit status 1.
  path = _timeout_shim(tmp_path, "exit 3")
  r = _run({"GPU_CHECKS_QUICK": "1", "OUT": str(tmp_path / "q"),
            "PATH": path, "GPU_CHECKS_STEPS": "2"}, tmp_path)
  assert r.returncode == 1 and "== failed: memory compiled (rc 3)" in r.stderr
