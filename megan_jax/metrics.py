"""Image-quality metrics for 3D volumes with intensities in [0, 1].

Written in jax so that big volumes are scored on the device; numpy and jax
inputs are accepted alike and every public function returns Python floats.
Each jitted kernel compiles once per volume shape (and dtype).

* :func:`ssim` is scikit-image's
  ``structural_similarity(a, b, data_range=1, gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False)``: Gaussian-weighted local
  statistics (scipy's ``gaussian_filter`` with ``truncate=3.5`` and
  ``mode="reflect"``), ``K1 = 0.01``, ``K2 = 0.03``, and the mean of the SSIM
  map after cropping ``(win_size - 1) // 2`` voxels from every face.
* :func:`psnr`, :func:`mae`, :func:`mse`: voxel-wise, optionally masked.
* :func:`evaluate`: all four, as the dict that ``megan evaluate`` prints.
* :func:`seam_score`: a measure of our own for the visibility of the patch
  grid in a stitched volume (1.0 = no seams).

Masks are arrays of the volume's shape; nonzero means inside.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from megan_jax.errors import InputError
from megan_jax.tiling import Plan
from megan_jax.types import Array

# scikit-image's constants for Gaussian-weighted SSIM (Wang et al. 2004).
_K1 = 0.01
_K2 = 0.03
_TRUNCATE = 3.5  # gives the 11-tap window of Wang et al. at sigma = 1.5


# ---------------------------------------------------------------------------
# Input checks.
# ---------------------------------------------------------------------------
def _as_volume(x, name: str) -> jax.Array:
  """``x`` as a floating 3D jax array (the default float dtype)."""
  if x is None or np.ndim(x) != 3:
    raise InputError(
        f"{name}: expected a 3D volume [D, H, W], got shape {np.shape(x)}")
  x = jnp.asarray(x)
  if not (jnp.issubdtype(x.dtype, jnp.number) or x.dtype == jnp.bool_) or (
      jnp.issubdtype(x.dtype, jnp.complexfloating)):
    raise InputError(f"{name}: expected real numbers, got dtype {x.dtype}")
  return x.astype(jnp.result_type(float))


def _as_pair(a, b):
  a, b = _as_volume(a, "a"), _as_volume(b, "b")
  if a.shape != b.shape:
    raise InputError(
        f"volumes of different shapes: {tuple(a.shape)} and {tuple(b.shape)}")
  return a, b


def _as_mask(mask, shape) -> jax.Array | None:
  """``mask`` as a float 0/1 array of ``shape``, or None."""
  if mask is None:
    return None
  if np.shape(mask) != tuple(shape):
    raise InputError(
        f"mask: shape {np.shape(mask)} does not match the volumes' "
        f"{tuple(shape)}")
  mask = jnp.asarray(mask)
  if jnp.issubdtype(mask.dtype, jnp.complexfloating):
    raise InputError(f"mask: expected real numbers, got dtype {mask.dtype}")
  return (mask != 0).astype(jnp.result_type(float))


def _finite(value: float, what: str) -> float:
  if not math.isfinite(value):
    raise InputError(f"{what}: the volumes hold non-finite values (NaN or "
                     "inf)")
  return value


def _masked_mean(plane_sums, plane_counts, what: str) -> float:
  """Finishes a mean from per-plane sums, in float64 on the host.

  The device reduces each plane (at most ``H * W`` terms, fine in float32);
  adding the ``D`` plane sums in float64 keeps big volumes accurate.
  """
  total = float(np.sum(np.asarray(plane_sums, np.float64)))
  if plane_counts is None:
    return _finite(total, what)  # divided on the device side (unmasked)
  count = float(np.sum(np.asarray(plane_counts, np.float64)))
  if count == 0:
    raise InputError(f"{what}: the mask selects no voxels")
  return _finite(total / count, what)


# ---------------------------------------------------------------------------
# SSIM.
# ---------------------------------------------------------------------------
def _radius(sigma: float) -> int:
  """scipy.ndimage's Gaussian radius: ``int(truncate * sigma + 0.5)``."""
  return int(_TRUNCATE * sigma + 0.5)


