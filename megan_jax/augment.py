"""Training augmentation of the HR inputs: noise, blur, half resolution.

At inference an HR scale sees the *generated* output of the scale below, with
that generator's blur and artefacts, while it trains on the real volume
downsampled. MEGAN hardens each HR GAN against those errors by degrading its
previous-scale input during training (METHOD.md): Gaussian noise on every
patch, a Gaussian blur on 30 % of patches and halved resolution on 20 %. The
edge sketch gets Gaussian noise of sigma 0.01 (the public code) and, as an
option of ours, a random weight per edge voxel (`augment_edges`'s ``gain``).

Everything is pure jax with static shapes, so it runs inside the jitted train
step. Every random choice comes from the explicit key, and each patch gets
its own key (``fold_in(key, i)`` for patch ``i``, or a key per patch from the
caller): a patch's augmentation does not depend on the other patches in the
batch, on how the batch is split over devices, or on which options are on.
"""
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from megan_jax.errors import InputError
from megan_jax.types import Array, PRNGKey

# The paper gives no noise level for the previous-scale input; 0.05 in
# [-1, 1] units (2.5 % of the range) is our choice: visible noise that does
# not bury the structure. Tune it per data set (config), not measured here.
DEFAULT_NOISE_STD = 0.05
DEFAULT_BLUR_PROB = 0.3  # METHOD.md
# Sigma drawn per patch, in voxels of the previous scale: from a slight
# softening to the blur of an upsampled lower scale. Not given by the paper.
DEFAULT_BLUR_SIGMA = (0.5, 1.5)
DEFAULT_HALFRES_PROB = 0.2  # METHOD.md
DEFAULT_EDGE_NOISE_STD = 0.01  # METHOD.md (the public code)
# Kernel radius = int(truncate * sigma + 0.5), as scipy.ndimage.gaussian_filter.
_TRUNCATE = 4.0


# ---------------------------------------------------------------------------
# Per-volume operations on the three leading (spatial) axes.
# ---------------------------------------------------------------------------


def blur_radius(sigma: float, truncate: float = _TRUNCATE) -> int:
  """Kernel radius for a Gaussian of ``sigma`` voxels (scipy's rule)."""
  return int(truncate * float(sigma) + 0.5)


def gaussian_blur(volume: Array, sigma: Array | float, *,
                  radius: int | None = None) -> Array:
  """Separable 3D Gaussian blur of the three leading axes.

  Boundaries use half-sample symmetric extension (scipy's ``mode="reflect"``,
  numpy's ``"symmetric"``); with a normalised, symmetric kernel this keeps
  the sum of the volume exactly, as long as every axis is longer than the
  radius, and a constant volume stays constant. For a fixed sigma the result
  equals ``scipy.ndimage.gaussian_filter(volume, sigma, mode="reflect")``.

  Args:
    volume: ``[D, H, W]`` or ``[D, H, W, ...]`` (trailing axes, e.g. channels,
      are not blurred).
    sigma: standard deviation in voxels, the same along the three axes; may be
      a traced scalar (then ``radius`` must be given).
    radius: static kernel half-width; by default ``blur_radius(sigma)``.

  Returns:
    The blurred volume, same shape and dtype.
  """
  if radius is None:
    radius = blur_radius(sigma)
  if radius < 1:
    return volume
  return _gaussian_blur(volume, jnp.asarray(sigma, jnp.float32), int(radius))


def _reflect_taps(n: int, radius: int) -> np.ndarray:
  """Static 0/1 table ``[2r + 1, n, n]``: output i, tap k reads input j.

  Half-sample symmetric extension (numpy's ``"symmetric"``), repeated for
  radii longer than the axis.
  """
  src = np.pad(np.arange(n), radius, mode="symmetric")
  windows = np.stack([src[k:k + n] for k in range(2 * radius + 1)])
  return (windows[:, :, None] == np.arange(n)).astype(np.float32)


# Jitted with the radius static. Along each axis the blur (boundary included)
# is one n x n matrix, so it runs as three small matmuls: quick to compile
# and to run, also under vmap with a per-patch sigma. Inside a caller's jit
# this is inlined.
@functools.partial(jax.jit, static_argnums=2)
def _gaussian_blur(volume: Array, sigma: Array, radius: int) -> Array:
  taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  weights = jnp.exp(-0.5 * jnp.square(taps / sigma))
  weights = weights / jnp.sum(weights)
  out = volume.astype(jnp.float32)
  for axis in range(3):
    matrix = jnp.einsum("k,kij->ij", weights,
                        _reflect_taps(out.shape[axis], radius))
    out = jnp.moveaxis(
        jnp.tensordot(matrix, out, axes=([1], [axis]),
                      precision=jax.lax.Precision.HIGHEST), 0, axis)
  return out.astype(volume.dtype)


