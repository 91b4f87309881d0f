"""3D Canny edge sketches, the generators' conditioning input. Host-side.

MEGAN conditions every scale's generator on an edge sketch of the source
volume: Canny edges weighted by the gradient magnitude (not a binary mask),
computed in true 3D. ``skimage.feature.canny`` is 2D only, so the steps are
spelled out here with numpy / scipy.ndimage:

1. Gaussian smoothing (``sigma`` in voxels).
2. Central-difference gradients along the three axes and their magnitude.
3. Non-maximum suppression along the gradient direction, quantised to the
   26 neighbour directions (faces, edges and corners of the
   voxel cube). Quantising (rather than interpolating) keeps the detector
   exactly equivariant to the cube's symmetries (``np.rot90``, ``np.flip``,
   axis transposes), up to floating-point ties, and is fast.
4. Hysteresis thresholding with 26-connectivity, so that thin 3D surfaces
   that are only diagonally connected are still tracked.
5. Sketch = edge mask x gradient magnitude, scaled so the maximum is 1.

Steps 1-3 have two engines (``canny_3d(..., engine=)``, default `ENGINE`):

- ``"jax"``: one jitted kernel per slab of planes (`_slab_kernel`) on JAX's
  default device, the accelerator where there is one; the host cuts the
  next slab while the device works. Device memory is one slab's; nearby
  shapes share a compiled kernel (`compile_canny` compiles it ahead). On a
  2-core Xeon, same process, engines alternating: 512³ 4.5 s against the
  numpy engine's 9.4 s, 256³ 0.56 against 1.03 s (compile ~0.5 s apart).
- ``"numpy"``: scipy.ndimage and numpy on slabs of planes in `EDGE_THREADS`
  threads, each slab with the halo its stencils need, so the result is bit
  for bit the one-thread one. The suppression goes in slabs of
  `SUPPRESS_CHUNK` planes (its gathers' index arrays then stay small) and
  the gradients are written straight into place.

They agree but for voxels within float rounding of a tie: the smoothing is
float32 in JAX, float64 in scipy. Hysteresis is shared and works on the
candidates' indices: where they are sparse (`SPARSE_HYSTERESIS_DENSITY`)
it finds their components among them alone, else it labels slabs in
threads and joins their labels across the cuts.

An optional label (e.g. a tumour) can be written onto the sketch
(:func:`add_label`), and augmented by random scaling and mirroring
(:func:`augment_label`), as in the paper.
"""
import math
import os
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from megan_jax import host_threads
from megan_jax.errors import InputError

_FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)
# The 13 neighbour offsets (dz, dy, dx) that come later in C order; with
# their opposites, the 26 neighbours.
_FORWARD_OFFSETS = tuple((dz, dy, dx) for dz in (0, 1) for dy in (-1, 0, 1)
                         for dx in (-1, 0, 1) if 9 * dz + 3 * dy + dx > 0)
# Threads for `canny_3d`'s smoothing, gradients and non-maximum suppression,
# each on its own slab of planes (scipy.ndimage and numpy release the GIL);
# the result is bit for bit the one-thread result. 1: no threads.
EDGE_THREADS = min(8, os.cpu_count() or 1)
_SLAB_PLANES = 16  # at least this many planes per slab
SUPPRESS_CHUNK = 16  # planes per non-maximum suppression call
_TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default: radius 4 sigma
# Hysteresis finds components among the weak voxels' indices up to this
# fraction of the volume, else labels the whole volume (512³ smooth blobs,
# 0.2 % weak: 0.48 s against 1.2-1.5 s on two threads).
SPARSE_HYSTERESIS_DENSITY = 1 / 256
# Which code runs steps 1-3 by default (`canny_3d`'s ``engine``): "jax"
# (jitted slabs on JAX's default device: the accelerator where there is one)
# or "numpy" (scipy.ndimage and numpy on `EDGE_THREADS` host threads).
ENGINE = "jax"
ENGINES = ("jax", "numpy")
JAX_SLAB_PLANES = {"cpu": 32, "gpu": 128}  # planes per jitted slab call
# What the JAX engine brings back to the host (a GPU experiment; the same
# sketch either way, bit for bit on the CPU; a GPU compiles the passes
# apart, so a magnitude might differ in its last bit there): False, every
# slab's magnitude and local maxima (640 MB at 512³) for the host's
# thresholds; True, a first pass of the slab kernels finds the largest
# magnitude, a second sends back only the candidates' flat indices and
# magnitudes, compacted on the device (8 bytes each, up to twice the count:
# a few MB), when they fit `SPARSE_CAPACITY` of a slab, else that slab's
# dense pair (a noisy volume, 40 % local maxima: every slab, three kernel
# passes). With a mask or quantile thresholds, or slabs of 2³¹ voxels:
# dense.
JAX_SPARSE_TRANSFER = False
SPARSE_CAPACITY = 1 / 16  # of a slab's voxels
_JAX_BUCKET = 16  # slab sides are rounded up to this (fewer compiles)


def _by_slabs(fn, depth: int, chunk: int | None = None) -> None:
  """Calls ``fn(lo, hi)`` over slabs of ``range(depth)`` planes, on up to
  `EDGE_THREADS` threads (one of them this one); each thread's part goes in
  slabs of at most ``chunk`` planes."""
  def part(lo, hi):
    step = hi - lo if not chunk else chunk
    for a in range(lo, hi, step):
      fn(a, min(a + step, hi))
  host_threads.in_parts(part, depth, min(EDGE_THREADS, depth // _SLAB_PLANES),
                        "edges")


def _as_volume(volume, name: str, copy: bool = True) -> np.ndarray:
  """Returns ``volume`` as a finite float32 3D array, or raises InputError;
  ``copy=False``: the input itself where it is float32 already."""
  arr = np.asarray(volume)
  if arr.ndim != 3:
    raise InputError(f"{name}: expected a 3D volume, got shape {arr.shape}")
  if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool
          or _is_float(arr.dtype)) or (
      np.iscomplexobj(arr)):
    raise InputError(f"{name}: expected real numbers, got dtype {arr.dtype}")
  arr = arr.astype(np.float32, copy=copy)
  if not np.all(np.isfinite(arr)):
    raise InputError(f"{name}: contains NaN or infinite values")
  return arr


