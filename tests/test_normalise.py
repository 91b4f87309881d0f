"""Intensity scaling: range, clipping, inverse, CT window."""
import numpy as np
import pytest

from megan_jax import normalise as nz
from megan_jax.errors import InputError


def test_percentile_scaling_and_inverse():
  rng = np.random.default_rng(0)
  x = rng.gamma(2.0, 100.0, size=(20, 20, 20)).astype(np.float32)
  y, norm = nz.normalise(x, percentiles=(0, 99))
  assert y.dtype == np.float32 and y.min() == -1.0 and y.max() == 1.0
  assert np.mean(y == 1.0) == pytest.approx(0.01, abs=0.002)  # the clipped 1 %
  inside = x <= norm.hi
  np.testing.assert_allclose(norm.denormalise(y)[inside], x[inside], rtol=1e-5, atol=1e-3)


def test_ct_window_is_fixed_across_scans():
  norm = nz.fit_normaliser(np.array([-3000.0, 0.0, 3000.0]), window=(-1000, 1000))
  np.testing.assert_allclose(norm.normalise(np.array([-1000.0, 0.0, 500.0, 2000.0])), [-1, 0, 0.5, 1])


def test_unit_range_roundtrip():
  y = np.linspace(-1, 1, 11)
  np.testing.assert_allclose(nz.to_unit(y), np.linspace(0, 1, 11))
  np.testing.assert_allclose(nz.from_unit(nz.to_unit(y)), y)


def test_constant_and_bad_ranges_raise():
  with pytest.raises(InputError, match="constant"):
    nz.fit_normaliser(np.full((3, 3, 3), 5.0), path="c.nii")
  with pytest.raises(InputError):
    nz.fit_normaliser(np.arange(10.0), percentiles=(50, 10))


def test_a_window_that_misses_every_voxel_raises():
  # A CT window on an MRI-range image (or a typo): every voxel would map to
  # one value, and training would learn blank volumes.
  x = np.linspace(0.0, 300.0, 27).reshape(3, 3, 3)
  with pytest.raises(InputError, match=r"mr.nii: no voxel inside the "
                     r"intensity window \[1000, 2000\]"):
    nz.fit_normaliser(x, window=(1000, 2000), path="mr.nii")
  with pytest.raises(InputError, match="no voxel inside"):
    nz.fit_normaliser(x, window=(-2000, -1000))
  nz.fit_normaliser(x, window=(250, 2000))  # some voxels inside: fine


def test_a_mostly_constant_volume_falls_back_to_its_full_range():
  """Where the percentiles coincide (99.8 % zeros: the 0th and 99.5th
  percentiles are both 0) the range falls back to [min, max] instead of
  calling the volume constant: the background maps to -1, the brightest
  voxel to 1."""
  x = np.zeros((10, 10, 10), np.float32)
  x[3, 4, 5], x[6, 2, 1] = 400.0, 250.0  # 0.2 % of the voxels
  assert np.percentile(x, 99.5) == 0.0  # the default percentiles coincide
  y, norm = nz.normalise(x)
  assert (norm.lo, norm.hi) == (0.0, 400.0)
  assert y[3, 4, 5] == 1.0 and y[6, 2, 1] == pytest.approx(0.25)
  assert np.mean(y == -1.0) == pytest.approx(0.998)


def test_a_window_touching_the_volume_at_one_end_only_raises():
  """The window check's boundary: a window whose low end is the volume's
  maximum (or whose high end is its minimum) maps every voxel to one value
  (-1, or 1), so it is refused; one reaching a hair past it is accepted."""
  x = np.linspace(0.0, 300.0, 27).reshape(3, 3, 3)
  with pytest.raises(InputError, match="no voxel inside"):
    nz.fit_normaliser(x, window=(300, 2000))  # max == lo: all -1
  with pytest.raises(InputError, match="no voxel inside"):
    nz.fit_normaliser(x, window=(-2000, 0))  # min == hi: all 1
  below = nz.fit_normaliser(x, window=(299.5, 2000)).normalise(x)
  above = nz.fit_normaliser(x, window=(-2000, 0.5)).normalise(x)
  assert below.max() > -1.0 and above.min() < 1.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("window", [None, (0.0, 20.0)])
def test_non_finite_voxels_are_named_not_called_constant(bad, window):
  # Were "intensity range [nan, nan] is empty (constant image)" with
  # percentiles, and NaN passed through to the output with a window.
  x = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
  x[0, 0, 0] = bad
  with pytest.raises(InputError, match=r"image a\.nii: .*non-finite"):
    nz.fit_normaliser(x, window=window, path="a.nii")