@jax.jit
def half_resolution(volume: Array) -> Array:
  """Halves the resolution of the three leading axes, keeping the shape.

  A 2×2×2 mean pool followed by nearest-neighbour upsampling, i.e. each 2×2×2
  block is replaced by its mean: the blocky look of a volume upsampled from
  half resolution. Odd axes are first extended by repeating their last slice
  (and cropped back). A volume that is already 2× nearest-upsampled comes
  back unchanged.

  Args:
    volume: ``[D, H, W]`` or ``[D, H, W, ...]``.

  Returns:
    An array of the same shape and dtype.
  """
  shape = volume.shape
  pad = [(0, s % 2) for s in shape[:3]] + [(0, 0)] * (volume.ndim - 3)
  x = jnp.pad(volume.astype(jnp.float32), pad, mode="edge")
  d, h, w = x.shape[:3]
  rest = x.shape[3:]
  x = x.reshape((d // 2, 2, h // 2, 2, w // 2, 2) + rest).mean(axis=(1, 3, 5))
  for axis in range(3):
    x = jnp.repeat(x, 2, axis=axis)
  return x[: shape[0], : shape[1], : shape[2]].astype(volume.dtype)


# ---------------------------------------------------------------------------
# Batched augmentations.
# ---------------------------------------------------------------------------


def _normal(key: PRNGKey, shape: Sequence[int], dtype) -> Array:
  """Standard normal noise, drawn flat and reshaped.

  Same distribution as ``jax.random.normal(key, shape)``; a flat draw keeps
  XLA's CPU compile time low (measured with jax 0.10: a 3D draw of 4x8^3
  took 1-2 s to compile, a flat one 0.3 s).
  """
  return jax.random.normal(key, (int(np.prod(shape)),), dtype).reshape(shape)


def _is_key_batch(key: PRNGKey) -> bool:
  """Whether ``key`` is one key or a batch of keys (decided statically)."""
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key.ndim == 1
  return key.ndim == 2  # raw uint32 keys: (2,) one, (B, 2) a batch


def patch_keys(key: PRNGKey, batch_size: int) -> PRNGKey:
  """One key per patch: ``fold_in(key, i)``, or ``key`` if already a batch.

  Folding in the index (instead of ``split(key, B)``) makes the key of patch
  ``i`` independent of the batch size.

  Args:
    key: a PRNG key, or a batch of ``batch_size`` keys (used as they are).
    batch_size: the number of patches.

  Returns:
    A batch of ``batch_size`` keys.
  """
  if _is_key_batch(key):
    if key.shape[0] != batch_size:
      raise ValueError(
          f"got {key.shape[0]} keys for a batch of {batch_size} patches")
    return key
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(
      jnp.arange(batch_size, dtype=jnp.uint32))


def _check_batch(x: Array, name: str) -> None:
  if x.ndim not in (4, 5):
    raise ValueError(
        f"{name} must be [B, D, H, W] or [B, D, H, W, C], got shape {x.shape}")


def _check_prob(value: float, name: str) -> float:
  value = float(value)
  if not 0.0 <= value <= 1.0:
    raise InputError(f"{name} must be a probability in [0, 1], got {value}")
  return value


def _sigma_range(blur_sigma: float | Sequence[float]) -> tuple[float, float]:
  lo, hi = (blur_sigma, blur_sigma) if np.isscalar(blur_sigma) else blur_sigma
  lo, hi = float(lo), float(hi)
  if not 0.0 < lo <= hi:
    raise InputError(
        f"blur_sigma must be a positive sigma or a range (lo, hi) with "
        f"0 < lo <= hi, got {blur_sigma}")
  return lo, hi


def augment_previous(
    key: PRNGKey,
    x: Array,
    *,
    noise_std: float = DEFAULT_NOISE_STD,
    blur_prob: float = DEFAULT_BLUR_PROB,
    blur_sigma: float | Sequence[float] = DEFAULT_BLUR_SIGMA,
    halfres_prob: float = DEFAULT_HALFRES_PROB,
) -> Array:
  """Degrades previous-scale patches as a lower scale's errors would.

  Per patch, in this order: a Gaussian blur with probability ``blur_prob``
  (sigma uniform in ``blur_sigma``); half resolution with probability
  ``halfres_prob`` (independent of the blur, so both can happen); additive
  Gaussian noise of ``noise_std`` on every patch; clipping to [-1, 1]. Noise
  comes last so that blur and pooling do not smooth it away.

  Defaults: ``blur_prob=0.3`` and ``halfres_prob=0.2`` are the paper's. The
  paper gives neither the noise level nor the blur sigma on this input: the
  defaults 0.05 (in [-1, 1] units) and sigma in [0.5, 1.5] voxels are our
  choices, not the paper's.

  Args:
    key: a PRNG key, or one key per patch (see `patch_keys`).
    x: ``[B, D, H, W]`` or ``[B, D, H, W, C]`` patches in [-1, 1].
    noise_std: standard deviation of the additive noise (0 turns it off).
    blur_prob: probability that a patch is blurred.
    blur_sigma: a fixed sigma in voxels or a range ``(lo, hi)`` to draw from.
    halfres_prob: probability that a patch's resolution is halved.

  Returns:
    Augmented patches, same shape and dtype as ``x``, in [-1, 1].
  """
  x = jnp.asarray(x)
  _check_batch(x, "x")
  blur_prob = _check_prob(blur_prob, "blur_prob")
  halfres_prob = _check_prob(halfres_prob, "halfres_prob")
  if noise_std < 0:
    raise InputError(f"noise_std must be >= 0, got {noise_std}")
  sigma_lo, sigma_hi = _sigma_range(blur_sigma)
  return _augment_previous(key, x, float(noise_std), blur_prob, sigma_lo,
                           sigma_hi, halfres_prob)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _augment_previous(key, x, noise_std, blur_prob, sigma_lo, sigma_hi,
                      halfres_prob):
  radius = blur_radius(sigma_hi)

  def one(k, v):
    # A fixed split, whatever is switched on: turning one option off does
    # not change the random draws of the others.
    k_blur, k_sigma, k_half, k_noise = jax.random.split(k, 4)
    if blur_prob > 0:
      sigma = jax.random.uniform(k_sigma, (), jnp.float32, sigma_lo, sigma_hi)
      blurred = _gaussian_blur(v, sigma, radius) if radius >= 1 else v
      v = jnp.where(jax.random.bernoulli(k_blur, blur_prob), blurred, v)
    if halfres_prob > 0:
      v = jnp.where(jax.random.bernoulli(k_half, halfres_prob),
                    half_resolution(v), v)
    if noise_std > 0:
      noise = _normal(k_noise, v.shape, v.dtype)
      v = v + jnp.asarray(noise_std, v.dtype) * noise
    return jnp.clip(v, -1.0, 1.0)

  return jax.vmap(one)(patch_keys(key, x.shape[0]), x)


def augment_edges(key: PRNGKey, e: Array,
                  std: float = DEFAULT_EDGE_NOISE_STD,
                  gain: float = 0.0) -> Array:
  """Re-weights and noises edge-sketch patches.

  Each value is first multiplied by its own factor drawn uniformly from
  ``[1 - gain, 1 + gain]`` (``gain`` 0, the paper: none), then Gaussian noise
  of ``std`` (0.01 in the public code) is added. The gain is our addition:
  the sketch of a volume from another domain has its edges where the
  target's would be but weighted by *that* domain's gradients, and a
  network trained on one volume's exact weights reads them poorly; jittered
  weights make it read where the edges are and roughly how strong (measured
  on the demo: `configs.demo`'s note).

  The result is not clipped: the noise stays zero-mean on the empty
  background (where a clip would turn it into a positive bias), and the
  network never needs the sketch to stay inside its nominal range.

  Args:
    key: a PRNG key, or one key per patch (see `patch_keys`).
    e: ``[B, D, H, W]`` or ``[B, D, H, W, C]`` edge patches.
    std: standard deviation of the noise.
    gain: half-width of the per-voxel weight factor, in [0, 1].

  Returns:
    The augmented patches, same shape and dtype. With ``gain`` 0 the noise is
    the same as without the argument (same keys).
  """
  e = jnp.asarray(e)
  _check_batch(e, "e")
  if std < 0:
    raise InputError(f"edge noise std must be >= 0, got {std}")
  if not 0.0 <= gain <= 1.0:
    raise InputError(f"edge gain must be in [0, 1], got {gain}")
  if std == 0 and gain == 0:
    return e
  return _augment_edges(key, e, float(std), float(gain))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _augment_edges(key, e, std, gain):
  def one(k, v):
    if gain:
      u = jax.random.uniform(jax.random.fold_in(k, 1), (v.size,), v.dtype,
                             1.0 - gain, 1.0 + gain).reshape(v.shape)
      v = v * u
    if std:
      v = v + jnp.asarray(std, v.dtype) * _normal(k, v.shape, v.dtype)
    return v

  return jax.vmap(one)(patch_keys(key, e.shape[0]), e)


def augment_batch(
    key: PRNGKey,
    batch: Mapping[str, Array],
    *,
    previous: str | None = "previous",
    edges: str | None = "edges",
    edge_noise_std: float = DEFAULT_EDGE_NOISE_STD,
    edge_gain: float = 0.0,
    **previous_kwargs: Any,
) -> dict[str, Array]:
  """Augments the previous-scale and edge entries of a batch dict.

  Args:
    key: a PRNG key; split into one for each entry.
    batch: a dict of ``[B, D, H, W(, C)]`` arrays; other entries pass through.
    previous: the entry to degrade with `augment_previous` (None: none).
    edges: the entry to noise with `augment_edges` (None: none).
    edge_noise_std: the edge noise sigma.
    edge_gain: the edge weight jitter (`augment_edges`).
    **previous_kwargs: keyword arguments of `augment_previous`.

  Returns:
    A new dict with the augmented entries.
  """
  for name in (previous, edges):
    if name is not None and name not in batch:
      raise KeyError(f"batch has no entry {name!r}; it has {sorted(batch)}")
  k_prev, k_edges = jax.random.split(key)
  out = dict(batch)
  if previous is not None:
    out[previous] = augment_previous(k_prev, batch[previous], **previous_kwargs)
  if edges is not None:
    out[edges] = augment_edges(k_edges, batch[edges], edge_noise_std,
                               edge_gain)
  return out
