"""Which files a dataset is made of, where their labels are, and when the
sketch cache is stale."""
import dataclasses
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


def _ramp(shape):
  """Each voxel holds its own index, ``z * 10000 + y * 100 + x`` (exact in
  float32), so a crop tells where it came from."""
  z, y, x = np.indices(shape)
  return (z * 10000 + y * 100 + x).astype(np.float32)


def _ramp_subject(coarse, fine):
  """A subject of two scales (its sketches the images), every voxel
  foreground."""
  return dataset.Subject(
      name="ramp", images=[coarse, fine], edges=[coarse, fine],
      lr_input=np.zeros((1, 1, 1), np.float32),
      lr_target=np.zeros((1, 1, 1), np.float32),
      foreground=[np.arange(coarse.size, dtype=np.int32)] * 2,
      intensity=np.array([0.0, 1.0]))


def test_hr_patch_starts_even_and_its_previous_scale_patch_is_centred_on_it():
  """The target (and edge) patch is ``fine[s : s + p]`` with every ``s``
  even, and ``prev`` is the coarse volume from ``s // 2 - p // 4`` (padded
  with -1 outside), so ``prev``'s voxel ``p // 4`` is the coarse voxel
  ``s // 2`` under the target's first voxel: the two are centred together."""
  p = 8
  fine_shape, coarse_shape = (24, 26, 28), (12, 13, 14)
  fine, coarse = _ramp(fine_shape), _ramp(coarse_shape)
  sub = _ramp_subject(coarse, fine)
  batch = dataset.sample_hr_batch([sub], 1, 64, p, np.random.default_rng(0))
  padded = np.pad(coarse, p // 4, constant_values=-1.0)
  starts = set()
  for prev, edge, target in zip(batch["prev"][..., 0], batch["edges"][..., 0],
                                batch["target"][..., 0]):
    v = int(target[0, 0, 0])
    s = (v // 10000, v // 100 % 100, v % 100)
    starts.add(s)
    assert all(si % 2 == 0 for si in s), s
    np.testing.assert_array_equal(
        target, fine[s[0]:s[0] + p, s[1]:s[1] + p, s[2]:s[2] + p])
    np.testing.assert_array_equal(edge, target)
    c = [si // 2 for si in s]  # padded by p // 4: starts at c - p // 4
    np.testing.assert_array_equal(
        prev, padded[c[0]:c[0] + p, c[1]:c[1] + p, c[2]:c[2] + p])
    assert prev[p // 4, p // 4, p // 4] == coarse[tuple(c)]
  assert len(starts) > 10  # many places, the clipped edges among them
  assert any(0 in s for s in starts)


def test_hr_patches_reach_every_voxel_of_odd_axes_as_inference_does():
  """Patch starts run up to inference's last, ``2 * coarse - p`` (its grid
  is twice the previous scale), so on an odd axis the last voxel is
  trained on too (the largest start was once ``fine - p - 1`` there)."""
  p = 8
  fine_shape = (25, 26, 27)
  coarse_shape = tuple(-(-n // 2) for n in fine_shape)  # (13, 13, 14)
  fine, coarse = _ramp(fine_shape), _ramp(coarse_shape)
  sub = _ramp_subject(coarse, fine)
  target = dataset.sample_hr_batch([sub], 1, 400, p, np.random.default_rng(0),
                                   uniform_fraction=0.5)["target"][..., 0]
  v = target[:, 0, 0, 0].astype(int)
  starts = np.stack([v // 10000, v // 100 % 100, v % 100], axis=1)
  assert (starts % 2 == 0).all()
  np.testing.assert_array_equal(starts.max(axis=0),
                                [2 * n - p for n in coarse_shape])
  for axis, n in enumerate(fine_shape):
    covered = np.zeros(n, bool)
    for s in starts[:, axis]:
      covered[s:s + p] = True
    assert covered.all(), (axis, np.flatnonzero(~covered))
  # Past an odd axis's end the target is background, as inference pads it.
  last = target[starts[:, 0] == 2 * coarse_shape[0] - p]
  assert len(last) and (last[:, -1] == -1.0).all()


def _cube_subject(config):
  """A 32³ volume, -1 but for a bright cube at [12:20)³, through
  ``preprocess`` (scales 8³, 16³, 32³; the cube at [3:5), [6:10), [12:20))."""
  img = np.full((32, 32, 32), -1.0, np.float32)
  img[12:20, 12:20, 12:20] = 1.0
  arrays = dataset.preprocess(img, config)
  arrays["intensity"] = np.array([0.0, 1.0])
  return dataset._subject("cube", arrays, config.num_hr_scales)


def test_foreground_is_the_bright_voxels_and_uniform_fraction_spreads_patches():
  """``preprocess`` lists exactly the voxels above ``data.foreground`` (the
  cube) at every scale; with ``uniform_fraction=0`` every patch is centred
  on the cube (its middle voxel ``p // 2`` is inside it), with 1 the
  patches spread over the volume, many missing the cube entirely."""
  config = configs.get_config("demo:smoke")
  assert config.num_hr_scales == 2
  sub = _cube_subject(config)
  for k, (lo, hi) in enumerate([(3, 5), (6, 10), (12, 20)]):
    mask = np.zeros(sub.images[k].shape, bool)
    mask[lo:hi, lo:hi, lo:hi] = True
    np.testing.assert_array_equal(sub.foreground[k], np.flatnonzero(mask))
  p = 8
  near = dataset.sample_hr_batch([sub], 2, 32, p, np.random.default_rng(0),
                                 uniform_fraction=0.0)["target"][..., 0]
  np.testing.assert_array_equal(near[:, p // 2, p // 2, p // 2], 1.0)
  spread = dataset.sample_hr_batch([sub], 2, 64, p, np.random.default_rng(0),
                                   uniform_fraction=1.0)["target"][..., 0]
  empty = (spread.max(axis=(1, 2, 3)) == -1.0).sum()
  assert empty >= 16, empty
  ramps = dataclasses.replace(sub, images=[_ramp(x.shape) for x in sub.images])
  def starts(fraction):
    t = dataset.sample_hr_batch([ramps], 2, 64, p, np.random.default_rng(1),
                                uniform_fraction=fraction)["target"]
    v = t[:, 0, 0, 0, 0].astype(int)
    return np.stack([v // 10000, v // 100 % 100, v % 100], axis=1)
  # on the cube: centre u in [6, 10), c = u - p // 4, s = 2c in [8, 16)
  assert ((starts(0.0) >= 8) & (starts(0.0) < 16)).all()
  anywhere = starts(1.0)
  assert ((anywhere < 8) | (anywhere >= 16)).any(axis=1).sum() >= 32
  assert len({tuple(s) for s in anywhere}) > 40


def test_rewriting_a_volume_invalidates_its_cached_arrays(tmp_path):
  """The cache key holds the file's size and mtime: the same path written
  again with other voxels (and a new mtime) is preprocessed afresh, not
  read back from the cache."""
  config = configs.get_config("demo:smoke")
  cache = str(tmp_path / "cache")
  path = _save(tmp_path / "a.nii.gz", synthetic.blob(seed=0))
  before = np.array(dataset.load_subject(path, config, cache).images[-1])
  st = os.stat(path)
  _save(tmp_path / "a.nii.gz",
        synthetic.blob(seed=1, centre_shift=(0.2, 0.0, 0.0)))
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
  after = dataset.load_subject(path, config, cache)
  fresh = dataset.load_subject(path, config)
  for x, y in zip(after.images + after.edges, fresh.images + fresh.edges):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(after.images[-1], before)


def test_a_labels_class_value_does_not_change_its_sketch_at_any_scale():
  # add_label's rule, nonzero = inside, every class alike: a lesion drawn
  # with class 4 (BRATS' enhancing tumour) is the same lesion as class 1 at
  # every scale, not one that grows on the coarse scales' area average.
  c = configs.get_config("demo:smoke")
  img = np.full((32,) * 3, -1.0, np.float32)
  img[8:24, 8:24, 8:24] = 0.5
  lab = np.zeros((32,) * 3, np.uint8)
  # A checkerboard-ish lesion: one in four voxels' blocks at most half full.
  lab[12:20, 12:20, 12:20] = np.tile(
      np.array([[[1, 1], [1, 0]], [[0, 0], [0, 0]]], np.uint8), (4, 4, 4))
  one = dataset.preprocess(img, c, lab)
  four = dataset.preprocess(img, c, lab * 4)
  for k in range(c.num_hr_scales + 1):
    np.testing.assert_array_equal(one[f"edges_{k}"], four[f"edges_{k}"])