# Intensity spreads (max - min) float32's squared gradients handle: a
# volume outside, or far off zero for its spread, is rescaled first.
SAFE_SPREAD = (1e-8, 1e8)
SAFE_OFFSET = 1e4  # |min| or |max| up to this many spreads


def _well_scaled(vol: np.ndarray) -> np.ndarray:
  """``vol`` itself, or ``(vol - centre) / spread`` where float32 squared
  gradients would overflow, underflow or drown in an offset. The sketch is
  the same either way (its thresholds and values are relative to the
  largest gradient), so ordinary volumes are untouched, bit for bit."""
  lo, hi = float(vol.min()), float(vol.max())
  spread = hi - lo
  if spread == 0 or (SAFE_SPREAD[0] <= spread <= SAFE_SPREAD[1]
                     and max(abs(lo), abs(hi)) <= SAFE_OFFSET * spread):
    return vol
  centre = 0.5 * (lo + hi)
  out = (vol.astype(np.float64) - centre) / spread
  return out.astype(np.float32)


def _as_mask(mask, shape, name: str) -> np.ndarray:
  """Returns ``mask`` as a bool array of ``shape`` (nonzero = inside)."""
  arr = np.asarray(mask)
  if arr.shape != tuple(shape):
    raise InputError(
        f"{name}: shape {arr.shape} does not match the volume's {tuple(shape)}")
  if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool
          or _is_float(arr.dtype)):
    raise InputError(f"{name}: expected a numeric mask, got dtype {arr.dtype}")
  return arr != 0


def _is_float(dtype) -> bool:
  """Floating point, bfloat16 (ml_dtypes, unknown to numpy) included."""
  import jax.numpy as jnp
  return bool(jnp.issubdtype(dtype, jnp.floating))


def _diff_into(f: np.ndarray, axis: int, out: np.ndarray, lo: int = 0,
               hi: int | None = None) -> None:
  """``np.gradient(f, axis=axis)`` (unit spacing, first-order ends) at
  indices ``lo:hi`` of ``axis``, written into ``out`` (its extent there
  ``hi - lo``) without temporaries. Bit for bit ``np.gradient``'s values."""
  n = f.shape[axis]
  hi = n if hi is None else hi
  take = lambda a, b: (slice(None),) * axis + (slice(a, b),)
  c0, c1 = max(lo, 1), min(hi, n - 1)  # central differences
  if c1 > c0:
    o = out[take(c0 - lo, c1 - lo)]
    np.subtract(f[take(c0 + 1, c1 + 1)], f[take(c0 - 1, c1 - 1)], out=o)
    o *= f.dtype.type(0.5)  # exact: as np.gradient's division by 2
  if lo == 0:
    np.subtract(f[take(1, 2)], f[take(0, 1)], out=out[take(0, 1)])
  if hi == n:
    np.subtract(f[take(n - 1, n)], f[take(n - 2, n - 1)],
                out=out[take(hi - lo - 1, hi - lo)])


def _gradient_into(sub: np.ndarray, lo: int, hi: int,
                   outs: Sequence[np.ndarray]) -> None:
  """``np.gradient(sub)[a][lo:hi]`` into ``outs[a]`` for the three axes."""
  _diff_into(sub, 0, outs[0], lo, hi)
  for axis in (1, 2):
    _diff_into(sub[lo:hi], axis, outs[axis])


def _direction_floor(comps, xp):
  """The smallest absolute gradient component the quantised direction uses
  (`_neighbour_steps`): ``a1`` (a face), ``a2`` (an edge) or 0 (a corner),
  per voxel; ``xp`` is numpy or jax.numpy."""
  # Sorted without a sort; summing a1 + a2 + a3 in this fixed order keeps the
  # scores (hence the choice) invariant to permuting the axes, bit for bit.
  low01, high01 = xp.minimum(comps[0], comps[1]), xp.maximum(comps[0], comps[1])
  a1 = xp.maximum(high01, comps[2])
  a2 = xp.maximum(low01, xp.minimum(high01, comps[2]))
  a3 = xp.minimum(low01, comps[2])
  face = a1
  edge = (a1 + a2) * np.float32(1 / np.sqrt(2))
  corner = (a1 + a2 + a3) * np.float32(1 / np.sqrt(3))
  # The components used are those >= floor: a1 (face), a2 (edge), 0 (corner).
  floor = xp.where(edge >= corner, a2, np.float32(0))
  return xp.where((face >= edge) & (face >= corner), a1, floor)


def _neighbour_steps(grads: Sequence[np.ndarray],
                     strides: Sequence[int]) -> np.ndarray:
  """Flat-index step to the neighbour along each gradient (1D arrays in).

  The gradient direction is quantised to the closest of the 26 neighbour
  directions (largest cosine): the Voronoi cells of those directions on the
  sphere. With ``a1 >= a2 >= a3`` the sorted absolute components, the best
  face, edge and corner directions score ``a1``, ``(a1 + a2) / sqrt(2)`` and
  ``(a1 + a2 + a3) / sqrt(3)``; the winner's offset takes the gradient's signs
  on its one, two or three largest components. (A face never wins with a tie
  for ``a1``, nor an edge with ``a2 == a3``, so this picks one direction.)

  Returns:
    ``sum_i sign(g_i) * strides[i]`` over the components used, int64.
  """
  comps = [np.abs(g) for g in grads]
  floor = _direction_floor(comps, np)
  # Strides < 2**24 are exact in float32; summing there avoids int temporaries.
  dtype = np.float32 if sum(strides) < 2**24 else np.float64
  step = np.zeros(floor.shape, dtype=dtype)
  for g, a, stride in zip(grads, comps, strides):
    step += (a >= floor) * np.copysign(dtype(stride), g)
  return step.astype(np.int64)