def _gaussian_taps(sigma: float) -> np.ndarray:
  """The 1-D kernel of ``scipy.ndimage.gaussian_filter1d`` (order 0)."""
  r = _radius(sigma)
  x = np.arange(-r, r + 1, dtype=np.float64)
  taps = np.exp(-0.5 / sigma**2 * x**2)
  return taps / taps.sum()


def _filter_axis(x: jax.Array, taps: np.ndarray, axis: int) -> jax.Array:
  """Correlates ``x`` with ``taps`` along ``axis``, scipy ``mode='reflect'``.

  scipy's 'reflect' (``d c b a | a b c d | d c b a``) is numpy's
  'symmetric' padding. Shift-and-add of ``2r + 1`` slices: XLA fuses it into
  one elementwise loop, which beats a general convolution for 11 taps.
  """
  r = (len(taps) - 1) // 2
  pad = [(0, 0)] * x.ndim
  pad[axis] = (r, r)
  xp = jnp.pad(x, pad, mode="symmetric")
  n = x.shape[axis]
  out = None
  for k, w in enumerate(taps):
    term = w * jax.lax.slice_in_dim(xp, k, k + n, axis=axis)
    out = term if out is None else out + term
  return out


def gaussian_filter(x: Array, sigma: float = 1.5) -> jax.Array:
  """Separable 3D Gaussian filter, equal to scipy's with ``truncate=3.5``.

  Args:
    x: ``[..., D, H, W]``; the last three axes are filtered.
    sigma: standard deviation in voxels; every axis needs more than
      ``int(3.5 * sigma + 0.5)`` voxels (one reflection of the border).

  Returns:
    The filtered array, same shape.
  """
  taps = _gaussian_taps(sigma)
  x = jnp.asarray(x)
  for axis in range(x.ndim - 3, x.ndim):
    x = _filter_axis(x, taps, axis)
  return x


@functools.partial(jax.jit, static_argnames=("sigma",))
def _ssim_plane_sums(a, b, mask, data_range, *, sigma):
  """Per-plane sums of the cropped SSIM map (and of the cropped mask).

  Follows ``skimage.metrics.structural_similarity`` step by step; the five
  local moments are filtered together as one stacked array.

  Returns:
    ``(sums, counts)``: ``[D - 2 * pad]`` sums of the SSIM map (times the
    mask) over each cropped plane, and the mask's voxel counts per plane
    (or the plain means over the crop, and None, without a mask).
  """
  moments = gaussian_filter(jnp.stack([a, b, a * a, b * b, a * b]), sigma)
  ux, uy, uxx, uyy, uxy = moments
  vx = uxx - ux * ux
  vy = uyy - uy * uy
  vxy = uxy - ux * uy
  c1 = (_K1 * data_range)**2
  c2 = (_K2 * data_range)**2
  s = ((2 * ux * uy + c1) * (2 * vxy + c2)
       / ((ux * ux + uy * uy + c1) * (vx + vy + c2)))
  pad = _radius(sigma)  # == (win_size - 1) // 2 with win_size = 2r + 1
  crop = (slice(pad, s.shape[0] - pad), slice(pad, s.shape[1] - pad),
          slice(pad, s.shape[2] - pad))
  s = s[crop]
  if mask is None:
    return jnp.sum(s, axis=(1, 2)) / s.size, None
  m = mask[crop]
  return jnp.sum(s * m, axis=(1, 2)), jnp.sum(m, axis=(1, 2))


