"""Which files a dataset is made of, where their labels are, and when the
sketch cache is stale."""
import os

import nibabel as nib
import numpy as np
import pytest
import synthetic

from megan_jax import configs, dataset, train
from megan_jax.errors import InputError


def _save(path, data, zoom=4.0):
  nib.save(nib.Nifti1Image(data, np.diag([zoom, zoom, zoom, 1.0])), str(path))
  return str(path)


def _lesion(shape=(30, 37, 26), r=5):
  z, y, x = np.indices(shape)
  return ((z - 15) ** 2 + (y - 18) ** 2 + (x - 13) ** 2 < r ** 2).astype(
      np.float32)


@pytest.fixture
def folder(tmp_path):
  for i in range(2):
    _save(tmp_path / f"s{i}.nii.gz", synthetic.blob(seed=i))
    _save(tmp_path / f"s{i}_seg.nii.gz", _lesion())
  (tmp_path / "notes.txt").write_text("not a volume")
  return tmp_path


def test_labels_beside_the_volumes_are_not_volumes(folder):
  every = dataset.list_volumes(str(folder))
  assert len(every) == 4  # no suffix: nothing tells a label apart
  files = dataset.list_volumes(str(folder), "_seg")
  assert [os.path.basename(f) for f in files] == ["s0.nii.gz", "s1.nii.gz"]
  config = configs.get_config("demo:smoke")
  config.data.label_suffix = "_seg"
  config.edges.use_label = True
  subjects = dataset.load_dataset(str(folder), config)
  assert [s.name for s in subjects] == ["s0.nii.gz", "s1.nii.gz"]
  os.rename(folder / "s1_seg.nii.gz", folder / "s1_seg.bak")
  with pytest.raises(InputError, match="every volume needs its label; "
                     f"{folder / 's1.nii.gz'} has none"):
    dataset.load_dataset(str(folder), config)
  os.rename(folder / "s1_seg.bak", folder / "s1_seg.nii.gz")
  only_labels = folder / "labels"
  only_labels.mkdir()
  _save(only_labels / "a_seg.nii", _lesion())
  with pytest.raises(InputError, match="besides _seg labels"):
    dataset.list_volumes(str(only_labels), "_seg")


def test_list_file_comments_and_label_paths(folder):
  listing = folder / "train.txt"
  listing.write_text("# training set\n  # indented comment\ns1.nii.gz\n\n"
                     "  s0.nii.gz  \ns0_seg.nii.gz\n")
  files = dataset.list_volumes(str(listing), "_seg")
  assert files == [str(folder / "s1.nii.gz"), str(folder / "s0.nii.gz")]
  assert dataset.label_path("a/X.NII.GZ", "_seg") == "a/X_seg.NII.GZ"
  assert dataset.label_path("a/x.nii", "_seg") == "a/x_seg.nii"
  assert dataset.label_path("a/x.nii.gz", "") is None
  assert dataset.label_path("mni152", "_seg") is None


def test_changing_a_label_file_invalidates_the_cached_sketch(folder, tmp_path):
  config = configs.get_config("demo:smoke")
  config.data.label_suffix = "_seg"
  config.edges.use_label = True
  cache = str(tmp_path / "cache")
  path = str(folder / "s0.nii.gz")
  before = np.array(dataset.load_subject(path, config, cache).edges[-1])
  _save(folder / "s0_seg.nii.gz", _lesion(r=9))
  after = np.array(dataset.load_subject(path, config, cache).edges[-1])
  fresh = dataset.load_subject(path, config).edges[-1]
  np.testing.assert_array_equal(after, fresh)
  assert not np.array_equal(after, before)


def test_train_refuses_a_bad_label_or_validation_setup_before_writing(
    folder, tmp_path):
  config = configs.get_config("demo:smoke")
  config.data.path = str(folder)
  config.edges.use_label = True
  run = tmp_path / "run"
  with pytest.raises(InputError, match="needs data.label_suffix"):
    train.train(config, str(run), progress=False)
  config.data.label_suffix = "_seg"
  config.data.val_path = str(tmp_path / "missing")
  with pytest.raises(InputError, match="missing: no such folder"):
    train.train(config, str(run), progress=False)
  assert not run.exists()


def test_hidden_files_and_undecodable_list_files(tmp_path):
  d = tmp_path / "d"
  d.mkdir()
  for name in ("a.nii.gz", ".tmp-x1.nii.gz", "._a.nii.gz"):
    _save(d / name, synthetic.blob(seed=0))
  assert dataset.list_volumes(str(d)) == [str(d / "a.nii.gz")]
  listing = tmp_path / "list.txt"
  listing.write_text("\ufeff# volumes\nd/a.nii.gz\n", encoding="utf-8")
  assert dataset.list_volumes(str(listing)) == [str(d / "a.nii.gz")]
  binary = tmp_path / "vol.mgz"
  binary.write_bytes(b"\x1f\x8b\x08\x00\xff\xfe")
  with pytest.raises(InputError, match="vol.mgz: neither a NIfTI file"):
    dataset.list_volumes(str(binary))


def test_a_tiny_spacing_is_refused_before_resampling(tmp_path):
  # 0.01 mm from 4 mm voxels would be a (12000, 14800, 10400) grid: refused
  # from the shapes alone, before allocating it.
  from megan_jax import grid
  path = _save(tmp_path / "a.nii.gz", synthetic.blob(seed=0))
  config = configs.get_config("demo:smoke")
  config.data.spacing = 0.01
  from megan_jax import io
  vol = io.load_nifti(path)
  with pytest.raises(InputError, match="does not fit lr_size"):
    grid.to_working(vol, config)
