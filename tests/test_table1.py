"""launch/table1.py end to end on a tiny embedded benchmark (slow)."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _table1():
  spec = importlib.util.spec_from_file_location(
      "table1", os.path.join(ROOT, "launch", "table1.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_bad_task_is_a_usage_error(capsys):
  with pytest.raises(SystemExit) as e:
    _table1().main(["--task", "flair"])
  assert e.value.code == 2
  assert "--task flair" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    _table1().main(["--task", "kernel", "--n-test", "0"])
  assert e.value.code == 2 and "--n-test 0" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [
    ("--spacing", "-1"), ("--spacing", "0"), ("--spacing", "nan"),
    ("--spacing", "inf"), ("--max-side", "0"), ("--seed", "-1")])
def test_bad_numbers_are_usage_errors(flag, value, capsys):
  with pytest.raises(SystemExit) as e:
    _table1().main([flag, value])
  assert e.value.code == 2 and f"{flag} {value}" in capsys.readouterr().err


def test_unusable_folders_are_one_line_before_any_work(tmp_path, capsys):
  a_file = tmp_path / "f"
  a_file.write_text("")
  for argv, named in (
      (["--out", str(a_file)], "--out"),
      (["--out", str(tmp_path / "o"), "--results", str(a_file / "r")],
       "--results")):
    assert _table1().main(argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"table1: error: {named} ") and err.count("\n") == 1
  # The --out folder the refused run made is gone again.
  assert sorted(os.listdir(tmp_path)) == ["f"]


def test_a_run_refused_after_making_its_folders_removes_them(tmp_path):
  # A --data folder with a source but no target: refused after --out and
  # --results were made (empty): both are removed again.
  import nibabel as nib
  import numpy as np
  d = tmp_path / "d"
  (d / "test" / "source").mkdir(parents=True)
  (d / "test" / "target").mkdir()
  nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)),
           str(d / "test" / "source" / "a.nii.gz"))
  assert _table1().main(["--data", str(d), "--out", str(tmp_path / "o"),
                         "--results", str(tmp_path / "r"),
                         "--no-progress"]) == 2
  assert sorted(os.listdir(tmp_path)) == ["d"]
  # Nested and new (parents too; --results inside --out): all removed.
  assert _table1().main(["--data", str(d), "--out",
                         str(tmp_path / "x" / "o"), "--results",
                         str(tmp_path / "x" / "o" / "r"),
                         "--no-progress"]) == 2
  assert sorted(os.listdir(tmp_path)) == ["d"]


@pytest.mark.slow
def test_table1_writes_every_method(tmp_path):
  results = tmp_path / "results"
  rc = _table1().main([
      "--task", "kernel", "--steps", "2", "--out", str(tmp_path / "run"),
      "--results", str(results), "--spacing", "4.0", "--n-train", "1",
      "--n-test", "1", "--no-progress", "--config", "demo:smoke",
      "--config.infer.batch_size=4"])
  assert rc == 0
  out = json.loads((results / "table1-kernel.json").read_text())
  assert set(out["methods"]) == {"megan", "patch_gan", "small_gan_upsampled",
                                 "nlm", "input"}
  for name, r in out["methods"].items():
    for key in ("ssim", "psnr", "mae", "mse", "seam", "seconds"):
      assert key in r, (name, key)
    assert -1.0 <= r["ssim"] <= 1.0 and 0.0 <= r["mae"] <= 1.0
    assert len(r["per_subject"]) == 1
  assert out["meta"]["widths"]["ngf"] == 4  # demo:smoke's
  assert out["meta"]["training"]["hr_residual"] is True  # the demo's
  assert out["meta"]["training"]["edge_gain"] == 1.0
  run = tmp_path / "run"
  config = json.loads((run / "megan" / "config.json").read_text())
  assert config["infer"]["batch_size"] == 4  # the --config.X=Y override
  # The patch GAN trains only the finest scale, from edges alone.
  pg = json.loads((run / "patch_gan" / "config.json").read_text())
  assert pg["hr_condition"] == "none"
  assert pg["model"]["hr_residual"] is False  # nothing to add its output to
  n = config["num_hr_scales"]
  from megan_jax import train
  assert list(train.restore(str(run / "patch_gan"))[1]) == [f"hr{n}"]
  assert sorted(train.restore(str(run / "megan"))[1]) == sorted(
      ["lr"] + [f"hr{k}" for k in range(1, n + 1)])
  assert out["meta"]["n_train"] == 1 and out["meta"]["n_test"] == 1
  # The input is the sharp volume of the same anatomy: far closer to its
  # target than an untrained GAN, and its grid shows no seams.
  assert out["methods"]["input"]["ssim"] > out["methods"]["megan"]["ssim"]
  assert out["methods"]["input"]["seam"] == pytest.approx(1.0, abs=0.3)
  md = (results / "table1-kernel.md").read_text()
  assert "| MEGAN |" in md and "Paper" in md
  assert (results / "table1-kernel.png").stat().st_size > 1000
  preds = os.listdir(tmp_path / "run" / "pred")
  assert any(p.endswith("_megan.nii.gz") for p in preds)



def test_test_pairs_and_the_config_are_checked_before_any_work(tmp_path,
                                                               capsys):
  # Pairs were matched by sorted order and their grids compared only after
  # both GANs had trained; a bad --config came after minutes of building
  # the benchmark data; an override of a field table1 sets was undone.
  import nibabel as nib
  import numpy as np
  d = tmp_path / "d"
  for kind in ("source", "target"):
    (d / "test" / kind).mkdir(parents=True)
  (d / "train" / "target").mkdir(parents=True)

  def vol(path, shape=(8, 8, 8)):
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random(shape)
                             .astype(np.float32), np.eye(4)), str(path))
  vol(d / "test" / "source" / "a.nii.gz")
  vol(d / "test" / "target" / "b.nii.gz")
  common = ["--data", str(d), "--out", str(tmp_path / "o"), "--results",
            str(tmp_path / "r"), "--no-progress", "--config", "demo:smoke"]
  assert _table1().main(common) == 2
  err = capsys.readouterr().err
  assert "must pair by name" in err and err.count("\n") == 1
  os.remove(d / "test" / "target" / "b.nii.gz")
  vol(d / "test" / "target" / "a.nii.gz", (8, 8, 6))
  assert _table1().main(common) == 2
  err = capsys.readouterr().err
  assert "target " in err and "a.nii.gz" in err and err.count("\n") == 1
  assert not (tmp_path / "o").exists()  # nothing trained, folders removed
  for override, flag in (("--config.steps=3", "--steps"),
                         ("--config.seed=7", "--seed")):
    assert _table1().main(common + [override]) == 2
    err = capsys.readouterr().err
    assert f"table1 sets config.{override[9:13]}" in err and flag in err
  # The built-in data: a bad config is refused before any is generated.
  out = tmp_path / "builtin"
  for bad in (["--config", "nosuch"], ["--config.model.ngf=-3"],
              ["--config.data.spacing=2.0"]):
    assert _table1().main(["--out", str(out), "--results",
                           str(tmp_path / "r"), "--no-progress"] + bad) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not out.exists()


def test_the_shell_wrappers_have_help_and_a_usage_line():
  # --help was "argument --steps: expected one argument" (or, for the
  # slurm script, an error); extra args without STEPS were taken as STEPS.
  import subprocess
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def run(*argv):
    return subprocess.run(["bash", *argv], cwd=root, capture_output=True,
                          text=True, timeout=60)
  for script in ("launch/table1_brats.sh", "launch/table1_copd.sh"):
    r = run(script, "--help")
    assert r.returncode == 0 and "Usage:" in r.stdout
    for argv in ((), ("-x",)):
      r = run(script, *argv)
      assert r.returncode == 2 and r.stderr.startswith("usage: ")
    # DATA_DIR then table1 options, no STEPS: they reach table1.py (which
    # refuses the missing folder in one line, before any work).
    r = run(script, "/nonexistent-data", "--no-nlm")
    assert r.returncode == 2 and "/nonexistent-data" in r.stderr
    assert "--steps" not in r.stderr
  r = run("launch/translate_slurm.sh", "--help")
  assert r.returncode == 0 and r.stdout.startswith("usage: sbatch")