def ssim(a: Array, b: Array, mask: Array | None = None, *,
         sigma: float = 1.5, data_range: float = 1.0) -> float:
  """Mean structural similarity of two 3D volumes.

  Without a mask this equals ``skimage.metrics.structural_similarity(a, b,
  data_range=data_range, gaussian_weights=True, sigma=sigma,
  use_sample_covariance=False)`` (to float32 rounding).

  Like scikit-image, the SSIM map is cropped by ``pad = int(3.5 * sigma +
  0.5)`` voxels (5 at the default sigma) on every face before averaging, to
  ignore the reflected borders. With a mask, the result is the mean of the
  SSIM map over the mask voxels *inside that crop*: mask voxels within
  ``pad`` of a face are ignored (the local statistics themselves still use
  every voxel, masked or not).

  Args:
    a: ``[D, H, W]`` volume, numpy or jax; intensities span ``data_range``.
    b: same shape as ``a``.
    mask: optional ``[D, H, W]``, nonzero = inside.
    sigma: Gaussian window standard deviation, in voxels.
    data_range: intensity range (1 for [0, 1]); sets SSIM's constants.

  Returns:
    SSIM as a Python float (1.0 for identical volumes).

  Raises:
    InputError: for mismatched shapes, a volume with a side shorter than the
      window ``2 * pad + 1``, or a mask with no voxels inside the crop.
  """
  if not sigma > 0:
    raise InputError(f"sigma must be positive, got {sigma}")
  if not data_range > 0:
    raise InputError(f"data_range must be positive, got {data_range}")
  a, b = _as_pair(a, b)
  win = 2 * _radius(sigma) + 1
  if min(a.shape) < win:
    raise InputError(
        f"volume shape {tuple(a.shape)} is smaller than the SSIM window "
        f"({win} voxels at sigma={sigma}) along some axis")
  mask = _as_mask(mask, a.shape)
  sums, counts = _ssim_plane_sums(a, b, mask, jnp.asarray(data_range, a.dtype),
                                  sigma=float(sigma))
  # SSIM lies in [-1, 1]; float32 rounding can step past (1 + 5e-8 for
  # identical volumes).
  return min(max(_masked_mean(sums, counts, "ssim"), -1.0), 1.0)


# ---------------------------------------------------------------------------
# Voxel-wise metrics.
# ---------------------------------------------------------------------------
@jax.jit
def _error_plane_sums(a, b, mask):
  """Per-plane sums of ``|a - b|`` and ``(a - b)²`` (masked), and counts."""
  d = a - b
  err = jnp.stack([jnp.abs(d), d * d])
  if mask is None:
    return jnp.sum(err, axis=(2, 3)) / a.size, None
  return jnp.sum(err * mask, axis=(2, 3)), jnp.sum(mask, axis=(1, 2))


def _errors(a, b, mask, what: str) -> tuple[float, float]:
  """``(mae, mse)`` of two volumes over ``mask``."""
  a, b = _as_pair(a, b)
  mask = _as_mask(mask, a.shape)
  sums, counts = _error_plane_sums(a, b, mask)
  sums = np.asarray(sums)
  return (_masked_mean(sums[0], counts, what),
          _masked_mean(sums[1], counts, what))


def mae(a: Array, b: Array, mask: Array | None = None) -> float:
  """Mean absolute error over all voxels, or over the nonzero ``mask`` voxels.

  Args:
    a: ``[D, H, W]`` volume, numpy or jax.
    b: same shape.
    mask: optional ``[D, H, W]``, nonzero = inside.

  Returns:
    The MAE as a Python float.
  """
  return _errors(a, b, mask, "mae")[0]


def mse(a: Array, b: Array, mask: Array | None = None) -> float:
  """Mean squared error over all voxels, or over the nonzero ``mask`` voxels.

  Args:
    a: ``[D, H, W]`` volume, numpy or jax.
    b: same shape.
    mask: optional ``[D, H, W]``, nonzero = inside.

  Returns:
    The MSE as a Python float.
  """
  return _errors(a, b, mask, "mse")[1]


def _psnr_from_mse(mse_value: float, data_range: float) -> float:
  # Identical volumes have infinite PSNR; say so without dividing by zero.
  if mse_value <= 0:
    return math.inf
  return 10.0 * math.log10(data_range**2 / mse_value)


