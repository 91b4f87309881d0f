"""Tests for megan_jax.metrics: SSIM against scikit-image, masks, seams."""
import math

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from skimage.metrics import structural_similarity

from megan_jax import metrics, tiling
from megan_jax.errors import InputError


def _smooth(rng, shape, sigma=2.0):
  """Gaussian-filtered noise rescaled to [0, 1]."""
  v = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
  return (v - v.min()) / (v.max() - v.min())


def _skimage_ssim(a, b):
  return structural_similarity(
      np.asarray(a, np.float64), np.asarray(b, np.float64), data_range=1,
      gaussian_weights=True, sigma=1.5, use_sample_covariance=False)


# ---------------------------------------------------------------------------
# SSIM.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(16, 16, 16), (20, 24, 18), (11, 13, 30)])
@pytest.mark.parametrize("kind", ["random", "smooth", "noisy"])
def test_ssim_matches_skimage(shape, kind):
  rng = np.random.default_rng(sum(shape) + len(kind))
  if kind == "random":
    a, b = rng.random(shape), rng.random(shape)
  else:
    a = _smooth(rng, shape)
    if kind == "smooth":
      b = _smooth(rng, shape)
    else:  # a noisy copy: SSIM well inside (0, 1), where errors would show
      b = np.clip(a + 0.05 * rng.standard_normal(shape), 0, 1)
  expected = _skimage_ssim(a, b)
  got = metrics.ssim(a, b)
  assert isinstance(got, float)
  assert got == pytest.approx(expected, abs=1e-4)


def test_gaussian_filter_matches_scipy():
  rng = np.random.default_rng(0)
  x = rng.random((12, 15, 13))
  got = np.asarray(metrics.gaussian_filter(x, 1.5))
  np.testing.assert_allclose(
      got, ndimage.gaussian_filter(x, 1.5, mode="reflect", truncate=3.5),
      atol=1e-6)


def test_ssim_masked_is_mean_of_cropped_map():
  rng = np.random.default_rng(1)
  shape = (18, 20, 16)
  a = _smooth(rng, shape)
  b = np.clip(a + 0.05 * rng.standard_normal(shape), 0, 1)
  mask = rng.random(shape) < 0.3
  _, smap = structural_similarity(
      a, b, data_range=1, gaussian_weights=True, sigma=1.5,
      use_sample_covariance=False, full=True)
  pad = 5
  crop = (slice(pad, -pad),) * 3
  expected = smap[crop][mask[crop]].mean()
  assert metrics.ssim(a, b, mask) == pytest.approx(expected, abs=1e-4)
  # An all-ones mask is the unmasked SSIM.
  assert metrics.ssim(a, b, np.ones(shape)) == pytest.approx(
      metrics.ssim(a, b), abs=1e-6)


def test_ssim_mask_outside_crop_is_an_error():
  a = np.zeros((12, 12, 12))
  mask = np.zeros(a.shape, bool)
  mask[:3] = True  # only within the cropped border
  with pytest.raises(InputError, match="no voxels"):
    metrics.ssim(a, a, mask)


def test_ssim_rejects_small_and_mismatched_volumes():
  with pytest.raises(InputError, match="window"):
    metrics.ssim(np.zeros((10, 20, 20)), np.zeros((10, 20, 20)))
  with pytest.raises(InputError, match="shapes"):
    metrics.ssim(np.zeros((12, 12, 12)), np.zeros((12, 12, 13)))
  with pytest.raises(InputError, match="mask"):
    metrics.ssim(np.zeros((12,) * 3), np.zeros((12,) * 3), np.ones((12, 12)))


def test_ssim_compiles_once_per_shape():
  rng = np.random.default_rng(2)
  shape = (13, 14, 15)  # used by no other test
  before = metrics._ssim_plane_sums._cache_size()
  for _ in range(3):
    metrics.ssim(rng.random(shape), rng.random(shape))
  metrics.ssim(rng.random(shape), rng.random(shape), data_range=2.0)
  assert metrics._ssim_plane_sums._cache_size() == before + 1


