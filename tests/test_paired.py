"""The seeded paired benchmark made from the MNI152 template."""
import json
import os
import re

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi

from megan_jax import data, paired

SPACING = 4.0  # small grids keep these tests quick


def subject(task, index, **kw):
  kw.setdefault("spacing", SPACING)
  kw.setdefault("max_side", None)
  return paired.make_subject(task, index, **kw)


def corr(a, b):
  return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def dice(a, b):
  return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("task", paired.TASKS)
def test_same_seed_gives_bitwise_equal_subjects(task):
  a, b = subject(task, 1, seed=3), subject(task, 1, seed=3)
  for x, y in [(a.source.data, b.source.data), (a.target.data, b.target.data),
               (a.mask, b.mask), (a.source.affine, b.source.affine)]:
    assert np.array_equal(x, y)
  assert a.name == b.name == "sub-001"
  assert a.mask.dtype == bool and a.source.data.dtype == np.float32
  assert a.source.data.shape == a.target.data.shape == a.mask.shape
  # Another seed is another subject.
  c = subject(task, 1, seed=4)
  assert not np.array_equal(a.mask, c.mask)


def test_other_index_is_other_anatomy():
  a, b = subject("t1t2", 0), subject("t1t2", 1)
  assert not np.array_equal(a.source.data, b.source.data)
  assert not np.array_equal(a.target.data, b.target.data)
  assert dice(a.mask, b.mask) < 0.999
  # Both are deformations of the template, not the template itself.
  box = paired.crop_box(SPACING, None)
  template = data.brain_mask(SPACING)[box]
  assert not np.array_equal(a.mask, template)
  assert dice(a.mask, template) > 0.85  # but a small deformation of it


def test_anatomy_does_not_depend_on_task():
  brain = subject("t1t2", 2).mask
  head = subject("kernel", 2).mask
  other_head = subject("kernel", 3).mask
  assert brain.any() and np.all(head[brain])  # the brain lies in its head
  assert not np.all(other_head[brain])        # not in another subject's


def test_t1t2_pairs_share_anatomy_with_inverted_contrast():
  a, b = subject("t1t2", 0), subject("t1t2", 1)
  src, tgt, mask = a.source.data, a.target.data, a.mask
  # Both contrasts are skull-stripped with the same mask.
  assert not np.any(src[~mask]) and not np.any(tgt[~mask])
  assert dice(src > 0, tgt > 0) > 0.95
  # T2 reverses T1's tissue order (WM bright -> dark, CSF dark -> bright),
  # voxel by voxel only where the anatomy is the same.
  both = mask & b.mask
  matched = corr(src[both], tgt[both])
  assert matched < -0.6
  assert matched < corr(src[both], b.target.data[both]) - 0.1
  assert src.max() < 400 < tgt.max()  # T1 scale 0..255, T2 up to ~900


def test_kernel_source_is_a_sharp_noisy_version_of_the_target():
  a, b = subject("kernel", 0), subject("kernel", 1)
  src, tgt = a.source.data, a.target.data
  smooth = ndi.gaussian_filter(src, 1.0)
  matched = corr(smooth[a.mask], tgt[a.mask])
  assert matched > 0.9
  assert matched > corr(smooth[a.mask], b.target.data[a.mask]) + 0.05
  # Sharp kernel: far more high-frequency energy than the smooth target.
  assert ndi.laplace(src).std() > 2 * ndi.laplace(tgt).std()
  # Correlated noise everywhere, the air included (CT-like, unlike MRI).
  assert src[~a.mask].std() > 1.0 and tgt.min() >= 0


