"""launch/table1.py on your own folder (--data) stored otherwise than the
run's working grid (slow; its own file, so a test worker takes it apart from
test_table1.py's end-to-end run)."""
import json
import os

import pytest

from test_table1 import _table1


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