# ---------------------------------------------------------------------------
# Voxel-wise metrics.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("to_array", [np.asarray, jnp.asarray])
def test_identical_volumes(to_array):
  v = to_array(_smooth(np.random.default_rng(3), (14, 12, 16)))
  out = metrics.evaluate(v, v)
  assert set(out) == {"ssim", "psnr", "mae", "mse"}
  assert all(isinstance(x, float) for x in out.values())
  assert out["ssim"] == pytest.approx(1.0, abs=1e-6)
  # never past 1, where float32 rounding would put it for some volumes
  for seed in range(6):
    w = to_array(_smooth(np.random.default_rng(seed), (14, 12, 16)))
    assert -1.0 <= metrics.ssim(w, w) <= 1.0
  assert out["psnr"] == math.inf
  assert out["mae"] == 0.0 and out["mse"] == 0.0
  assert metrics.psnr(v, v, v > 0.5) == math.inf


def test_psnr_closed_form():
  rng = np.random.default_rng(4)
  a = rng.random((8, 9, 10))
  b = a + 0.1  # MSE exactly 0.01 -> 20 dB at data_range 1
  assert metrics.mse(a, b) == pytest.approx(0.01, rel=1e-5)
  assert metrics.psnr(a, b) == pytest.approx(20.0, abs=1e-4)
  assert metrics.psnr(a, b, data_range=2.0) == pytest.approx(
      10 * math.log10(4 / 0.01), abs=1e-4)


@settings(deadline=None, max_examples=15)
@given(seed=st.integers(0, 2**31 - 1), fraction=st.floats(0.05, 1.0))
def test_masked_metrics_match_numpy(seed, fraction):
  rng = np.random.default_rng(seed)
  shape = (7, 9, 8)
  a, b = rng.random(shape), rng.random(shape)
  mask = rng.random(shape) < fraction
  mask.flat[rng.integers(mask.size)] = True  # never empty
  d = (a - b)[mask]
  assert metrics.mae(a, b, mask) == pytest.approx(np.abs(d).mean(), rel=1e-5)
  assert metrics.mse(a, b, mask) == pytest.approx((d * d).mean(), rel=1e-5)
  assert metrics.psnr(a, b, mask) == pytest.approx(
      -10 * math.log10((d * d).mean()), abs=1e-4)


def test_evaluate_masked_matches_parts():
  rng = np.random.default_rng(8)
  shape = (12, 14, 13)
  a, b = rng.random(shape), rng.random(shape)
  mask = (rng.random(shape) < 0.5).astype(np.uint8)
  out = metrics.evaluate(jnp.asarray(a), b, mask)
  d = (a - b)[mask != 0]
  assert out["mae"] == pytest.approx(np.abs(d).mean(), rel=1e-5)
  assert out["mse"] == pytest.approx((d * d).mean(), rel=1e-5)
  assert out["psnr"] == pytest.approx(metrics.psnr(a, b, mask), abs=1e-6)
  assert out["ssim"] == pytest.approx(metrics.ssim(a, b, mask != 0), abs=1e-6)


def test_unmasked_metrics_match_numpy_on_jax_input():
  rng = np.random.default_rng(5)
  a, b = rng.random((10, 11, 12)), rng.random((10, 11, 12))
  d = a - b
  assert metrics.mae(jnp.asarray(a), jnp.asarray(b)) == pytest.approx(
      np.abs(d).mean(), rel=1e-5)
  assert metrics.mse(jnp.asarray(a), b) == pytest.approx(
      (d * d).mean(), rel=1e-5)


def test_empty_mask_is_an_error():
  a = np.zeros((4, 4, 4))
  with pytest.raises(InputError, match="no voxels"):
    metrics.mae(a, a, np.zeros(a.shape))


# ---------------------------------------------------------------------------
# Seam score.
# ---------------------------------------------------------------------------
def _checkerboard_offset(volume, plan, offset):
  """Adds ``offset`` inside every other patch (a step at every border)."""
  out = np.array(volume)
  for index in range(plan.num_patches):
    if sum(np.unravel_index(index, plan.grid)) % 2:
      vol, _ = plan.kept_slices(index)
      out[vol] += offset
  return out


@pytest.mark.parametrize("to_array", [np.asarray, jnp.asarray])
def test_seam_score_smooth_volume_and_steps(to_array):
  rng = np.random.default_rng(6)
  shape = (40, 36, 44)
  plan = tiling.make_plan(shape, patch_size=16, border=3)
  assert min(plan.grid) >= 3
  smooth = _smooth(rng, shape, sigma=2.0)
  score = metrics.seam_score(to_array(smooth), plan)
  assert isinstance(score, float)
  assert score == pytest.approx(1.0, abs=0.2)
  stepped = _checkerboard_offset(smooth, plan, 0.1)
  assert metrics.seam_score(to_array(stepped), plan) > 2