def _non_maximum_suppression(magnitude: np.ndarray, grads: Sequence[np.ndarray],
                             select: np.ndarray) -> np.ndarray:
  """Selected voxels whose magnitude is >= both neighbours along the gradient.

  Only the voxels in ``select`` (those that hysteresis could keep) are tested,
  with flat-index gathers: the work scales with the edge candidates, not the
  volume, and nothing loops over voxels. ``>=`` on both sides (as
  ``skimage.feature.canny``) keeps a plateau of equal maxima, e.g. both
  voxels beside a step that lies exactly between them; a strict or one-sided
  test would break the mirror symmetry. Outside the volume the magnitude is
  replicated (as the smoothing's ``nearest`` mode).
  """
  padded = np.pad(magnitude, 1, mode="edge")
  strides = [s // padded.itemsize for s in padded.strides]
  # Boolean indexing and flatnonzero both run in C order, so these line up.
  centre = np.flatnonzero(np.pad(select, 1))
  step = _neighbour_steps([g[select] for g in grads], strides)
  padded = padded.reshape(-1)
  value = padded[centre]
  keep = (value >= padded[centre + step]) & (value >= padded[centre - step])
  out = np.zeros(magnitude.shape, dtype=bool)
  out[select] = keep
  return out


def _round_up(n: int, step: int) -> int:
  return -(-n // step) * step


def _radius(sigma: float) -> int:
  """Half-width of scipy.ndimage's Gaussian kernel (0: no smoothing)."""
  return int(_TRUNCATE * sigma + 0.5) if sigma > 0 else 0


def _gaussian_taps(sigma: float) -> tuple[int, np.ndarray]:
  """Radius and float32 taps of scipy.ndimage's Gaussian kernel."""
  radius = _radius(sigma)
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  taps = np.exp(-0.5 / (sigma * sigma) * x ** 2)
  return radius, (taps / taps.sum()).astype(np.float32)


def _halo(sigma: float) -> int:
  """Planes a slab of the JAX engine needs beyond its own on each side: the
  smoothing's radius, one for the gradient, one for the magnitude's
  neighbours in the suppression, one to replicate it beyond the volume."""
  return _radius(sigma) + 3


def _slab_kernel(sigma: float):
  """Steps 1-3 of `canny_3d` on one slab, as a pure JAX function.

  ``kernel(x, z0, dims) -> (magnitude, local_max)``: ``x`` holds planes
  ``z0 - halo .. z0 + S + halo`` of the volume (rows and columns likewise
  widened by the halo), with the volume's edge values replicated beyond it
  (``mode="nearest"``); ``dims`` is the volume's ``(D, H, W)``. Returns the
  gradient magnitude and whether each voxel is a maximum along its quantised
  gradient direction (`_neighbour_steps`), on the slab's ``S`` planes.
  Positions past ``dims`` are padding: computed, and to be discarded.
  Same arithmetic as the numpy engine but for the smoothing, which runs in
  float32 here (scipy's in float64): magnitudes agree to ~1e-5 of the
  maximum, so a voxel whose test is that close to a tie can go either way.
  """
  import jax
  import jax.numpy as jnp
  radius, taps = _gaussian_taps(sigma) if sigma > 0 else (0, None)

  def trim(v, axis, start, end):  # drops ``start`` and ``end`` planes
    return jax.lax.slice_in_dim(v, start, v.shape[axis] - end, axis=axis)

  def smooth(v, axis):  # correlation with the symmetric taps, 'valid'
    r = radius
    out = taps[r] * trim(v, axis, r, r)
    for k in range(1, r + 1):
      out = out + taps[r - k] * (trim(v, axis, r - k, r + k)
                                 + trim(v, axis, r + k, r - k))
    return out

  def neighbours(v, axis):  # (next, this, previous) of the inner planes
    return trim(v, axis, 2, 0), trim(v, axis, 1, 1), trim(v, axis, 0, 2)

  def coords(n, axis, first):  # coordinates of ``n`` planes along ``axis``
    shape = [1, 1, 1]
    shape[axis] = n
    return first + jax.lax.broadcasted_iota(jnp.int32, shape, axis)

  def kernel(x, z0, dims):
    s = x
    for axis in range(3 if radius else 0):
      s = smooth(s, axis)
    # ``s`` now covers coordinates -3 .. n + 3 on every axis (slab-relative
    # along axis 0: z0 is its coordinate 0).
    grads = []
    for axis in range(3):
      t = s
      for other in range(3):
        if other != axis:
          t = trim(t, other, 1, 1)
      nxt, cur, prv = neighbours(t, axis)
      c = coords(t.shape[axis] - 2, axis, -2 + (z0 if axis == 0 else 0))
      central = (nxt - prv) * np.float32(0.5)  # as np.gradient: -2 .. n + 2
      grads.append(jnp.where(c == 0, nxt - cur,
                             jnp.where(c == dims[axis] - 1, cur - prv,
                                       central)))
    g0, g1, g2 = grads
    magnitude = jnp.sqrt((g0 * g0 + g1 * g1) + g2 * g2)
    # Beyond the volume the magnitude is replicated (np.pad's "edge"): then it
    # covers -1 .. n + 1.
    m = magnitude
    for axis in range(3):
      c = coords(m.shape[axis] - 2, axis, -1 + (z0 if axis == 0 else 0))
      nxt, cur, prv = neighbours(m, axis)
      m = jnp.where(c == -1, nxt, jnp.where(c == dims[axis], prv, cur))
    centre = m[1:-1, 1:-1, 1:-1]
    size = centre.shape
    comps = [jnp.abs(g[2:-2, 2:-2, 2:-2]) for g in grads]
    signs = [jnp.signbit(g[2:-2, 2:-2, 2:-2]) for g in grads]
    # `_neighbour_steps`, per voxel, as an offset code 9 dz + 3 dy + dx;
    # a direction and its opposite test the same two neighbours.
    floor = _direction_floor(comps, jnp)
    code = 0
    for weight, a, neg in zip((9, 3, 1), comps, signs):
      code = code + jnp.where(a >= floor, jnp.where(neg, -weight, weight), 0)
    code = jnp.abs(code)
    local_max = jnp.zeros(size, bool)
    for dz, dy, dx in _FORWARD_OFFSETS:
      ahead = m[1 + dz:1 + dz + size[0], 1 + dy:1 + dy + size[1],
                1 + dx:1 + dx + size[2]]
      behind = m[1 - dz:1 - dz + size[0], 1 - dy:1 - dy + size[1],
                 1 - dx:1 - dx + size[2]]
      local_max = jnp.where(code == 9 * dz + 3 * dy + dx,
                            (centre >= ahead) & (centre >= behind), local_max)
    return centre, local_max

  return kernel


def _jax_geometry(shape, sigma: float, device) -> tuple[int, int, int, int]:
  """``(planes, rows, cols, halo)`` of the JAX engine's slabs for a volume of
  ``shape`` (rows and columns rounded up to `_JAX_BUCKET`, so volumes of
  nearby shapes share one compiled kernel)."""
  depth, h, w = shape
  platform = "cpu" if device.platform == "cpu" else "gpu"
  planes = min(JAX_SLAB_PLANES[platform], _round_up(depth, _JAX_BUCKET))
  return (planes, _round_up(h, _JAX_BUCKET), _round_up(w, _JAX_BUCKET),
          _halo(sigma))


_EXECUTABLES = {}


def _slab_args(geometry, device):
  """Abstract ``(slab, z0, dims)`` arguments of the slab kernels."""
  import jax
  planes, rows, cols, halo = geometry
  x = jax.ShapeDtypeStruct(
      (planes + 2 * halo, rows + 2 * halo, cols + 2 * halo), np.float32,
      sharding=jax.sharding.SingleDeviceSharding(device))
  return (x, jax.ShapeDtypeStruct((), np.int32),
          jax.ShapeDtypeStruct((3,), np.int32))


def _slab_executable(sigma: float, geometry, device):
  """The compiled slab kernel for ``geometry`` on ``device`` (cached)."""
  key = (float(sigma), geometry, device)
  if key not in _EXECUTABLES:
    import jax
    x, scalar, dims = _slab_args(geometry, device)
    _EXECUTABLES[key] = jax.jit(_slab_kernel(sigma)).lower(
        x, scalar, dims).compile()
  return _EXECUTABLES[key]


def _device(device=None):
  """The device the JAX engine runs on: ``device``, or JAX's first local
  one."""
  if device is not None:
    return device
  import jax
  return jax.local_devices()[0]


def compile_canny(shape, sigma: float = 1.0, device=None) -> None:
  """Compiles the JAX engine's kernel for volumes of ``shape`` (on
  ``device``, default JAX's first local one) ahead of the first `canny_3d`
  (which otherwise compiles it then: ~0.6 s on a CPU)."""
  device = _device(device)
  geometry = _jax_geometry(tuple(shape), sigma, device)
  _slab_executable(sigma, geometry, device)
  if JAX_SPARSE_TRANSFER:
    _sparse_executables(sigma, geometry, device)


def _steps_jax(vol: np.ndarray, sigma: float, device=None
               ) -> tuple[np.ndarray, np.ndarray]:
  """Steps 1-3 with the JAX engine: ``(magnitude, local_max)`` volumes.

  Slabs of planes go through `_slab_kernel` on ``device`` (default JAX's
  first local one); the next slab is cut on the host while the device works
  on this one. Device memory is one slab's, whatever the depth.
  """
  import jax
  device = _device(device)
  depth, h, w = vol.shape
  geometry = _jax_geometry(vol.shape, sigma, device)
  planes, rows, cols, halo = geometry
  run = _slab_executable(sigma, geometry, device)
  dims = np.array(vol.shape, np.int32)
  magnitude = np.empty(vol.shape, np.float32)
  local_max = np.empty(vol.shape, bool)
  # Two host buffers in turn: one is refilled only after its slab's results
  # came back (a CPU device may compute on the host buffer itself).
  buffers = [np.empty((planes + 2 * halo, rows + 2 * halo, cols + 2 * halo),
                      np.float32) for _ in range(2)]

  def collect(result, lo):
    n = min(planes, depth - lo)
    m, k = (np.asarray(a) for a in result)
    magnitude[lo:lo + n] = m[:n, :h, :w]
    local_max[lo:lo + n] = k[:n, :h, :w]

  starts = _slab_starts(depth, planes)
  pending = None
  for i, lo in enumerate(starts):
    buf = buffers[i % 2]
    _fill_slab(buf, vol, lo, planes, halo)
    result = run(jax.device_put(buf, device), np.int32(lo), dims)  # async
    if pending is not None:
      collect(*pending)
    pending = (result, lo)
  collect(*pending)
  return magnitude, local_max


def _slab_starts(depth: int, planes: int) -> list[int]:
  """First planes of the JAX engine's slabs (the last may overlap the one
  before it, ending at ``depth``)."""
  return list(range(0, depth - planes, planes)) + [max(depth - planes, 0)]


def _fill_slab(buf: np.ndarray, vol: np.ndarray, lo: int, planes: int,
               halo: int) -> None:
  """Planes ``lo - halo .. lo + planes + halo`` of ``vol`` into ``buf``,
  its edge values replicated beyond the volume (rows and columns too)."""
  depth, h, w = vol.shape
  inner = buf[:, halo:halo + h, halo:halo + w]
  for i, z in enumerate(np.clip(np.arange(lo - halo, lo + planes + halo),
                                0, depth - 1)):
    inner[i] = vol[z]
  buf[:, :halo, halo:halo + w] = buf[:, halo:halo + 1, halo:halo + w]
  buf[:, halo + h:, halo:halo + w] = buf[:, halo + h - 1:halo + h,
                                         halo:halo + w]
  buf[:, :, :halo] = buf[:, :, halo:halo + 1]
  buf[:, :, halo + w:] = buf[:, :, halo + w - 1:halo + w]


def _sparse_kernels(sigma: float, capacity: int):
  """``(peak, candidates)`` slab functions over `_slab_kernel`: the largest
  magnitude of a slab's voxels inside the volume; and, for the threshold
  ``low``, the slab's voxels inside the volume, from its plane ``first``
  on, that are local maxima above ``low``: ``(count, slab-flat indices
  [capacity], magnitudes [capacity])``, indices ascending, the tail past
  ``count`` padding."""
  import jax.numpy as jnp
  kernel = _slab_kernel(sigma)

  def inside(shape, z0, dims, first=0):
    z = z0 + jnp.arange(shape[0])[:, None, None]
    y = jnp.arange(shape[1])[None, :, None]
    x = jnp.arange(shape[2])[None, None, :]
    return (z >= z0 + first) & (z < dims[0]) & (y < dims[1]) & (x < dims[2])

  def peak(x, z0, dims):
    m, _ = kernel(x, z0, dims)
    return jnp.max(jnp.where(inside(m.shape, z0, dims), m, 0.0))

  def candidates(x, z0, dims, low, first):
    m, local_max = kernel(x, z0, dims)
    keep = local_max & (m > low) & inside(m.shape, z0, dims, first)
    flat = keep.reshape(-1)
    (idx,) = jnp.nonzero(flat, size=capacity, fill_value=0)
    return flat.sum(), idx.astype(jnp.int32), m.reshape(-1)[idx]

  return peak, candidates


_SPARSE_EXECUTABLES = {}


def _sparse_executables(sigma: float, geometry, device):
  """The compiled `_sparse_kernels` for ``geometry`` on ``device``."""
  capacity = max(1, int(SPARSE_CAPACITY * geometry[0] * geometry[1]
                        * geometry[2]))
  key = (float(sigma), geometry, device, capacity)
  if key not in _SPARSE_EXECUTABLES:
    import jax
    x, i32, dims = _slab_args(geometry, device)
    f32 = jax.ShapeDtypeStruct((), np.float32)
    peak, cands = _sparse_kernels(sigma, capacity)
    _SPARSE_EXECUTABLES[key] = (
        jax.jit(peak).lower(x, i32, dims).compile(),
        jax.jit(cands).lower(x, i32, dims, f32, i32).compile(), capacity)
  return _SPARSE_EXECUTABLES[key]


def _candidates_jax_sparse(vol: np.ndarray, sigma: float, low_fraction: float,
                           device=None
                           ) -> tuple[float, np.ndarray, np.ndarray]:
  """`JAX_SPARSE_TRANSFER`: ``(peak, idx, values)``, the largest gradient
  magnitude and the sorted flat indices and magnitudes of the voxels that
  are local maxima above ``low_fraction · peak``: what the dense path finds
  with `_steps_jax` and `_keep_above`, bit for bit, from two passes of the
  slab kernels (the volume goes to the device twice; a few MB come back).
  A slab with more candidates than the capacity sends its dense pair."""
  import jax
  device = _device(device)
  depth, h, w = vol.shape
  geometry = _jax_geometry(vol.shape, sigma, device)
  planes, rows, cols, halo = geometry
  peak_fn, cands_fn, capacity = _sparse_executables(sigma, geometry, device)
  dims = np.array(vol.shape, np.int32)
  starts = _slab_starts(depth, planes)
  buffers = [np.empty((planes + 2 * halo, rows + 2 * halo, cols + 2 * halo),
                      np.float32) for _ in range(2)]

  def each_slab(run):  # fills and sends the next slab while one runs
    results = []
    for i, lo in enumerate(starts):
      buf = buffers[i % 2]
      if i >= 2:
        jax.block_until_ready(results[i - 2])  # its buffer is reused now
      _fill_slab(buf, vol, lo, planes, halo)
      results.append(run(jax.device_put(buf, device), np.int32(lo), i))
    return results

  peaks = each_slab(lambda x, lo, i: peak_fn(x, lo, dims))
  peak = float(max(float(p) for p in peaks))
  if peak <= 0:
    return peak, np.zeros(0, np.int64), np.zeros(0, np.float32)
  low = np.float32(low_fraction * peak)
  firsts = [0] + [starts[i - 1] + planes - lo
                  for i, lo in enumerate(starts) if i]
  parts = jax.block_until_ready(each_slab(
      lambda x, lo, i: cands_fn(x, lo, dims, low, np.int32(firsts[i]))))
  idx, values = [], []
  slab = (planes, rows, cols)
  for (count, got, mag), lo, first in zip(parts, starts, firsts):
    count = int(count)
    if count > capacity:  # too many: this slab's dense pair, as before
      buf = buffers[0]  # (the slab's own may alias a refilled buffer)
      _fill_slab(buf, vol, lo, planes, halo)
      m, k = (np.asarray(a) for a in _slab_executable(
          sigma, geometry, device)(jax.device_put(buf, device),
                                   np.int32(lo), dims))
      keep = k & (m > low)
      keep[:first] = False
      keep[:, h:] = False
      keep[:, :, w:] = False
      keep[depth - lo:] = False
      got = np.flatnonzero(keep)
      mag = m.reshape(-1)[got]
    else:
      # Only what was found comes back: the first n >= count entries, n a
      # power of two (one compiled slice per n).
      n = min(capacity, 1 << max(count - 1, 0).bit_length()) if count else 0
      got, mag = (np.asarray(a)[:count] for a in jax.device_get(
          (got[:n], mag[:n])))
    z, rest = np.divmod(got.astype(np.int64), slab[1] * slab[2])
    y, xx = np.divmod(rest, slab[2])
    idx.append(((lo + z) * h + y) * w + xx)
    values.append(np.asarray(mag, np.float32))
  return peak, np.concatenate(idx), np.concatenate(values)


def _label_slabs(weak: np.ndarray):
  """26-connected labels of ``weak``, labelled on slabs of planes in
  `EDGE_THREADS` threads (``ndimage.label`` releases the GIL) and joined
  across the slab boundaries.

  Returns:
    ``(labels, offsets, cuts, total)``: per-slab labels (1.. in each slab,
    0 outside); per plane the offset that makes them unique across slabs;
    the planes where slabs start (but the first); the number of labels. A
    voxel's component is ``join[labels + offsets[plane]]`` with ``join``
    from `_join_slabs`.
  """
  depth = weak.shape[0]
  parts = max(1, min(EDGE_THREADS, depth // _SLAB_PLANES))
  bounds = np.linspace(0, depth, parts + 1).astype(int)
  labels = np.empty(weak.shape, np.int32)
  counts = np.zeros(parts, np.int64)

  def label(first, last):
    for i in range(first, last):
      lo, hi = bounds[i], bounds[i + 1]
      counts[i] = ndimage.label(weak[lo:hi], structure=_FULL_CONNECTIVITY,
                                output=labels[lo:hi])

  host_threads.in_parts(label, parts, parts, "edges")
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  offsets = np.repeat(starts, np.diff(bounds))
  return labels, offsets, bounds[1:-1], int(counts.sum())


def _join_slabs(labels, offsets, cuts, total: int) -> np.ndarray:
  """Component of each of the ``total`` slab labels (index 0: background),
  joining labels that touch (26-connectivity) across the planes at
  ``cuts``."""
  from scipy.sparse import coo_matrix
  from scipy.sparse.csgraph import connected_components
  rows, cols = [], []
  h, w = labels.shape[1:]
  for cut in cuts:
    below = labels[cut - 1] + np.where(labels[cut - 1] > 0,
                                       offsets[cut - 1], 0).astype(np.int32)
    above = labels[cut] + np.where(labels[cut] > 0, offsets[cut],
                                   0).astype(np.int32)
    for dy in (-1, 0, 1):
      for dx in (-1, 0, 1):
        a = below[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
        b = above[max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
        both = (a > 0) & (b > 0)
        rows.append(a[both])
        cols.append(b[both])
  rows, cols = np.concatenate(rows), np.concatenate(cols)
  graph = coo_matrix((np.ones(rows.size, np.int8), (rows, cols)),
                     shape=(total + 1, total + 1))
  return connected_components(graph, directed=False)[1]


def _components_of(idx: np.ndarray, shape) -> np.ndarray:
  """26-connected components of the voxels at the sorted flat indices
  ``idx`` of a ``shape`` volume: per voxel a component number. Work and
  memory scale with the voxels, not the volume: each looks for its 13
  forward neighbours among ``idx`` (binary search), and
  ``scipy.sparse.csgraph`` joins the pairs."""
  from scipy.sparse import coo_matrix
  from scipy.sparse.csgraph import connected_components
  _, h, w = shape
  n = idx.size
  z, rest = np.divmod(idx, h * w)
  y, x = np.divmod(rest, w)
  rows, cols = [], []
  for dz, dy, dx in _FORWARD_OFFSETS:
    inside = (z + dz < shape[0]) & (y + dy >= 0) & (y + dy < h)
    inside &= (x + dx >= 0) & (x + dx < w)
    src = np.flatnonzero(inside)
    target = idx[src] + (dz * h * w + dy * w + dx)
    pos = np.minimum(np.searchsorted(idx, target), n - 1)
    found = idx[pos] == target
    rows.append(src[found])
    cols.append(pos[found])
  rows, cols = np.concatenate(rows), np.concatenate(cols)
  graph = coo_matrix((np.ones(rows.size, np.int8), (rows, cols)),
                     shape=(n, n))
  return connected_components(graph, directed=False)[1]


def _hysteresis_sparse(weak: np.ndarray, magnitude: np.ndarray, high: float
                       ) -> tuple[np.ndarray, np.ndarray]:
  """Hysteresis: which of the ``weak`` voxels (those above the low threshold)
  are 26-connected through weak voxels to one above ``high``.

  ``skimage.filters.apply_hysteresis_threshold`` labels with face
  (6-)connectivity only, which breaks diagonal runs of a thin 3D surface.
  Returns the flat indices of ``weak`` and, per index, whether it is kept
  (`_hysteresis`).
  """
  idx = np.flatnonzero(weak)
  return idx, _hysteresis(idx, magnitude.reshape(-1)[idx], high, weak.shape,
                          weak)


def _hysteresis(idx: np.ndarray, values: np.ndarray, high: float, shape,
                weak: np.ndarray | None = None) -> np.ndarray:
  """Per weak voxel (sorted flat indices ``idx`` of a ``shape`` volume, their
  magnitudes ``values``), whether it is 26-connected through weak voxels to
  one above ``high``. Components come from `_components_of` where the weak
  voxels are at most `SPARSE_HYSTERESIS_DENSITY` of the volume (their
  neighbours looked up among their indices), else from labelling slabs of
  the whole volume (``weak``, the weak voxels as a volume, made from
  ``idx`` where not given)."""
  if idx.size == 0:
    return np.zeros(0, bool)
  size = math.prod(shape)
  if idx.size <= SPARSE_HYSTERESIS_DENSITY * size:
    lab = _components_of(idx, shape)
  else:
    if weak is None:
      weak = np.zeros(shape, bool)
      weak.reshape(-1)[idx] = True
    labels, offsets, cuts, total = _label_slabs(weak)
    plane = shape[1] * shape[2]
    lab = labels.reshape(-1)[idx] + offsets[idx // plane].astype(np.int32)
    if len(cuts):
      lab = _join_slabs(labels, offsets, cuts, total)[lab]
  strong = np.zeros(lab.max() + 1, dtype=bool)
  strong[lab[values > high]] = True
  return strong[lab]


def _smooth_and_differentiate(vol: np.ndarray, sigma: float
                              ) -> tuple[np.ndarray, list[np.ndarray]]:
  """Steps 1-2 with the numpy engine: ``(magnitude, grads)``, on slabs of
  planes in `EDGE_THREADS` threads, bit for bit the one-thread result."""
  depth = vol.shape[0]
  grads = [np.empty_like(vol) for _ in range(3)]
  magnitude = np.empty_like(vol)
  # A slab's planes need the smoothing's radius and one more (the central
  # difference) beyond them; at the volume's ends the slab ends there too,
  # so the boundary handling is the whole volume's.
  halo = _radius(sigma) + 1

  def run(lo: int, hi: int) -> None:
    a, b = max(lo - halo, 0), min(hi + halo, depth)
    sub = vol[a:b]
    if sigma > 0:
      sub = ndimage.gaussian_filter(sub, sigma, mode="nearest",
                                    truncate=_TRUNCATE)
    _gradient_into(sub, lo - a, hi - a, [g[lo:hi] for g in grads])
    m, tmp = magnitude[lo:hi], np.empty(sub[:hi - lo].shape, sub.dtype)
    np.multiply(grads[0][lo:hi], grads[0][lo:hi], out=m)  # (g0² + g1²) + g2²
    for g in grads[1:]:
      np.multiply(g[lo:hi], g[lo:hi], out=tmp)
      m += tmp
    np.sqrt(m, out=m)

  _by_slabs(run, depth)
  return magnitude, grads


def _suppress(magnitude: np.ndarray, grads: Sequence[np.ndarray],
              select: np.ndarray) -> np.ndarray:
  """Step 3 with the numpy engine: `_non_maximum_suppression` of the
  ``select``-ed voxels in slabs of `SUPPRESS_CHUNK` planes, in threads."""
  depth = magnitude.shape[0]
  candidates = np.empty(magnitude.shape, dtype=bool)

  def run(lo: int, hi: int) -> None:
    a, b = max(lo - 1, 0), min(hi + 1, depth)  # neighbours one plane away
    sel = select[a:b].copy()
    sel[:lo - a] = False
    sel[hi - a:] = False
    found = _non_maximum_suppression(magnitude[a:b], [g[a:b] for g in grads],
                                     sel)
    candidates[lo:hi] = found[lo - a:hi - a]

  _by_slabs(run, depth, SUPPRESS_CHUNK)
  return candidates


def _keep_above(keep: np.ndarray, magnitude: np.ndarray, low: float,
                roi: np.ndarray | None) -> np.ndarray:
  """``keep &= (magnitude > low) [& roi]`` in place, `SUPPRESS_CHUNK`
  planes at a time: the temporaries stay small (a whole-volume mask at
  512³ is 134 MB of fresh pages: 0.3 s here, against 0.06 s)."""
  for a in range(0, keep.shape[0], SUPPRESS_CHUNK):
    b = a + SUPPRESS_CHUNK
    keep[a:b] &= magnitude[a:b] > low
    if roi is not None:
      keep[a:b] &= roi[a:b]
  return keep


def canny_3d(volume,
             sigma: float = 1.0,
             low_threshold: float = 0.1,
             high_threshold: float = 0.2,
             *,
             mask=None,
             use_quantiles: bool = False,
             engine: str | None = None,
             device=None) -> np.ndarray:
  """Gradient-weighted 3D Canny edge sketch of a volume.

  Thresholds are relative: by default fractions of the largest gradient
  magnitude (inside ``mask``), so the sketch does not depend on the intensity
  scale; with ``use_quantiles=True`` they are quantiles of the gradient
  magnitude over all voxels (inside ``mask``), as in
  ``skimage.feature.canny``. An edge voxel survives non-maximum suppression,
  has a magnitude above the low threshold, and is 26-connected through such
  voxels to one above the high threshold.

  Args:
    volume: ``[D, H, W]`` real array, every size >= 2, finite values.
    sigma: standard deviation of the Gaussian smoothing, in voxels (0 = none).
    low_threshold: hysteresis low threshold, a fraction of the maximum
      gradient magnitude (or a quantile in [0, 1] with ``use_quantiles``).
    high_threshold: hysteresis high threshold, same units, >= low_threshold
      and < 1 (a strong voxel lies strictly above it: at 1, none would).
    mask: optional ``[D, H, W]`` region of interest (nonzero = inside), e.g. a
      foreground mask. Edges outside are zeroed, and thresholds and the
      scaling use only voxels inside. The volume is smoothed unmasked, so the
      region's own border is an edge only where the volume has one.
    use_quantiles: interpret the thresholds as quantiles (see above).
    engine: what runs steps 1-3 (default `ENGINE`): "jax", jitted slabs on
      JAX's default device (`_steps_jax`); or "numpy", scipy.ndimage on host
      threads, bit for bit independent of their number. They agree but for
      voxels within float rounding of a tie (the smoothing's precision
      differs: float32 in JAX, float64 in scipy).
    device: the ``jax.Device`` the "jax" engine runs on (default JAX's
      first local one; a `Translator` passes its own first device).

  Returns:
    ``[D, H, W]`` float32 sketch in [0, 1]: the gradient magnitude on edge
    voxels, 0 elsewhere, divided by its maximum. All zeros when there are no
    edges (e.g. a constant volume).
  """
  # C order: the slabs below are planes of axis 0, and the non-maximum
  # suppression's flat indices assume C order.
  # Read only: no copy of a float32 C-ordered input (512³: 0.2 s).
  vol = _well_scaled(np.ascontiguousarray(
      _as_volume(volume, "volume", copy=False)))
  if min(vol.shape) < 2:
    raise InputError(
        f"volume: needs at least 2 voxels along each axis, got {vol.shape}")
  roi = (None if mask is None
         else np.ascontiguousarray(_as_mask(mask, vol.shape, "mask")))
  sigma = float(sigma)
  low, high = float(low_threshold), float(high_threshold)
  if not sigma >= 0:
    raise InputError(f"sigma: expected >= 0, got {sigma}")
  # Fractions of the largest magnitude or quantiles. A strong voxel lies
  # strictly above high: at 1 none does, and the sketch would be empty.
  if not 0 <= low <= high < 1:
    raise InputError(f"thresholds: expected 0 <= low <= high < 1, got "
                     f"low={low}, high={high}")

  engine = ENGINE if engine is None else engine
  if engine not in ENGINES:
    raise InputError(f"engine: expected one of {', '.join(ENGINES)}, "
                     f"got {engine!r}")
  if (engine == "jax" and JAX_SPARSE_TRANSFER and roi is None
      and not use_quantiles):
    sketch = _canny_jax_sparse(vol, sigma, low, high, device)
    if sketch is not None:
      return sketch
  if engine == "jax":
    magnitude, local_max = _steps_jax(vol, sigma, device)
  else:
    magnitude, grads = _smooth_and_differentiate(vol, sigma)
  inside = magnitude if roi is None else magnitude[roi]
  if inside.size == 0 or inside.max() <= 0:
    return np.zeros(vol.shape, dtype=np.float32)

  if use_quantiles:
    low, high = np.quantile(inside, [low, high])
  else:
    peak = float(inside.max())
    low, high = low * peak, high * peak

  if engine == "jax":  # in place, slab by slab: no new whole volume
    candidates = _keep_above(local_max, magnitude, low, roi)
  else:
    select = magnitude > low
    if roi is not None:
      select &= roi
    candidates = _suppress(magnitude, grads, select)
  # Candidates are above the low threshold already (``select``). The rest
  # works on the candidates' flat indices (a fraction of a percent of the
  # voxels), not on whole volumes.
  idx, keep = _hysteresis_sparse(candidates, magnitude, high)
  sketch = np.zeros(vol.shape, np.float32)
  values = magnitude.reshape(-1)[idx[keep]]
  if values.size and values.max() > 0:
    sketch.reshape(-1)[idx[keep]] = values / values.max()
  return sketch


def _canny_jax_sparse(vol: np.ndarray, sigma: float, low: float,
                      high: float, device=None) -> np.ndarray | None:
  """`canny_3d` with `JAX_SPARSE_TRANSFER`, no mask, fractions of the
  largest magnitude as thresholds: the same sketch, from the candidates
  the device compacted (`_candidates_jax_sparse`); None where a slab has
  2³¹ voxels or more (the device's int32 indices; the dense path runs)."""
  device = _device(device)
  planes, rows, cols, _ = _jax_geometry(vol.shape, sigma, device)
  if planes * rows * cols >= 2**31:
    return None
  peak, idx, values = _candidates_jax_sparse(vol, sigma, low, device)
  sketch = np.zeros(vol.shape, np.float32)
  if peak <= 0 or idx.size == 0:
    return sketch
  keep = _hysteresis(idx, values, high * peak, vol.shape)
  kept = values[keep]
  if kept.size and kept.max() > 0:
    sketch.reshape(-1)[idx[keep]] = kept / kept.max()
  return sketch


def label_boundary(label) -> np.ndarray:
  """Inner boundary of a label: voxels inside with a face neighbour outside.

  Face (6-)connectivity makes the boundary one voxel thick and closed
  (26-connected). Voxels on the volume border count as boundary too.
  """
  inside = np.asarray(label) != 0
  return inside & ~ndimage.binary_erosion(inside, border_value=0)


def add_label(sketch, label, value: float = 1.0, *,
              interior: float | None = None) -> np.ndarray:
  """Writes a label mask (e.g. a tumour) onto an edge sketch.

  Inside the label the sketch is replaced, not blended: the source's own edges
  there belong to the tissue the lesion displaces. The label's boundary (one
  voxel thick, see :func:`label_boundary`) is set to ``value``, like a strong
  edge, and its interior to the constant ``interior``, which no Canny sketch
  contains over a solid region, so the generator can tell a lesion from an
  outline. Nonzero label voxels are inside (all classes of a multi-class
  label alike).

  Args:
    sketch: ``[D, H, W]`` edge sketch (e.g. from :func:`canny_3d`).
    label: ``[D, H, W]`` mask of the same shape, nonzero = inside.
    value: sketch value on the label's boundary.
    interior: sketch value inside the label; defaults to ``0.5 * value``.

  Returns:
    A new float32 ``[D, H, W]`` sketch; the inputs are not modified.
  """
  out = _as_volume(sketch, "sketch")  # astype copies
  inside = _as_mask(label, out.shape, "label")
  interior = 0.5 * value if interior is None else interior
  out[inside] = interior
  out[label_boundary(inside)] = value
  return out


def augment_label(label,
                  rng: np.random.Generator,
                  scale_range: float = 0.15,
                  mirror: bool = True,
                  *,
                  axes: Sequence[int] = (0,)) -> np.ndarray:
  """The paper's label augmentation: random scaling and mirroring.

  The label is scaled by a factor drawn uniformly from ``[1 - scale_range,
  1 + scale_range]`` about its centre of mass (nearest-neighbour, so label
  values are kept; the shape is unchanged and whatever leaves the volume is
  cut). Then, if ``mirror``, with probability 1/2 it is flipped along one of
  ``axes`` drawn at random: a flip of the whole array, so the lesion moves to
  the mirrored position too. The default ``axes=(0,)`` is left-right for
  volumes in RAS+ voxel order (nibabel's canonical order), the anatomically
  plausible mirror. The same random numbers are drawn whatever the options,
  so a seed gives the same stream.

  Args:
    label: ``[D, H, W]`` label (bool or integer classes; 0 = background).
    rng: the random generator, e.g. ``np.random.default_rng(seed)``.
    scale_range: half-width of the scale interval, in [0, 1).
    mirror: whether to randomly mirror.
    axes: the axes a mirror may flip.

  Returns:
    The augmented label, same shape and dtype as ``label``.
  """
  arr = np.asarray(label)
  if arr.ndim != 3:
    raise InputError(f"label: expected a 3D volume, got shape {arr.shape}")
  if not isinstance(rng, np.random.Generator):
    raise InputError(f"rng: expected a numpy.random.Generator, got {type(rng)}")
  if not 0 <= scale_range < 1:
    raise InputError(f"scale_range: expected in [0, 1), got {scale_range}")
  axes = tuple(int(a) for a in axes)
  if not axes or any(not -3 <= a < 3 for a in axes):
    raise InputError(f"axes: expected a non-empty subset of 0, 1, 2, got {axes}")

  factor = rng.uniform(1.0 - scale_range, 1.0 + scale_range)
  flip = rng.random() < 0.5
  axis = axes[rng.integers(len(axes))]

  inside = arr != 0
  out = arr.copy()
  if inside.any() and factor != 1.0:
    centre = np.array(ndimage.center_of_mass(inside))
    # Output voxel x samples the input at centre + (x - centre) / factor.
    out = ndimage.affine_transform(
        arr, np.full(3, 1.0 / factor), offset=centre - centre / factor,
        order=0, mode="constant", cval=0)
  if mirror and flip:
    out = np.flip(out, axis=axis).copy()
  return out


def edge_pyramid(volumes: Sequence, *, masks: Sequence | None = None,
                 **canny_kwargs) -> list[np.ndarray]:
  """Edge sketches of a volume at each scale (one :func:`canny_3d` per volume).

  ``sigma`` is in voxels of each scale, so the same value smooths each scale
  alike relative to its grid.

  Args:
    volumes: the source volume resampled to each scale, coarse to fine.
    masks: optional per-scale masks (``None`` entries allowed).
    **canny_kwargs: passed to :func:`canny_3d`.

  Returns:
    A list of float32 sketches, one per volume.
  """
  volumes = list(volumes)
  if masks is None:
    masks = [None] * len(volumes)
  masks = list(masks)
  if len(masks) != len(volumes):
    raise InputError(
        f"masks: got {len(masks)} masks for {len(volumes)} volumes")
  return [canny_3d(v, mask=m, **canny_kwargs) for v, m in zip(volumes, masks)]
