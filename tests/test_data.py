"""The embedded MNI152 template is read from nilearn's wheel, no download."""
import numpy as np
import pytest

from megan_jax import data


def test_template_maps_load_with_geometry():
  t1 = data.mni152("t1")
  gm = data.mni152("gm")
  assert t1.data.shape == gm.data.shape == (197, 233, 189)
  np.testing.assert_allclose(t1.affine, gm.affine)
  assert t1.data.max() > 100 and t1.data.min() == 0


def test_resampled_template_keeps_world_extent():
  t1 = data.mni152("t1")
  t2 = data.mni152("t1", spacing=2.0)
  assert t2.data.shape == (98, 116, 94)
  extent = lambda v: np.diag(v.affine)[:3] * np.array(v.data.shape)
  np.testing.assert_allclose(extent(t2), extent(t1), rtol=1e-6)
  # The voxel corner at the origin stays at the same world position.
  corner = lambda v: v.affine[:3, 3] - 0.5 * np.diag(v.affine)[:3]
  np.testing.assert_allclose(corner(t2), corner(t1), atol=1e-6)
  # Content follows: brain centre of mass in world mm agrees within a voxel.
  def com(v):
    idx = np.array(np.nonzero(v.data > 50)).mean(axis=1)
    return v.affine[:3, :3] @ idx + v.affine[:3, 3]
  np.testing.assert_allclose(com(t2), com(t1), atol=2.0)


def test_brain_mask_covers_tissue():
  m = data.brain_mask(spacing=2.0)
  gm = data.mni152("gm", 2.0).data
  assert m.dtype == bool and m.shape == gm.shape
  assert m[gm > 128].all()  # every clearly-grey voxel is in the mask
  assert 0.1 < m.mean() < 0.5


def test_each_call_gets_its_own_header():
  a = data.mni152("t1", spacing=4.0)
  a.header.set_data_dtype(np.int16)
  a.header["descrip"] = b"changed"
  b = data.mni152("t1", spacing=4.0)
  assert b.header.get_data_dtype() != np.int16
  assert b.header["descrip"] != a.header["descrip"]


def test_a_bad_template_spacing_is_one_line():
  # spacing=0 was an OverflowError; -2 a 1x1x1 volume.
  from megan_jax.errors import InputError
  for bad in (0, -2, float("nan"), float("inf"), "2", True):
    with pytest.raises(InputError, match="spacing .*: a voxel size in mm"):
      data.mni152("t1", spacing=bad)
