"""Patch grid: cut a volume into fixed-size patches and stitch their centres.

This is what keeps device memory independent of the volume size: every HR
network sees ``patch_size³`` voxels, however large the volume. All functions
are pure and work alike on numpy arrays (returning numpy) and on jax arrays
(returning jax; jit-able with the plan as a static argument, e.g.
``jax.jit(extract, static_argnames="plan")``).

Geometry, per axis of length ``L``, with patch size ``p``, border ``b`` and
centre ``c = p - 2b``:

* ``L <= p``: a single patch starting at 0. The volume is padded at the high
  end with background up to ``p``; the patch keeps ``[0, L)``.
* ``L > p``: ``n = 1 + ceil((L - p) / c)`` patches. Patch ``i < n - 1`` starts
  at ``i * c``; the last one starts at ``L - p`` (so it never needs padding).
  Patch 0 keeps ``[0, b + c)`` of the volume (untrimmed at the volume's low
  edge), an interior patch ``i`` keeps ``[i*c + b, i*c + b + c)``, and the last
  keeps from where its predecessor stopped up to ``L`` (untrimmed at the high
  edge; it always trims at least ``b`` voxels on its low side).

Kept ranges abut exactly, so every output voxel comes from exactly one patch,
with no blending (averaging overlaps blurs); a patch is left untrimmed only on
the sides that touch the volume's edge, where no neighbour could supply those
voxels. Patches are numbered in C order over the ``(z, y, x)`` grid.

HR conditioning (the previous-scale patch): for an output patch starting at
``s`` (per axis) at scale ``k``, the network also sees ``p³`` voxels of the
scale ``k - 1`` volume, padded with ``p // 4`` voxels of background on every
side, starting at ``floor(s / 2)`` in that padded volume. That patch covers
twice the output patch's field of view, centred on it: its centre half
``[p/4, 3p/4)`` per axis lies under the output patch.
"""
import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from megan_jax import host_threads
from megan_jax.errors import InputError
from megan_jax.types import BACKGROUND, Array, Shape3, as_shape3

Range = tuple[int, int]

# Host threads for cutting batches of numpy patches (the copies release
# the GIL). On a 2-core Xeon, 2 threads cut a 256³ volume into 32-patch
# batches in 34 ms instead of 53. Set to 1 for one thread.
HOST_THREADS = min(4, os.cpu_count() or 1)
# Threads for `stitch_into`. An output volume is usually new, so the stitch
# is what first touches its pages; two threads faulting pages in at once
# were slower than one here (256³ round trip in 32-patch batches, median of
# 5: 85-113 ms with one stitch thread, 100-126 ms with two; into memory
# touched before, two gave 27 ms against 33). Raise it for outputs written
# more than once.
STITCH_THREADS = 1
_THREADED_VOXELS = 1 << 18  # batches smaller than this stay on one thread


def _in_parallel(fn, count: int, voxels: int, threads: int | None = None
                 ) -> None:
  """Calls ``fn(lo, hi)`` on ``threads`` (default `HOST_THREADS`)
  contiguous parts of ``range(count)`` (one of them on this thread), or
  once on all of it when the batch is small (``voxels`` in all)."""
  workers = HOST_THREADS if threads is None else threads
  if voxels < _THREADED_VOXELS:
    workers = 1
  host_threads.in_parts(fn, count, workers, "cut")