def test_seam_score_ramp_and_explicit_boundaries():
  shape = (20, 18, 22)
  z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
  ramp = (z + 2 * y + 0.5 * x) / (20 + 36 + 11)
  plan = tiling.make_plan(shape, patch_size=10, border=2)
  assert metrics.seam_score(ramp, plan) == pytest.approx(1.0, abs=0.2)
  # The plan's borders, given explicitly, give the same score.
  borders = tuple(tuple(lo for lo, _ in r[1:]) for r in plan.keep_in_volume)
  stepped = _checkerboard_offset(ramp, plan, 0.05)
  assert metrics.seam_score(stepped, boundaries=borders) == pytest.approx(
      metrics.seam_score(stepped, plan))
  assert metrics.seam_score(stepped, boundaries=borders) > 2
  # A step only along z, at z = 10, is seen only if z = 10 is a border.
  step = ramp + 0.05 * (z >= 10)
  assert metrics.seam_score(step, boundaries=((10,), (), ())) > 2
  assert metrics.seam_score(step, boundaries=((5,), (), ())) < 1.5


def test_seam_score_is_about_one_for_thick_slices_and_an_unbordered_axis():
  """Axes of different smoothness (thick slices) and an axis with no
  borders: the smooth volume still scores about 1 and the stepped one > 2
  (scores pooled over axes before the ratio gave 0.18 and 0.81 here)."""
  import scipy.ndimage as ndi
  rng = np.random.default_rng(0)
  smooth = ndi.gaussian_filter(rng.random((24, 64, 64)), (0.7, 3, 3))
  plan = tiling.make_plan(smooth.shape, 32, 6)
  borders = _boundaries(plan)
  assert borders[0] == () and borders[1] and borders[2]
  assert metrics.seam_score(smooth, plan) == pytest.approx(1.0, abs=0.15)
  step = 0.5 * smooth.std()
  stepped = _checkerboard_offset(smooth, plan, step)
  assert metrics.seam_score(stepped, plan) > 2
  # Borders on every axis of a volume smooth unlike along each.
  smooth = ndi.gaussian_filter(rng.random((40, 64, 64)), (0.7, 3, 5))
  plan = tiling.make_plan(smooth.shape, 32, 6)
  assert all(_boundaries(plan))
  assert metrics.seam_score(smooth, plan) == pytest.approx(1.0, abs=0.15)


def _boundaries(plan):
  return tuple(tuple(lo for lo, _ in r[1:]) for r in plan.keep_in_volume)


def test_seam_score_single_patch_and_bad_input():
  v = np.random.default_rng(7).random((8, 8, 8))
  assert metrics.seam_score(v, tiling.make_plan(v.shape, 16, 3)) == 1.0
  with pytest.raises(InputError, match="does not match"):
    metrics.seam_score(v, tiling.make_plan((9, 8, 8), 4, 1))
  with pytest.raises(InputError, match="exactly one"):
    metrics.seam_score(v)
  with pytest.raises(InputError, match="not inside"):
    metrics.seam_score(v, boundaries=((8,), (), ()))


def test_evaluate_refuses_volumes_outside_unit_range_or_not_finite():
  # Scanner intensities or int volumes gave meaningless scores (PSNR -34 dB
  # for two close int16 volumes); an inf voxel a "math domain error".
  rng = np.random.default_rng(3)
  a = rng.uniform(0, 1, (12, 12, 12)).astype(np.float32)
  b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1).astype(np.float32)
  ok = metrics.evaluate(a, b)
  assert 0 < ok["ssim"] < 1 and ok["psnr"] > 20
  with pytest.raises(InputError, match=r"pred spans \[0, 999\], not \[0, 1\]"):
    metrics.evaluate((a * 1000).astype(np.int16).clip(0, 1000), b)
  with pytest.raises(InputError, match="target spans"):
    metrics.evaluate(a, b - 0.5)
  metrics.evaluate(a, b + metrics.UNIT_SLACK / 2)  # rounding is let pass
  for bad in (np.inf, np.nan):
    c = b.copy()
    c[1, 2, 3] = bad
    with pytest.raises(InputError, match="target holds non-finite"):
      metrics.evaluate(a, c)
    # The single metrics say so too (no "math domain error", no NaN).
    for fn in (metrics.mae, metrics.mse, metrics.psnr):
      with pytest.raises(InputError, match="non-finite"):
        fn(a, c)
  for rng_ in (0, -1):
    with pytest.raises(InputError, match="data_range must be positive"):
      metrics.ssim(a, b, data_range=rng_)