@pytest.mark.parametrize("spacing,max_side", [(3.0, 40), (3.0, None)])
def test_crop_keeps_world_coordinates(spacing, max_side):
  sub = subject("t1t2", 0, spacing=spacing, max_side=max_side)
  box = paired.crop_box(spacing, max_side)
  assert sub.mask.shape == tuple(s.stop - s.start for s in box)
  template = data.mni152("t1", spacing)
  brain = data.brain_mask(spacing)
  if max_side is None:  # the whole template brain fits in the box
    assert brain[box].sum() == brain.sum()
    assert max(sub.mask.shape) > 40
  else:
    assert max(sub.mask.shape) <= max_side
  # Voxel 0 of the crop is the template voxel at the box's start.
  start = np.array([s.start for s in box] + [1.0])
  np.testing.assert_allclose(sub.source.affine @ [0, 0, 0, 1],
                             template.affine @ start, atol=1e-9)
  np.testing.assert_allclose(sub.source.affine[:3, :3],
                             template.affine[:3, :3])
  # Content follows: the subject's brain sits where the template's does
  # (in world mm), within the deformation's few millimetres.
  def centre(mask, affine):
    return affine[:3, :3] @ np.argwhere(mask).mean(axis=0) + affine[:3, 3]
  cropped = np.zeros_like(brain)
  cropped[box] = brain[box]
  np.testing.assert_allclose(centre(sub.mask, sub.source.affine),
                             centre(cropped, template.affine), atol=6.0)


def test_crop_caps_default_size():
  shape = tuple(s.stop - s.start for s in paired.crop_box())
  assert max(shape) <= 128
  assert all(np.ceil(n / 4) <= 32 for n in shape)


def test_write_split_writes_held_out_files_and_reuses_manifest(
    tmp_path, monkeypatch):
  out = tmp_path / "bench"
  kw = dict(n_train=2, n_test=1, seed=5, spacing=SPACING, max_side=None)
  manifest = paired.write_split("kernel", out, **kw)
  with open(out / "manifest.json") as f:
    assert json.load(f) == manifest
  assert manifest["task"] == "kernel" and manifest["n_test"] == 1
  assert "MNI152" in manifest["description"]
  assert manifest["train"]["subjects"] == ["sub-000", "sub-001"]
  assert manifest["test"]["subjects"] == ["sub-002"]
  assert not set(manifest["train"]["subjects"]) & set(
      manifest["test"]["subjects"])
  assert sorted(os.listdir(out / "train")) == ["source", "target"]
  assert sorted(os.listdir(out / "test")) == ["mask", "source", "target"]

  mask_img = nib.load(out / manifest["test"]["mask"][0])
  assert mask_img.get_data_dtype() == np.uint8
  assert list(mask_img.shape) == manifest["shape"]
  src_img = nib.load(out / manifest["test"]["source"][0])
  expected = paired.make_subject("kernel", 2, seed=5, spacing=SPACING,
                                 max_side=None)
  np.testing.assert_allclose(src_img.affine, expected.source.affine,
                             atol=1e-5)
  np.testing.assert_array_equal(np.asarray(src_img.dataobj),
                                expected.source.data)
  np.testing.assert_array_equal(np.asarray(mask_img.dataobj) > 0,
                                expected.mask)

  # Same parameters: nothing is generated again.
  def fail(*a, **k):
    raise AssertionError("regenerated a subject")
  monkeypatch.setattr(paired, "make_subject", fail)
  assert paired.write_split("kernel", out, **kw) == manifest
  monkeypatch.undo()

  # Other parameters: regenerated, and files of the old split are gone.
  smaller = paired.write_split("kernel", out, **dict(kw, n_train=1))
  assert smaller["test"]["subjects"] == ["sub-001"]
  assert sorted(os.listdir(out / "train" / "target")) == ["sub-000.nii.gz"]
  assert sorted(os.listdir(out / "test" / "mask")) == ["sub-001.nii.gz"]


def test_unknown_task_is_named(tmp_path):
  with pytest.raises(ValueError, match="'t1flair'"):
    paired.make_subject("t1flair", 0)
  with pytest.raises(ValueError, match="'ct'"):
    paired.write_split("ct", tmp_path / "x")
  assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kw, says", [
    (dict(index=-1), "index must be an integer >= 0, got -1"),
    (dict(seed=-2), "seed must be an integer >= 0, got -2"),
    (dict(spacing=0.0), "spacing must be a positive number of mm, got 0.0"),
    (dict(max_side=4), "max_side must be an integer >= 8")])
def test_bad_arguments_raise_value_error(kw, says):
  """Each is our own check's message (numpy raises its own ValueError for a
  negative seed further down, which must not be what passes this)."""
  kw = dict(dict(index=0), **kw)
  with pytest.raises(ValueError, match=re.escape(says)):
    paired.make_subject("t1t2", kw.pop("index"), **kw)