@dataclasses.dataclass(frozen=True)
class Plan:
  """The patch grid of one volume shape; static ints only, so it is hashable.

  Attributes:
    shape: the volume's spatial shape ``(D, H, W)``.
    patch_size: patch side length ``p``.
    border: voxels trimmed from each patch side that does not touch the
      volume's edge.
    starts: per axis, the start of each patch along that axis (volume coords).
    keep_in_patch: per axis, the kept ``[lo, hi)`` range of each patch, in
      patch coordinates.
    keep_in_volume: per axis, the same ranges in volume coordinates; they
      partition ``[0, L)``.
  """
  shape: Shape3
  patch_size: int
  border: int
  starts: tuple[tuple[int, ...], ...]
  keep_in_patch: tuple[tuple[Range, ...], ...]
  keep_in_volume: tuple[tuple[Range, ...], ...]

  @property
  def grid(self) -> Shape3:
    """Patches per axis."""
    return tuple(len(s) for s in self.starts)

  @property
  def num_patches(self) -> int:
    return math.prod(self.grid)

  def kept_slices(self, index: int):
    """Where patch ``index`` lands in the volume.

    Returns:
      ``(volume_slices, patch_slices)``, each a tuple of three slices, such
      that ``volume[volume_slices] = patch[patch_slices]`` writes its kept part.
    """
    pos = np.unravel_index(int(index), self.grid)
    vol = tuple(slice(*self.keep_in_volume[a][i]) for a, i in enumerate(pos))
    pat = tuple(slice(*self.keep_in_patch[a][i]) for a, i in enumerate(pos))
    return vol, pat


