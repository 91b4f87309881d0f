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


@pytest.mark.slow
def test_table1_on_a_folder_stored_otherwise_than_the_working_grid(tmp_path):
  # Your own data (--data): stored LPS at 2 mm while the run works in RAS at
  # 4 mm. Every method's prediction comes back on the input's grid (the
  # small GAN used to be upsampled to the input's shape from the working
  # grid's LR output: refused, or scored flipped).
  import nibabel as nib
  import nibabel.orientations as nio
  import numpy as np
  from megan_jax import paired
  data = tmp_path / "data"
  paired.write_split("kernel", str(data), n_train=1, n_test=1, seed=0,
                     spacing=2.0, max_side=None)
  lps = np.array([[0, -1], [1, -1], [2, 1]], float)
  for folder, _, files in os.walk(data):
    for f in files:
      if f.endswith(".nii.gz"):
        path = os.path.join(folder, f)
        img = nib.load(path)
        nib.save(nib.Nifti1Image(
            nio.apply_orientation(np.asarray(img.dataobj), lps),
            img.affine @ nio.inv_ornt_aff(lps, img.shape)), path)
  results = tmp_path / "results"
  rc = _table1().main([
      "--task", "mine", "--data", str(data), "--steps", "2", "--out",
      str(tmp_path / "run"), "--results", str(results), "--no-progress",
      "--no-nlm", "--config", "demo:smoke", "--config.infer.batch_size=4"])
  assert rc == 0
  out = json.loads((results / "table1-mine.json").read_text())
  src = nib.load(os.path.join(data, "test", "source",
                              os.listdir(data / "test" / "source")[0]))
  assert nib.aff2axcodes(src.affine) == ("L", "P", "S")
  for m in ("megan", "patch_gan", "small_gan_upsampled"):
    assert out["methods"][m]["seam"] is None  # patches not on voxel borders
    pred = nib.load(str(tmp_path / "run" / "pred" /
                        f"{out['methods'][m]['per_subject'][0]['subject']}"
                        f"_{m}.nii.gz"))
    assert pred.shape == src.shape
  assert "| – |" in (results / "table1-mine.md").read_text()