def test_rotation_stays_within_documented_five_degrees(monkeypatch):
  """The docstring's "rotation up to ±5°" is the constant, and the angles the
  anatomy actually draws (recorded at ``_rotation``) stay within it for
  several subjects and seeds, as does the angle of the matrix applied."""
  doc = re.search(r"rotation up to ±([\d.]+)°", paired.__doc__)
  assert doc and float(doc.group(1)) == paired.MAX_ROTATION_DEG == 5.0
  drawn = []
  rotation = paired._rotation

  def record(angles):
    m = rotation(angles)
    drawn.append((np.asarray(angles, float), m))
    return m
  monkeypatch.setattr(paired, "_rotation", record)
  for seed, index in [(0, 0), (0, 1), (1, 0), (2, 3)]:
    paired._anatomy(index, seed, 8.0, None)
  assert len(drawn) == 4
  for angles, m in drawn:
    assert np.abs(angles).max() <= 5.0 + 1e-9
    total = np.degrees(np.arccos(np.clip((np.trace(m) - 1) / 2, -1, 1)))
    assert total <= 5.0 * np.sqrt(3) + 1e-6
  # Not all zero: a rotation is drawn at all.
  assert max(np.abs(a).max() for a, _ in drawn) > 0.5


@pytest.mark.parametrize("task", paired.TASKS)
def test_task_random_streams_are_distinct_from_the_anatomy(task, monkeypatch):
  """Every ``_rng`` stream a subject draws from is used once: the task's
  bias/noise streams never replay the anatomy's elastic or affine draws
  (stream ids ``(0, k)`` are the anatomy's alone), and the two tasks' own
  streams differ."""
  calls = []
  rng = paired._rng

  def record(seed, index, stream):
    calls.append((seed, index, tuple(stream)))
    return rng(seed, index, stream)
  monkeypatch.setattr(paired, "_rng", record)
  subject(task, 1, seed=2, spacing=8.0)
  assert len(calls) == len(set(calls)), calls
  anatomy = {(2, 1, paired._ELASTIC), (2, 1, paired._AFFINE)}
  assert anatomy <= set(calls)
  task_streams = [c[2] for c in calls if c not in anatomy]
  assert task_streams and all(s[0] != 0 for s in task_streams), calls
  assert all(s[0] == paired.TASKS.index(task) + 1 for s in task_streams)


def test_kernel_noise_has_the_documented_std():
  """The kernel source's added noise (source minus the sharpened anatomy)
  has std ``KERNEL_NOISE`` × the template's T1 range, and so does the
  source in the air well away from the head (within 20 %)."""
  sub = subject("kernel", 0, seed=1)
  anat = paired._anatomy(0, 1, SPACING, None)
  x = anat.t1
  sharp = x + paired.KERNEL_BOOST * (
      x - ndi.gaussian_filter(x, paired.KERNEL_SIGMA))
  level = paired.KERNEL_NOISE * float(data.mni152("t1", SPACING).data.max())
  noise = sub.source.data - sharp
  assert noise.std() == pytest.approx(level, rel=0.05)
  air = ~ndi.binary_dilation(anat.head, iterations=3)
  assert air.sum() > 1000
  assert sub.source.data[air].std() == pytest.approx(level, rel=0.2)


def test_write_split_with_another_seed_regenerates(tmp_path):
  """A manifest written with one seed is not reused for another: the files
  are rewritten with the new seed's subjects and the manifest records it."""
  out = tmp_path / "bench"
  kw = dict(n_train=1, n_test=0, spacing=8.0, max_side=None)
  first = paired.write_split("t1t2", out, seed=0, **kw)
  path = out / first["train"]["source"][0]
  before = np.asarray(nib.load(path).dataobj)
  second = paired.write_split("t1t2", out, seed=1, **kw)
  assert first["seed"] == 0 and second["seed"] == 1
  after = np.asarray(nib.load(out / second["train"]["source"][0]).dataobj)
  want = paired.make_subject("t1t2", 0, seed=1, spacing=8.0, max_side=None)
  assert not np.array_equal(before, after)
  np.testing.assert_array_equal(after, want.source.data)
  with open(out / "manifest.json") as f:
    assert json.load(f)["seed"] == 1