def psnr(a: Array, b: Array, mask: Array | None = None,
         data_range: float = 1.0) -> float:
  """Peak signal-to-noise ratio ``10 log10(data_range² / MSE)``, in dB.

  Args:
    a: ``[D, H, W]`` volume, numpy or jax.
    b: same shape.
    mask: optional ``[D, H, W]``; the MSE is taken over its nonzero voxels.
    data_range: the peak-to-peak intensity range (1 for [0, 1]).

  Returns:
    PSNR as a Python float; ``math.inf`` where the MSE is 0.
  """
  if not data_range > 0:
    raise InputError(f"data_range must be positive, got {data_range}")
  return _psnr_from_mse(mse(a, b, mask), data_range)


# How far past [0, 1] `evaluate` lets values go (float rounding).
UNIT_SLACK = 1e-5


def evaluate(pred: Array, target: Array,
             mask: Array | None = None) -> dict[str, float]:
  """All metrics of a prediction against its target, intensities in [0, 1].

  Args:
    pred: ``[D, H, W]`` translated volume, numpy or jax.
    target: ``[D, H, W]`` ground truth.
    mask: optional ``[D, H, W]`` region of interest (nonzero = inside).

  Returns:
    ``{"ssim", "psnr", "mae", "mse"}`` -> Python floats (``psnr`` may be
    ``inf``), ready for ``json.dumps``.

  Raises:
    InputError: for values outside [0, 1] (beyond ``UNIT_SLACK``) or not
      finite: PSNR's peak is 1 and SSIM's constants assume that range.
  """
  for name, v in (("pred", pred), ("target", target)):
    xp = jnp if isinstance(v, jax.Array) else np  # no copy to a device
    lo, hi = float(xp.min(v)), float(xp.max(v))
    if not (math.isfinite(lo) and math.isfinite(hi)):
      raise InputError(f"evaluate: {name} holds non-finite values (NaN or "
                       "inf)")
    if lo < -UNIT_SLACK or hi > 1.0 + UNIT_SLACK:
      raise InputError(
          f"evaluate: {name} spans [{lo:.4g}, {hi:.4g}], not [0, 1] (the "
          "metrics are on [0, 1] intensities: map both volumes with one "
          "range first, e.g. normalise.to_unit of [-1, 1] volumes, or "
          "`megan evaluate --range`)")
  mae_value, mse_value = _errors(pred, target, mask, "evaluate")
  return {
      "ssim": ssim(pred, target, mask),
      "psnr": _psnr_from_mse(mse_value, 1.0),
      "mae": mae_value,
      "mse": mse_value,
  }


# ---------------------------------------------------------------------------
# Seam score.
# ---------------------------------------------------------------------------
@jax.jit
def _second_difference_profiles(v):
  """Per axis, ``sum |v[i-1] - 2 v[i] + v[i+1]|`` over each plane ``i``.

  Returns:
    Three arrays, ``[L_a - 2]`` for axis ``a``: entry ``j`` is the plane
    centred at ``i = j + 1``.
  """
  profiles = []
  for axis in range(3):
    n = v.shape[axis]
    lo = jax.lax.slice_in_dim(v, 0, n - 2, axis=axis)
    mid = jax.lax.slice_in_dim(v, 1, n - 1, axis=axis)
    hi = jax.lax.slice_in_dim(v, 2, n, axis=axis)
    d2 = jnp.abs(lo - 2 * mid + hi)
    others = tuple(x for x in range(3) if x != axis)
    profiles.append(jnp.sum(d2, axis=others))
  return profiles


def _boundaries_from_plan(plan: Plan):
  """The first voxel of every kept range but the first, per axis."""
  return tuple(tuple(lo for lo, _ in ranges[1:])
               for ranges in plan.keep_in_volume)