def _axis_geometry(length: int, p: int, b: int):
  """Starts and kept ranges (volume coords) along one axis."""
  if length <= p:
    return (0,), ((0, length),)
  c = p - 2 * b
  n = 1 + -(-(length - p) // c)
  starts = [i * c for i in range(n - 1)] + [length - p]
  keep = [(0, b + c)]
  keep += [(i * c + b, i * c + b + c) for i in range(1, n - 1)]
  keep.append((keep[-1][1], length))
  return tuple(starts), tuple(keep)


def _as_int(name: str, value) -> int:
  try:
    whole = not isinstance(value, bool) and int(value) == value
  except (TypeError, ValueError):  # "auto", None, ...
    whole = False
  if not whole:
    raise InputError(f"{name} must be an integer, got {value!r}")
  return int(value)


def _check_threads(threads) -> None:
  if threads is not None and _as_int("threads", threads) < 1:
    raise InputError(f"threads must be None or >= 1, got {threads!r}")


def make_plan(shape, patch_size: int = 32, border: int = 6) -> Plan:
  """Lays the patch grid over a volume of spatial shape ``shape``.

  Args:
    shape: ``(D, H, W)`` (any positive sizes) or one int for a cube.
    patch_size: patch side ``p`` (>= 1).
    border: voxels trimmed per interior patch side; ``2 * border < patch_size``
      so each patch keeps a non-empty centre.

  Returns:
    The ``Plan``; see the module docstring for the geometry.
  """
  shape = as_shape3(shape)
  p = _as_int("patch_size", patch_size)
  b = _as_int("border", border)
  if p < 1 or b < 0 or 2 * b >= p:
    raise InputError(
        f"need patch_size >= 1, border >= 0 and 2 * border < patch_size, got "
        f"patch_size={patch_size}, border={border}")
  geometry = [_axis_geometry(length, p, b) for length in shape]
  starts = tuple(g[0] for g in geometry)
  keep_in_volume = tuple(g[1] for g in geometry)
  keep_in_patch = tuple(
      tuple((lo - s, hi - s) for s, (lo, hi) in zip(st, kv))
      for st, kv in zip(starts, keep_in_volume))
  return Plan(shape, p, b, starts, keep_in_patch, keep_in_volume)


# ---------------------------------------------------------------------------
# Helpers shared by the numpy and jax paths.
# ---------------------------------------------------------------------------
def _xp(x):
  """numpy for host arrays (memmaps included), jax.numpy for anything else."""
  return np if isinstance(x, np.ndarray) else jnp


def _check_volume(volume, shape: Shape3, what: str = "volume"):
  if not hasattr(volume, "ndim"):
    raise TypeError(f"{what}: a numpy or jax array, got "
                    f"{type(volume).__name__}")
  if volume.ndim not in (3, 4) or tuple(volume.shape[:3]) != tuple(shape):
    raise ValueError(
        f"{what} of shape {tuple(volume.shape)} does not match the expected "
        f"spatial shape {tuple(shape)} ([D, H, W] or [D, H, W, C])")


def _take(volume, idx, check):
  """Gathers ``volume[idx]``, masking indices outside the volume.

  Args:
    volume: ``[D, H, W]`` or ``[D, H, W, C]``.
    idx: three mutually broadcastable integer index arrays.
    check: per axis, whether ``idx`` may leave ``[0, L)`` (static), so only
      those axes pay for clipping and masking.

  Returns:
    ``(values, mask)``: the gathered values (indices clipped into range) and
    the in-range mask, or None when no axis was checked.
  """
  xp = _xp(volume)
  mask, clipped = None, []
  for a in range(3):
    i = idx[a]
    if check[a]:
      n = volume.shape[a]
      ok = (i >= 0) & (i < n)
      mask = ok if mask is None else mask & ok
      i = xp.clip(i, 0, n - 1)
    clipped.append(i)
  out = volume[tuple(clipped)]
  if xp is np:
    out = np.asarray(out)  # a memmap's fancy index is a copy; drop the subclass
  if mask is not None and volume.ndim == 4:
    mask = mask[..., None]
  return out, mask


def _fill(values, mask, pad_value):
  if mask is None:
    return values
  xp = _xp(values)
  return xp.where(mask, values, xp.asarray(pad_value, dtype=values.dtype))


def _out_buffer(out, shape, dtype) -> np.ndarray:
  """``out`` checked to be a writable C-contiguous numpy ``shape`` of
  ``dtype``, or a new one when None."""
  if out is None:
    return np.empty(shape, dtype)
  if (not isinstance(out, np.ndarray) or out.shape != tuple(shape)
      or out.dtype != dtype or not out.flags.c_contiguous
      or not out.flags.writeable):
    got = (f"{type(out).__name__} {getattr(out, 'shape', '')} "
           f"{getattr(out, 'dtype', '')}")
    raise ValueError(f"out must be a writable C-contiguous numpy array of "
                     f"shape {tuple(shape)} and dtype {np.dtype(dtype)}, "
                     f"got {got}")
  return out


def _numpy_only(out, host_cut: bool) -> None:
  """``out=`` is only for the per-patch host cut (`_cut_numpy`)."""
  if out is not None and not host_cut:
    raise ValueError("out= needs a numpy volume and numpy indices (a batch "
                     "cut from a jax array is a new jax array)")


class _Interface:
  """Holds an ``__array_interface__`` (and its memory's owner) for
  `_rows`."""

  def __init__(self, interface: dict, owner):
    self.__array_interface__ = interface
    self.owner = owner


def _rows(a: np.ndarray, axis: int, n: int) -> np.ndarray | None:
  """A view of ``a`` whose elements are runs of ``n`` entries along
  ``axis`` (with everything after it): shape ``a.shape[:axis] +
  (a.shape[axis] - n + 1,)``, one opaque (void) element starting at every
  position, or None where those runs are not contiguous in memory.

  numpy copies a strided array row by row with a fixed cost per row; rows
  of 32 floats (a 32³ patch) pay it 1024 times a patch. Copying the same
  bytes as void elements moves that loop into numpy's inner loop: a 256³
  cut in 32-patch batches went from 50 to 42 ms (2-core Xeon, one thread).
  """
  a = np.asarray(a)
  inner = a.shape[axis + 1:]
  step = a.itemsize
  for size, stride in zip(inner[::-1], a.strides[axis + 1:][::-1]):
    if size > 1 and stride != step:
      return None
    step *= size
  if a.shape[axis] < n or (n > 1 and a.strides[axis] != step):
    return None
  interface = {
      "version": 3,
      "shape": a.shape[:axis] + (a.shape[axis] - n + 1,),
      "strides": a.strides[:axis + 1],
      "typestr": f"|V{n * step}",
      "data": (a.__array_interface__["data"][0], not a.flags.writeable),
  }
  return np.asarray(_Interface(interface, a))


def _cut_numpy(volume: np.ndarray, starts: np.ndarray, p: int,
               pad_value, out: np.ndarray | None = None,
               threads: int | None = None) -> np.ndarray:
  """``[B, p, p, p(, C)]`` cubes of a host volume starting at ``starts``
  (``[B, 3]``, may lie partly or wholly outside: those voxels get
  ``pad_value``).

  One slice copy per patch: 3-4× faster than the separable fancy-index gather
  on the host (measured on 256³ in 32-patch batches: 0.15 s vs 0.57 s for a
  whole cut-and-stitch round trip), and a memmap reads only the patch's
  pages. Which patches lie wholly inside is decided for the batch at once, so
  those (all of them, for an output plan on a volume at least one patch
  wide) cost no per-axis Python. Consecutive inside patches of one grid row
  (same z and y, x advancing by a constant step) go in one copy through a
  strided view: numpy then holds the GIL once per row of patches instead of
  once per patch, which is what lets two threads cut at once (256³ round
  trip over 2 threads: 83 → 67 ms). The batch is split over ``threads``
  threads (default `HOST_THREADS`; `_in_parallel`). A vectorised gather
  (fancy indexing over a strided window view) was 2× slower: numpy copies it
  element by element.
  """
  starts = np.asarray(starts).reshape(-1, 3)
  shape = volume.shape[:3]
  out = _out_buffer(out, (len(starts), p, p, p) + tuple(volume.shape[3:]),
                    volume.dtype)
  inside = np.all((starts >= 0) & (starts + p <= np.asarray(shape)), axis=1)
  starts, inside = starts.tolist(), inside.tolist()
  src_rows, dst_rows = _rows(volume, 2, p), _rows(out, 3, p)
  rows = src_rows is not None and dst_rows is not None
  if rows:
    dst_rows = dst_rows[..., 0]

  def run_length(j: int, stop: int) -> tuple[int, int]:
    """How many patches from ``j`` on form one row of inside patches, and
    their x step."""
    z, y, x = starts[j]
    if j + 1 >= stop or not inside[j + 1]:
      return 1, 0
    z1, y1, x1 = starts[j + 1]
    d = x1 - x
    if z1 != z or y1 != y or d <= 0:
      return 1, 0
    n = 2
    while (j + n < stop and inside[j + n]
           and starts[j + n] == [z, y, x + n * d]):
      n += 1
    return n, d

  def cut(first: int, stop: int) -> None:
    j = first
    while j < stop:
      z, y, x = starts[j]
      if inside[j]:
        n, d = run_length(j, stop) if rows else (1, 0)
        if n > 1:
          run = src_rows[z:z + p, y:y + p, x:x + (n - 1) * d + 1:d]
          np.copyto(dst_rows[j:j + n], np.moveaxis(run, 2, 0))
        elif rows:
          dst_rows[j] = src_rows[z:z + p, y:y + p, x]
        else:
          out[j] = volume[z:z + p, y:y + p, x:x + p]
        j += n
        continue
      src, dst, empty = [], [], False
      for a, st in enumerate((z, y, x)):
        lo, hi = max(st, 0), min(st + p, shape[a])
        if hi <= lo:
          empty = True
          break
        src.append(slice(lo, hi))
        dst.append(slice(lo - st, hi - st))
      out[j] = pad_value
      if not empty:
        out[(j, *dst)] = volume[tuple(src)]
      j += 1

  _in_parallel(cut, len(starts), out.size, threads)
  return out


def _patch_indices(plan: Plan, indices, xp):
  """Per-axis grid positions ``[B]`` of flat patch ``indices``."""
  indices = xp.asarray(indices)
  if indices.ndim != 1:
    raise ValueError(f"indices must be 1D, got shape {indices.shape}")
  # Concrete ones, numpy or JAX; traced JAX indices cannot be checked
  # (out-of-range ones clamp).
  concrete = xp is np or not isinstance(indices, jax.core.Tracer)
  if concrete and indices.size and (int(indices.min()) < 0 or
                                    int(indices.max()) >= plan.num_patches):
    raise ValueError(
        f"patch indices must lie in [0, {plan.num_patches}), got "
        f"{indices.min()}..{indices.max()}")
  _, ny, nx = plan.grid
  return indices // (ny * nx), (indices // nx) % ny, indices % nx


# ---------------------------------------------------------------------------
# Extraction and stitching.
# ---------------------------------------------------------------------------
def extract(volume: Array, plan: Plan, pad_value: float = BACKGROUND) -> Array:
  """Cuts every patch of ``plan`` out of ``volume``.

  One gather with separable per-axis indices; no Python loop over patches.

  Args:
    volume: ``[D, H, W]`` or ``[D, H, W, C]``, numpy or jax.
    plan: from ``make_plan(volume.shape[:3], ...)``.
    pad_value: fills the voxels of patches beyond the volume (axes shorter
      than the patch).

  Returns:
    ``[N, p, p, p]`` (or ``[N, p, p, p, C]``), same array type as ``volume``.
  """
  _check_volume(volume, plan.shape)
  p = plan.patch_size
  ar = np.arange(p)
  # [n_a, p] per axis, on axes (a, 3 + a) of a [nz, ny, nx, p, p, p] grid.
  idx = []
  for a in range(3):
    i = np.asarray(plan.starts[a])[:, None] + ar
    shape = [1] * 6
    shape[a], shape[3 + a] = i.shape
    idx.append(i.reshape(shape))
  check = [n < p for n in plan.shape]
  out, mask = _take(volume, idx, check)
  out = _fill(out, mask, pad_value)
  return out.reshape((plan.num_patches, p, p, p) + tuple(volume.shape[3:]))


def extract_batch(volume: Array, plan: Plan, indices: Array,
                  pad_value: float = BACKGROUND, *,
                  out: np.ndarray | None = None) -> Array:
  """Cuts only the patches numbered ``indices`` (flat, C order) of ``plan``.

  For streaming inference: the volume may be a host array (even a memmap)
  and only one batch of patches is materialised at a time.

  Args:
    volume: ``[D, H, W]`` or ``[D, H, W, C]``, numpy or jax.
    plan: the volume's plan.
    indices: ``[B]`` ints in ``[0, plan.num_patches)``; may be traced.
    pad_value: background beyond the volume.
    out: numpy volumes only: a C-contiguous ``[B, p, p, p(, C)]`` array of
      the volume's dtype to cut into (returned) instead of a new one. A
      staging buffer reused from batch to batch is not allocated and
      page-faulted anew each time, and stays in cache.

  Returns:
    ``[B, p, p, p]`` (or ``[B, p, p, p, C]``), equal to
    ``extract(volume, plan)[indices]``.
  """
  _check_volume(volume, plan.shape)
  xp = _xp(volume)
  _numpy_only(out, xp is np)
  p = plan.patch_size
  pos = _patch_indices(plan, indices, xp)
  if xp is np:
    starts = np.stack([np.asarray(plan.starts[a])[pos[a]] for a in range(3)],
                      axis=-1)
    return _cut_numpy(volume, starts, p, pad_value, out)
  ar = xp.arange(p)
  idx = []
  for a in range(3):
    s = xp.asarray(plan.starts[a])[pos[a]]  # [B]
    shape = [1] * 3
    shape[a] = p
    idx.append(s[:, None, None, None] + ar.reshape(shape))
  check = [n < p for n in plan.shape]
  out, mask = _take(volume, idx, check)
  return _fill(out, mask, pad_value)


def _stitch_indices(plan: Plan):
  """Per axis: which patch along the axis, and where in it, each voxel is."""
  which, offset = [], []
  for a in range(3):
    w = np.empty(plan.shape[a], np.int32)
    o = np.empty(plan.shape[a], np.int32)
    for i, ((lo, hi), s) in enumerate(zip(plan.keep_in_volume[a],
                                           plan.starts[a])):
      w[lo:hi] = i
      o[lo:hi] = np.arange(lo, hi) - s
    which.append(w)
    offset.append(o)
  return which, offset


def stitch(patches: Array, plan: Plan) -> Array:
  """Assembles a volume from the kept regions of all patches.

  Every voxel is copied from the one patch whose kept range covers it (no
  blending); everything else in the patches is ignored.

  Args:
    patches: ``[N, p, p, p]`` or ``[N, p, p, p, C]``, numpy or jax, in the
      plan's order.
    plan: the plan the patches were cut with.

  Returns:
    ``[D, H, W]`` (or ``[D, H, W, C]``), same array type as ``patches``.
  """
  p = plan.patch_size
  if (patches.ndim not in (4, 5) or patches.shape[0] != plan.num_patches
      or tuple(patches.shape[1:4]) != (p, p, p)):
    raise ValueError(
        f"patches of shape {tuple(patches.shape)} do not fit the plan: "
        f"expected [{plan.num_patches}, {p}, {p}, {p}(, C)]")
  grid = patches.reshape(plan.grid + (p, p, p) + tuple(patches.shape[4:]))
  which, offset = _stitch_indices(plan)
  bcast = [(slice(None), None, None), (None, slice(None), None),
           (None, None, slice(None))]
  idx = tuple(which[a][bcast[a]] for a in range(3))
  idx += tuple(offset[a][bcast[a]] for a in range(3))
  return grid[idx]


@functools.lru_cache(maxsize=32)
def _kept_slices_by_axis(plan: Plan):
  """``(volume_slices, patch_slices)``, each per axis a tuple of slices, one
  per patch along that axis (`Plan.kept_slices`, split by axis)."""
  return tuple(
      tuple(tuple(slice(lo, hi) for lo, hi in ranges) for ranges in which)
      for which in (plan.keep_in_volume, plan.keep_in_patch))


def stitch_into(out: np.ndarray, patches: Array, plan: Plan,
                indices) -> np.ndarray:
  """Writes the kept regions of a batch of patches into ``out``, in place.

  The host side of streaming inference: the full volume lives in ``out``
  (which may be a ``np.memmap``), batches of patches arrive from the device.
  Calling it for every index once gives ``stitch(all_patches, plan)``.

  Args:
    out: preallocated ``[D, H, W]`` or ``[D, H, W, C]`` numpy array.
    patches: ``[B, p, p, p]`` (or with channel axis), numpy or jax.
    plan: the plan of ``out``.
    indices: ``[B]`` flat patch numbers of ``patches``.

  Returns:
    ``out``.
  """
  _check_volume(out, plan.shape, "out")
  patches = np.asarray(patches)
  indices = np.asarray(indices).reshape(-1)
  p = plan.patch_size
  if patches.shape[1:4] != (p, p, p) or patches.shape[4:] != out.shape[3:]:
    raise ValueError(
        f"patches: expected [B, {p}, {p}, {p}"
        + "".join(f", {c}" for c in out.shape[3:]) + f"] (the plan's patch "
        f"and out's channels), got {tuple(patches.shape)}")
  if patches.shape[0] != indices.shape[0]:
    raise ValueError(
        f"{patches.shape[0]} patches but {indices.shape[0]} indices")
  if indices.size and (indices.min() < 0
                       or indices.max() >= plan.num_patches):
    raise ValueError(
        f"patch indices must lie in [0, {plan.num_patches}), got "
        f"{indices.min()}..{indices.max()}")
  return _stitch_numpy(out, patches, plan, indices, STITCH_THREADS)


def _stitch_numpy(out: np.ndarray, patches: np.ndarray, plan: Plan,
                  indices: np.ndarray, threads: int) -> np.ndarray:
  """`stitch_into` without its checks, on ``threads`` threads."""
  # The per-axis slices are built once per plan (`Plan.kept_slices` per
  # patch cost as much as the copy itself on 256³). Consecutive patches of
  # one grid row that keep the same W range (all but a row's first and
  # last) go in one copy through a view of ``out``: on 256³ in batches of
  # 32 that took the stitch from 42 to 30 ms (2-core Xeon, one thread).
  # Patches write disjoint regions, so parts of the batch may go in parallel.
  (vz, vy, vx), (pz, py, px) = _kept_slices_by_axis(plan)
  _, ny, nx = plan.grid
  flat = indices.tolist()

  def stitch_part(j: int, stop: int) -> None:
    while j < stop:
      z, rest = divmod(flat[j], ny * nx)
      y, x = divmod(rest, nx)
      n = 1
      while (j + n < stop and flat[j + n] == flat[j] + n and x + n < nx
             and px[x + n] == px[x]):
        n += 1
      if n == 1:
        out[vz[z], vy[y], vx[x]] = patches[j][pz[z], py[y], px[x]]
      else:
        lo, c = vx[x].start, px[x].stop - px[x].start
        run = out[vz[z], vy[y], lo:lo + n * c]  # split W into n runs of c:
        run = run.reshape(run.shape[:2] + (n, c) + run.shape[3:])  # a view
        np.copyto(np.moveaxis(run, 2, 0),
                  patches[j:j + n, pz[z], py[y], px[x]])
      j += n

  _in_parallel(stitch_part, len(flat), patches.size, threads)
  return out


def map_patches(fn, volume: np.ndarray, plan: Plan, *, batch_size: int = 32,
                pad_value: float = BACKGROUND, threads: int | None = None,
                out: np.ndarray | None = None) -> np.ndarray:
  """Applies ``fn`` to every patch of a host volume and stitches the kept
  centres of what it returns: a sliding-window inference on the host, with
  no blending (MONAI's ``sliding_window_inference``, on this module's grid).

  Batches of ``batch_size`` patches (C order) go to ``threads`` workers in
  turn. Each cuts its batch into its own staging buffer (reused from batch
  to batch), calls ``fn`` and stitches the result into ``out``; batches
  write disjoint voxels, so nothing is locked. On a 2-core Xeon a 256³
  round trip with the identity in 32-patch batches took 67 ms over two
  workers against 95 ms for the same steps in one loop with each step
  threaded (`extract_batch`, `stitch_into`).

  Args:
    fn: ``[B, p, p, p(, C)]`` numpy batch → ``[B, p, p, p(, C')]`` array
      (numpy or jax). With ``threads > 1`` it is called from several threads
      at once (numpy code and jitted JAX functions are fine; pass
      ``threads=1`` otherwise). Its input is overwritten by a later batch,
      so it must not keep it. The last batch may be shorter.
    volume: ``[D, H, W]`` or ``[D, H, W, C]`` numpy array (memmaps too).
    plan: the volume's plan.
    batch_size: patches per call of ``fn``.
    pad_value: background beyond the volume.
    threads: workers (default `HOST_THREADS`).
    out: optional ``[D, H, W(, C')]`` numpy array to stitch into; a new one
      of ``fn``'s dtype otherwise.

  Returns:
    ``out``: equal to ``stitch(fn(extract(volume, plan)), plan)`` for a
    patch-wise ``fn``.
  """
  if not isinstance(volume, np.ndarray):
    raise ValueError(f"map_patches needs a numpy volume, got "
                     f"{type(volume).__name__}")
  _check_volume(volume, plan.shape)
  batch_size = _as_int("batch_size", batch_size)
  if batch_size < 1:
    raise ValueError(f"batch_size must be at least 1, got {batch_size}")
  _check_threads(threads)
  p, n = plan.patch_size, plan.num_patches
  pos = np.unravel_index(np.arange(n), plan.grid)
  starts = np.stack([np.asarray(plan.starts[a])[pos[a]] for a in range(3)],
                    axis=-1)
  bounds = [(lo, min(lo + batch_size, n)) for lo in range(0, n, batch_size)]
  stage_shape = (batch_size, p, p, p) + tuple(volume.shape[3:])

  def run(stage, lo, hi):
    got = fn(_cut_numpy(volume, starts[lo:hi], p, pad_value, stage[:hi - lo],
                        threads=1))
    got = np.asarray(got)
    if got.ndim not in (4, 5) or got.shape[:4] != (hi - lo, p, p, p):
      raise ValueError(f"fn returned shape {got.shape} for a batch of shape "
                       f"{stage[:hi - lo].shape}; expected "
                       f"[{hi - lo}, {p}, {p}, {p}(, C)]")
    return got

  stage = np.empty(stage_shape, volume.dtype)
  first = run(stage, *bounds[0])  # fixes the output's channels and dtype
  if out is None:
    out = np.empty(plan.shape + first.shape[4:], first.dtype)
  else:
    _check_volume(out, plan.shape, "out")
    if out.shape[3:] != first.shape[4:]:
      raise ValueError(f"out of shape {out.shape} does not take fn's "
                       f"outputs of shape {first.shape}")
    if np.may_share_memory(out, volume):
      raise ValueError("out overlaps the volume: patches would be cut from "
                       "voxels already stitched over")
    if not np.can_cast(first.dtype, out.dtype, "same_kind"):
      raise ValueError(f"out of dtype {out.dtype} cannot take fn's "
                       f"{first.dtype} outputs (they would be truncated)")
  idx = np.arange(n)
  _stitch_numpy(out, first, plan, idx[slice(*bounds[0])], 1)
  workers = max(1, min(HOST_THREADS if threads is None else threads,
                       len(bounds) - 1))

  def work(t: int) -> None:
    buf = stage if t == 0 else np.empty(stage_shape, volume.dtype)
    for lo, hi in bounds[1 + t::workers]:
      _stitch_numpy(out, run(buf, lo, hi), plan, idx[lo:hi], 1)

  # One part per worker: worker t takes batches t, t + workers, ... (a
  # part may hold several t where in_parts runs inline, see there).
  host_threads.in_parts(lambda lo, hi: [work(t) for t in range(lo, hi)],
                        workers, workers, "map")
  return out


# ---------------------------------------------------------------------------
# Previous-scale (conditioning) patches.
# ---------------------------------------------------------------------------
def _check_previous(plan: Plan):
  p = plan.patch_size
  if p % 4:
    raise InputError(
        f"previous-scale patches need patch_size divisible by 4, got {p}")


def previous_starts(plan: Plan) -> tuple[tuple[int, ...], ...]:
  """Per axis, where each previous-scale patch starts.

  In the previous-scale volume padded by ``p // 4`` voxels of background on
  every side: ``floor(s / 2)`` for an output patch starting at ``s``.
  Subtract ``p // 4`` for coordinates in the unpadded previous volume.
  """
  _check_previous(plan)
  return tuple(tuple(s // 2 for s in st) for st in plan.starts)


def previous_patches(prev_volume: Array, plan: Plan,
                     pad_value: float = BACKGROUND, indices=None, *,
                     out: np.ndarray | None = None) -> Array:
  """The previous-scale patch of each output patch of ``plan``.

  Each is ``p³`` voxels of the previous scale (no resampling), covering
  twice the output patch's field of view, centred on it. The padding by
  ``p // 4`` is virtual: out-of-volume voxels are filled with ``pad_value``
  (also beyond that padding, where a volume is shorter than a patch).

  Args:
    prev_volume: the scale ``k - 1`` volume, ``[D', H', W']`` (or with a
      channel axis) with ``D' = ceil(D / 2)`` etc.
    plan: the output plan at scale ``k``; ``patch_size % 4 == 0``.
    pad_value: background around the previous volume.
    indices: optional ``[B]`` flat patch numbers (may be traced); all
      patches when None.
    out: with numpy ``indices`` on a numpy volume only: the array to cut
      into, as in `extract_batch`.

  Returns:
    ``[N or B, p, p, p]`` (or with channel axis), same array type as
    ``prev_volume``.
  """
  _check_previous(plan)
  expected = tuple(-(-n // 2) for n in plan.shape)
  _check_volume(prev_volume, expected, "previous-scale volume")
  xp = _xp(prev_volume)
  _numpy_only(out, indices is not None and xp is np)
  p = plan.patch_size
  q = p // 4
  # Starts in unpadded previous-volume coordinates (may be negative).
  starts = [np.asarray(st, np.int32) - q for st in previous_starts(plan)]
  ar = np.arange(p)
  idx = []
  if indices is None:
    for a in range(3):
      i = starts[a][:, None] + ar
      shape = [1] * 6
      shape[a], shape[3 + a] = i.shape
      idx.append(i.reshape(shape))
  elif xp is np:
    pos = _patch_indices(plan, indices, np)
    return _cut_numpy(prev_volume,
                      np.stack([starts[a][pos[a]] for a in range(3)], -1),
                      p, pad_value, out)
  else:
    pos = _patch_indices(plan, indices, xp)
    for a in range(3):
      shape = [1] * 3
      shape[a] = p
      s = xp.asarray(starts[a])[pos[a]]
      idx.append(s[:, None, None, None] + xp.asarray(ar).reshape(shape))
  out, mask = _take(prev_volume, idx, [True] * 3)
  out = _fill(out, mask, pad_value)
  return out.reshape((-1, p, p, p) + tuple(prev_volume.shape[3:]))