def _check_boundaries(boundaries, shape):
  if len(boundaries) != 3:
    raise InputError(
        f"boundaries: expected one sequence per axis (3), got {boundaries!r}")
  out = []
  for axis, (bs, n) in enumerate(zip(boundaries, shape)):
    bs = tuple(int(x) for x in bs)
    bad = [x for x in bs if not 0 < x < n]
    if bad:
      raise InputError(
          f"boundaries: positions {bad} on axis {axis} are not inside "
          f"(0, {n})")
    out.append(bs)
  return tuple(out)


def seam_score(volume: Array, plan: Plan | None = None, *,
               boundaries=None, eps: float = 1e-5) -> float:
  """How visible the patch grid is in a stitched volume; 1.0 = no seams.

  A border between kept patch ranges lies between voxels ``b - 1`` and
  ``b``. We use the plain centred second difference
  ``|v[i-1] - 2 v[i] + v[i+1]|`` along each axis and split its planes ``i``
  in two sets:

  * *across a border*: the stencil ``[i-1, i+1]`` straddles a border, i.e.
    ``i`` is ``b - 1`` or ``b`` (a step of height ``h`` at the border gives
    ``h`` at both);
  * *inside patches*: every other plane ``1 <= i <= L - 2``.

  Per axis with borders, the score is the mean over the first set divided
  by the mean over the second, both along that axis; the axes' ratios are
  averaged weighted by their voxels across a border. A smooth volume scores
  about 1 whatever the grid, even when its axes differ in smoothness
  (thick slices) or one has no borders; a step or a kink at the borders
  scores > 1. (Means pooled over the axes before the ratio compared one
  axis's curvature with another's: a smooth volume with 3 mm slices scored
  0.18, the same with seams 0.81.)
  (The four-point ``|v[i+1] - v[i] - v[i-1] + v[i-2]|``, centred exactly on
  the border, is blind to a pure step, which is the most common seam.)

  Args:
    volume: ``[D, H, W]`` stitched volume, numpy or jax.
    plan: the ``tiling.Plan`` it was stitched with; its borders are the
      starts of ``plan.keep_in_volume[axis]`` ranges after the first.
    boundaries: instead of ``plan``: per axis ``(z...), (y...), (x...)``,
      the border positions ``b`` (``0 < b < L``), each meaning a border
      between voxels ``b - 1`` and ``b``.
    eps: added to both means, so that volumes without curvature anywhere
      (constant, linear ramps) score 1 rather than 0/0 or rounding noise.

  Returns:
    The score, a Python float; 1.0 when the grid has no borders.

  Raises:
    InputError: without exactly one of ``plan`` and ``boundaries``, for a
      plan of another shape, or for borders outside the volume.
  """
  v = _as_volume(volume, "volume")
  if (plan is None) == (boundaries is None):
    raise InputError("seam_score needs exactly one of plan and boundaries")
  if plan is not None:
    if tuple(plan.shape) != tuple(v.shape):
      raise InputError(
          f"plan for shape {tuple(plan.shape)} does not match the volume's "
          f"{tuple(v.shape)}")
    boundaries = _boundaries_from_plan(plan)
  boundaries = _check_boundaries(boundaries, v.shape)
  if not any(boundaries):
    return 1.0
  if min(v.shape) < 3:
    raise InputError(
        f"seam_score needs at least 3 voxels per axis, got {tuple(v.shape)}")
  profiles = _second_difference_profiles(v)
  ratios, weights = [], []
  for axis, (profile, bs) in enumerate(zip(profiles, boundaries)):
    if not bs:
      continue
    n = v.shape[axis]
    centres = np.arange(1, n - 1)
    across = np.zeros(n - 2, bool)
    for b in bs:
      across |= (centres == b - 1) | (centres == b)
    if across.all():  # no plane inside a patch along this axis
      continue
    plane = v.size // n
    profile = np.asarray(profile, np.float64) / plane  # per voxel
    ratios.append((profile[across].mean() + eps)
                  / (profile[~across].mean() + eps))
    weights.append(across.sum() * plane)
  if not ratios:
    raise InputError(
        f"seam_score: no planes inside patches for borders {boundaries}")
  return float(np.average(ratios, weights=weights))
