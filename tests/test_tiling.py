"""Tests for megan_jax.tiling: the patch grid, extraction and stitching."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from megan_jax import tiling


@st.composite
def plans(draw, max_len=70, min_patch=2, max_patch=20):
  shape = tuple(draw(st.integers(1, max_len)) for _ in range(3))
  p = draw(st.integers(min_patch, max_patch))
  b = draw(st.integers(0, (p - 1) // 2))
  return tiling.make_plan(shape, p, b)


def _random_volume(shape, seed=0, channels=None):
  rng = np.random.default_rng(seed)
  shape = tuple(shape) + ((channels,) if channels else ())
  return rng.standard_normal(shape).astype(np.float32)


@settings(max_examples=150, deadline=None)
@given(plans())
def test_stitch_extract_round_trip_numpy(plan):
  v = _random_volume(plan.shape)
  patches = tiling.extract(v, plan)
  p = plan.patch_size
  assert isinstance(patches, np.ndarray)
  assert patches.shape == (plan.num_patches, p, p, p)
  np.testing.assert_array_equal(tiling.stitch(patches, plan), v)


@settings(max_examples=150, deadline=None)
@given(plans())
def test_kept_ranges_partition_and_respect_border(plan):
  p, b = plan.patch_size, plan.border
  assert plan.num_patches == np.prod(plan.grid)
  for a, length in enumerate(plan.shape):
    count = np.zeros(length, int)
    for s, (plo, phi), (vlo, vhi) in zip(plan.starts[a], plan.keep_in_patch[a],
                                         plan.keep_in_volume[a]):
      assert (vlo, vhi) == (s + plo, s + phi)
      assert 0 <= plo < phi <= p
      # Trimmed by the border except on sides touching the volume's edge.
      assert plo >= b or vlo == 0
      assert phi <= p - b or vhi == length
      # A patch only reaches beyond the volume when the axis is short.
      assert s >= 0 and (s + p <= length or length < p)
      count[vlo:vhi] += 1
    np.testing.assert_array_equal(count, 1)
    # Kept ranges appear in order, so they abut.
    kept = plan.keep_in_volume[a]
    assert kept[0][0] == 0 and kept[-1][1] == length
    assert all(k[1] == nxt[0] for k, nxt in zip(kept, kept[1:]))


@settings(max_examples=60, deadline=None)
@given(plans(max_len=40))
def test_stitch_uses_only_kept_regions(plan):
  p = plan.patch_size
  n = plan.num_patches
  patches = np.full((n, p, p, p), np.nan, np.float32)
  expected = np.full(plan.shape, -7.0, np.float32)
  for i in range(n):
    vol, pat = plan.kept_slices(i)
    patches[i][pat] = i  # everything outside the kept region stays NaN
    expected[vol] = i
  out = tiling.stitch(patches, plan)
  assert not np.isnan(out).any()
  np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("shape,p,b", [
    ((7, 13, 30), 8, 2),   # one axis shorter than a patch
    ((40, 33, 21), 12, 3),
    ((5, 5, 5), 8, 0),     # smaller than a patch everywhere
])
def test_jax_path_under_jit_matches_numpy(shape, p, b):
  plan = tiling.make_plan(shape, p, b)
  v = _random_volume(shape, seed=1)
  ext = jax.jit(tiling.extract, static_argnames="plan")
  sti = jax.jit(tiling.stitch, static_argnames="plan")
  patches = ext(jnp.asarray(v), plan=plan, pad_value=-1.0)
  assert isinstance(patches, jax.Array)
  np.testing.assert_array_equal(np.asarray(patches), tiling.extract(v, plan))
  out = sti(patches, plan=plan)
  assert isinstance(out, jax.Array)
  np.testing.assert_array_equal(np.asarray(out), v)


def test_extract_pads_short_axes_with_pad_value():
  plan = tiling.make_plan((3, 10, 4), 6, 1)
  v = _random_volume(plan.shape)
  patches = tiling.extract(v, plan, pad_value=5.0)
  assert plan.grid[0] == 1 and plan.grid[2] == 1
  # Axis 0 has 3 voxels and axis 2 has 4: the rest of each patch is padding.
  assert (patches[:, 3:] == 5.0).all()
  assert (patches[:, :, :, 4:] == 5.0).all()
  for i in range(plan.num_patches):
    y = plan.starts[1][np.unravel_index(i, plan.grid)[1]]
    np.testing.assert_array_equal(patches[i, :3, :, :4], v[:, y:y + 6, :])


def test_channels_axis():
  plan = tiling.make_plan((9, 14, 5), 8, 2)
  v = _random_volume(plan.shape, channels=2)
  patches = tiling.extract(v, plan)
  assert patches.shape == (plan.num_patches, 8, 8, 8, 2)
  for c in range(2):
    np.testing.assert_array_equal(patches[..., c],
                                  tiling.extract(v[..., c], plan))
  np.testing.assert_array_equal(tiling.stitch(patches, plan), v)


@pytest.mark.parametrize("channels", [None, 3])
def test_batch_functions_agree_with_full_ones(tmp_path, channels):
  plan = tiling.make_plan((11, 26, 19), 8, 2)
  v = _random_volume(plan.shape, seed=2, channels=channels)
  full = tiling.extract(v, plan)
  rng = np.random.default_rng(0)
  order = rng.permutation(plan.num_patches)
  out = np.lib.format.open_memmap(tmp_path / "out.npy", mode="w+",
                                  dtype=np.float32, shape=v.shape)
  out[...] = np.nan
  jit_batch = jax.jit(tiling.extract_batch, static_argnames="plan")
  for batch in np.array_split(order, 5):
    patches = tiling.extract_batch(v, plan, batch)
    np.testing.assert_array_equal(patches, full[batch])
    patches_jax = jit_batch(jnp.asarray(v), plan=plan,
                            indices=jnp.asarray(batch))
    np.testing.assert_array_equal(np.asarray(patches_jax), full[batch])
    assert tiling.stitch_into(out, patches_jax, plan, batch) is out
  out.flush()
  np.testing.assert_array_equal(np.load(tmp_path / "out.npy"),
                                tiling.stitch(full, plan))


def test_extract_batch_pads_like_extract():
  plan = tiling.make_plan((4, 17, 3), 8, 1)
  v = _random_volume(plan.shape)
  idx = np.arange(plan.num_patches)[::-1]
  np.testing.assert_array_equal(
      tiling.extract_batch(v, plan, idx, pad_value=2.5),
      tiling.extract(v, plan, pad_value=2.5)[idx])


def test_host_cut_mixes_inside_partial_and_outside_starts():
  # The host cut takes a fast path for cubes wholly inside; the others are
  # padded. Reference: slicing a really padded volume.
  v = _random_volume((9, 14, 11), seed=4, channels=2)
  p = 6
  rng = np.random.default_rng(3)
  starts = rng.integers(-8, 16, size=(60, 3))
  starts[:5] = [[0, 0, 0], [3, 8, 5], [-6, 0, 0], [9, 0, 0], [2, 3, 4]]
  pad = 20
  padded = np.pad(v, [(pad, pad)] * 3 + [(0, 0)], constant_values=-3.0)
  want = np.stack([padded[z + pad:z + pad + p, y + pad:y + pad + p,
                          x + pad:x + pad + p] for z, y, x in starts])
  got = tiling._cut_numpy(v, starts, p, -3.0)
  np.testing.assert_array_equal(got, want)
  assert np.all(got[2] == -3.0) and np.all(got[3] == -3.0)  # wholly outside


@pytest.mark.parametrize("layout", ["c", "flipped_w", "channel_view",
                                    "readonly_memmap"])
def test_host_cut_row_view_and_fallback_agree(tmp_path, layout):
  # Volumes whose W runs are contiguous are cut through `_rows` (void
  # elements of whole rows), the others row by row; both give the padded
  # reference. A read-only memmap works through the row view too.
  base = _random_volume((9, 14, 31), seed=5, channels=3)
  v = {"c": np.ascontiguousarray(base[..., 0]), "flipped_w": base[:, :, ::-1, 0],
       "channel_view": base[..., :2], "readonly_memmap": base}[layout]
  if layout == "readonly_memmap":
    np.save(tmp_path / "v.npy", v)
    v = np.load(tmp_path / "v.npy", mmap_mode="r")
  contiguous = layout in ("c", "readonly_memmap")
  assert (tiling._rows(v, 2, 6) is not None) == contiguous
  p = 6
  rng = np.random.default_rng(1)
  starts = rng.integers(-3, np.array(v.shape[:3]) - 2, size=(40, 3))
  pad = 8
  widths = [(pad, pad)] * 3 + [(0, 0)] * (v.ndim - 3)
  padded = np.pad(np.asarray(v), widths, constant_values=-1.0)
  want = np.stack([padded[z + pad:z + pad + p, y + pad:y + pad + p,
                          x + pad:x + pad + p] for z, y, x in starts])
  buf = np.full((40, p, p, p) + v.shape[3:], np.nan, np.float32)
  got = tiling._cut_numpy(v, starts, p, -1.0, buf)
  assert got is buf
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("channels", [None, 2])
@pytest.mark.parametrize("threads", [1, 3])
def test_host_cut_copies_rows_of_patches_at_once(monkeypatch, channels,
                                                 threads):
  # Consecutive inside patches with the same z and y and x advancing by a
  # constant step go in one strided copy; a changed step, a patch partly
  # outside, another row or a thread's part boundary ends a run. Same
  # result as the padded reference either way.
  monkeypatch.setattr(tiling, "HOST_THREADS", threads)
  monkeypatch.setattr(tiling, "_THREADED_VOXELS", 0)
  v = _random_volume((10, 12, 40), seed=8, channels=channels)
  p = 6
  starts = ([[1, 2, x] for x in range(0, 30, 5)]      # a run of 6, step 5
            + [[1, 2, 31], [1, 2, 34]]                # step changes
            + [[1, 2, 38]]                            # partly outside
            + [[4, 3, x] for x in (3, 5, 7, 9)]       # another row, step 2
            + [[4, 4, 9], [4, 4, 9], [0, 0, 0]])      # step 0: no run
  starts = np.array(starts)
  calls = []
  copyto = np.copyto

  def counting(dst, src, *args, **kwargs):
    calls.append(dst.shape[0])
    return copyto(dst, src, *args, **kwargs)

  monkeypatch.setattr(np, "copyto", counting)
  pad = 8
  widths = [(pad, pad)] * 3 + [(0, 0)] * (v.ndim - 3)
  padded = np.pad(v, widths, constant_values=-1.0)
  want = np.stack([padded[z + pad:z + pad + p, y + pad:y + pad + p,
                          x + pad:x + pad + p] for z, y, x in starts])
  got = tiling._cut_numpy(v, starts, p, -1.0)
  np.testing.assert_array_equal(got, want)
  if threads == 1:
    assert sorted(calls) == [2, 4, 6]  # the step-5 row, 31/34, the step-2 row
  else:
    assert sum(calls) <= 12 and len(calls) >= 3


def test_rows_view_holds_runs_at_every_position():
  a = np.arange(2 * 3 * 7 * 2, dtype=np.float32).reshape(2, 3, 7, 2)
  r = tiling._rows(a, 2, 4)
  assert r.shape == (2, 3, 4) and r.dtype.itemsize == 4 * 2 * 4
  for x in range(4):
    np.testing.assert_array_equal(
        r[1, 2, x:x + 1].view(np.float32).reshape(4, 2), a[1, 2, x:x + 4])
  assert r.flags.writeable
  a.flags.writeable = False
  assert not tiling._rows(a, 2, 4).flags.writeable
  assert tiling._rows(a, 2, 8) is None  # longer than the axis
  assert tiling._rows(a[:, :, ::2], 2, 2) is None


def test_extract_batch_and_previous_patches_fill_a_given_buffer():
  plan = tiling.make_plan((20, 33, 18), 8, 2)
  v = _random_volume(plan.shape, seed=6)
  prev = _random_volume(tuple(-(-n // 2) for n in plan.shape), seed=7)
  idx = np.array([0, 5, plan.num_patches - 1])
  buf = np.empty((3, 8, 8, 8), np.float32)
  assert tiling.extract_batch(v, plan, idx, out=buf) is buf
  np.testing.assert_array_equal(buf, tiling.extract(v, plan)[idx])
  assert tiling.previous_patches(prev, plan, indices=idx, out=buf) is buf
  np.testing.assert_array_equal(buf, tiling.previous_patches(prev, plan)[idx])
  for bad in (np.empty((2, 8, 8, 8), np.float32),
              np.empty((3, 8, 8, 8), np.float64),
              np.empty((3, 8, 8, 16), np.float32)[..., ::2]):
    with pytest.raises(ValueError, match="out must be"):
      tiling.extract_batch(v, plan, idx, out=bad)
  with pytest.raises(ValueError, match="numpy volume"):
    tiling.extract_batch(jnp.asarray(v), plan, idx, out=buf)
  with pytest.raises(ValueError, match="numpy volume"):
    tiling.previous_patches(prev, plan, out=buf)  # all patches: a gather


@pytest.mark.parametrize("channels", [None, 2])
@pytest.mark.parametrize("strided_out", [False, True])
@pytest.mark.parametrize("threads", [1, 3])
def test_stitch_into_in_grid_order_copies_whole_row_runs(
    monkeypatch, channels, strided_out, threads):
  """Batches in C order (as inference cuts them) stitch whole runs of a grid
  row at once; batch edges and thread parts split runs anywhere; ``out``
  may be a strided view. Same result as the whole-volume stitch; the cut
  (threaded too) equals the whole-volume cut, partial patches included."""
  monkeypatch.setattr(tiling, "HOST_THREADS", threads)
  monkeypatch.setattr(tiling, "STITCH_THREADS", threads)
  monkeypatch.setattr(tiling, "_THREADED_VOXELS", 0)  # thread even tiny ones
  plan = tiling.make_plan((9, 12, 40), 8, 2)
  assert plan.grid[2] >= 8  # runs of several interior patches per row
  v = _random_volume(plan.shape, seed=5, channels=channels)
  full = tiling.extract(v, plan)
  shape = v.shape
  if strided_out:  # every other W column of a wider array
    big = np.full(shape[:2] + (2 * shape[2],) + shape[3:], np.nan, np.float32)
    out = big[:, :, ::2]
  else:
    out = np.full(shape, np.nan, np.float32)
  for batch in np.array_split(np.arange(plan.num_patches), 7):
    np.testing.assert_array_equal(tiling.extract_batch(v, plan, batch),
                                  full[batch])
    tiling.stitch_into(out, full[batch], plan, batch)
  np.testing.assert_array_equal(out, v)
  prev = _random_volume((5, 6, 20), seed=6, channels=channels)
  np.testing.assert_array_equal(
      tiling.previous_patches(prev, plan, indices=np.arange(30)),
      tiling.previous_patches(prev, plan)[:30])


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("batch_size", [1, 7, 1000])
def test_map_patches_equals_stitch_of_mapped_patches(tmp_path, threads,
                                                     batch_size):
  plan = tiling.make_plan((13, 30, 41), 8, 2)
  v = _random_volume(plan.shape, seed=9, channels=2)
  np.save(tmp_path / "v.npy", v)
  v = np.load(tmp_path / "v.npy", mmap_mode="r")  # read-only memmap

  def fn(x):  # patch-wise, changes channels and dtype
    return np.concatenate([x.sum(-1, keepdims=True), x[..., :1] * 2], -1
                          ).astype(np.float64)
  want = tiling.stitch(fn(tiling.extract(np.asarray(v), plan, -4.0)), plan)
  got = tiling.map_patches(fn, v, plan, batch_size=batch_size,
                           pad_value=-4.0, threads=threads)
  assert got.dtype == np.float64 and got.shape == plan.shape + (2,)
  np.testing.assert_array_equal(got, want)
  out = np.full(plan.shape + (2,), np.nan)
  assert tiling.map_patches(fn, v, plan, batch_size=batch_size,
                            pad_value=-4.0, threads=threads, out=out) is out
  np.testing.assert_array_equal(out, want)


def test_map_patches_jax_fn_and_short_volume():
  plan = tiling.make_plan((5, 40, 3), 8, 2)  # axes shorter than a patch
  v = _random_volume(plan.shape, seed=10)
  fn = jax.jit(lambda x: jnp.tanh(x) + 1)
  got = tiling.map_patches(fn, v, plan, batch_size=3, threads=2)
  np.testing.assert_allclose(got, np.tanh(v) + 1, rtol=1e-6, atol=1e-6)


def test_map_patches_inside_map_patches():
  # fn itself runs a threaded map_patches (a per-patch sliding window): its
  # workers must not wait on the pool they run in (host_threads.in_parts).
  plan = tiling.make_plan((12, 20, 20), 8, 2)
  inner = tiling.make_plan((8, 8, 8), 4, 1)
  v = _random_volume(plan.shape, seed=12)

  def fn(x):
    return np.stack([tiling.map_patches(lambda q: q * 3, x[i], inner,
                                        batch_size=2, threads=2)
                     for i in range(len(x))])
  got = tiling.map_patches(fn, v, plan, batch_size=1, threads=2)
  np.testing.assert_array_equal(got, v * 3)


def test_map_patches_errors():
  plan = tiling.make_plan((10, 12, 14), 8, 2)
  v = _random_volume(plan.shape, seed=11)
  with pytest.raises(ValueError, match="numpy volume"):
    tiling.map_patches(lambda x: x, jnp.asarray(v), plan)
  with pytest.raises(ValueError, match="batch_size"):
    tiling.map_patches(lambda x: x, v, plan, batch_size=0)
  with pytest.raises(ValueError, match="fn returned shape"):
    tiling.map_patches(lambda x: x[:, :4], v, plan)
  with pytest.raises(ValueError, match="overlaps the volume"):
    tiling.map_patches(lambda x: x, v, plan, out=v)
  with pytest.raises(ValueError, match="does not take"):
    tiling.map_patches(lambda x: x, v, plan, out=np.empty(v.shape + (2,)))
  # A float result into an int buffer was truncated to zeros silently.
  with pytest.raises(ValueError, match="cannot take fn's float32 outputs"):
    tiling.map_patches(lambda x: x, v, plan, out=np.empty(v.shape, np.int8))
  for threads in (0, -1, "two"):
    with pytest.raises(ValueError, match="threads"):
      tiling.map_patches(lambda x: x, v, plan, threads=threads)
  with pytest.raises(ValueError, match="batch_size must be an integer, got "
                     "'auto'"):
    tiling.map_patches(lambda x: x, v, plan, batch_size="auto")

  def fails_late(x):  # in a worker thread, after the first batch
    if x[0, 0, 0, 0] == 123.0:
      raise RuntimeError("boom")
    return x
  plan_big = tiling.make_plan((10, 12, 14), 4, 1)
  v[6, 6, 6] = 123.0  # a patch corner, far from the first batch
  with pytest.raises(RuntimeError, match="boom"):
    tiling.map_patches(fails_late, v, plan_big, batch_size=1, threads=3)


def test_stitch_into_rejects_patches_of_another_size_or_channels():
  # Larger patches were stitched from the wrong voxels, silently; smaller
  # ones or another channel count failed in numpy's broadcast.
  plan = tiling.make_plan((20, 20, 20), 8, 2)
  vol = np.arange(8000, dtype=np.float32).reshape(20, 20, 20)
  patches = tiling.extract(vol, plan)
  idx = np.arange(plan.num_patches)
  for bad in (np.pad(patches, [(0, 0), (2, 0), (2, 0), (2, 0)]),
              patches[:, :6, :6, :6], patches[..., None]):
    with pytest.raises(ValueError, match=r"patches: expected \[B, 8, 8, 8\]"):
      tiling.stitch_into(np.zeros_like(vol), bad, plan, idx)
  out = tiling.stitch_into(np.zeros_like(vol), patches, plan, idx)
  np.testing.assert_array_equal(out, vol)


def test_stitch_into_rejects_indices_outside_the_plan():
  plan = tiling.make_plan((10, 10, 10), 8, 2)
  out = np.zeros(plan.shape, np.float32)
  patches = np.zeros((1, 8, 8, 8), np.float32)
  for bad in (-1, plan.num_patches):
    with pytest.raises(ValueError, match="patch indices"):
      tiling.stitch_into(out, patches, plan, [bad])


def _previous_reference(prev, plan, pad_value):
  """Pads the previous volume for real and slices at floor(s / 2)."""
  p = plan.patch_size
  q = p // 4
  # p // 4 before; after, enough for volumes shorter than a patch too.
  padded = np.pad(prev, [(q, p)] * 3, constant_values=pad_value)
  out = []
  for i in range(plan.num_patches):
    pos = np.unravel_index(i, plan.grid)
    s = [plan.starts[a][pos[a]] // 2 for a in range(3)]
    out.append(padded[s[0]:s[0] + p, s[1]:s[1] + p, s[2]:s[2] + p])
  return np.stack(out)


@pytest.mark.parametrize("shape", [(16, 24, 40), (9, 30, 23), (3, 8, 50)])
def test_previous_patches_match_explicit_padding(shape):
  plan = tiling.make_plan(shape, 8, 2)
  prev = _random_volume(tuple(-(-n // 2) for n in shape), seed=3)
  got = tiling.previous_patches(prev, plan, pad_value=-1.0)
  np.testing.assert_array_equal(got, _previous_reference(prev, plan, -1.0))
  assert tiling.previous_starts(plan) == tuple(
      tuple(s // 2 for s in st) for st in plan.starts)
  # A subset by index, numpy and jitted jax.
  idx = np.array([plan.num_patches - 1, 0, plan.num_patches // 2])
  np.testing.assert_array_equal(
      tiling.previous_patches(prev, plan, indices=idx), got[idx])
  f = jax.jit(tiling.previous_patches, static_argnames="plan")
  np.testing.assert_array_equal(
      np.asarray(f(jnp.asarray(prev), plan=plan, indices=jnp.asarray(idx))),
      got[idx])


def test_previous_patch_centre_lies_under_output_patch():
  # With even starts (even sizes, even patch and centre), the centre half of
  # each previous patch, repeated x2, is exactly the output patch of the
  # nearest-upsampled volume.
  coarse_shape = (10, 3, 17)
  plan = tiling.make_plan(tuple(2 * n for n in coarse_shape), 8, 2)
  assert all(s % 2 == 0 for st in plan.starts for s in st)
  coarse = _random_volume(coarse_shape, seed=4)
  fine = coarse
  for a in range(3):
    fine = np.repeat(fine, 2, axis=a)
  prev = tiling.previous_patches(coarse, plan)
  out = tiling.extract(fine, plan)
  centre = prev[:, 2:6, 2:6, 2:6]
  for a in (1, 2, 3):
    centre = np.repeat(centre, 2, axis=a)
  np.testing.assert_array_equal(centre, out)
  # The first patch sticks out of the volume on the low side of every axis.
  assert (prev[0, :2] == -1.0).all()
  assert (prev[0, :, :2] == -1.0).all()
  assert (prev[0, :, :, :2] == -1.0).all()
  assert not (prev[0, 2:, 2:5, 2:] == -1.0).any()  # inside (axis 1 has 3): data
  assert (prev[0, :, 5:] == -1.0).all()  # beyond the 3 voxels of axis 1


def test_linear_upsampled_centre_is_upsample2_of_the_previous_scale():
  # `state.linear_upsampled_centre` (model.hr_residual's base) on the
  # previous patches, stitched, is the previous volume trilinearly
  # upsampled: the margin of each previous patch supplies the neighbours.
  from megan_jax import resample
  from megan_jax import state as state_lib
  coarse_shape = (9, 6, 13)
  coarse = np.full(coarse_shape, -1.0, np.float32)  # background all round,
  coarse[1:-1, 1:-1, 1:-1] = _random_volume(  # as the patches' padding
      tuple(n - 2 for n in coarse_shape), seed=5)
  plan = tiling.make_plan(tuple(2 * n for n in coarse_shape), 8, 2)
  prev = tiling.previous_patches(coarse, plan)[..., None]
  up = np.asarray(state_lib.linear_upsampled_centre(jnp.asarray(prev), 8))
  got = tiling.stitch(up[..., 0], plan)
  np.testing.assert_allclose(got, resample.upsample2(coarse), atol=1e-6)


def test_previous_patches_channels():
  plan = tiling.make_plan((12, 12, 12), 8, 2)
  prev = _random_volume((6, 6, 6), channels=2)
  got = tiling.previous_patches(prev, plan)
  assert got.shape == (plan.num_patches, 8, 8, 8, 2)
  np.testing.assert_array_equal(got[..., 1],
                                tiling.previous_patches(prev[..., 1], plan))


@pytest.mark.parametrize("p,b", [(8, 4), (8, -1), (0, 0), (5, 3)])
def test_bad_plan_arguments(p, b):
  with pytest.raises(ValueError, match=f"patch_size={p}, border={b}"):
    tiling.make_plan((10, 10, 10), p, b)


def test_shape_mismatch_and_patch_size_errors():
  plan = tiling.make_plan((10, 11, 12), 6, 1)
  with pytest.raises(ValueError, match="does not match"):
    tiling.extract(np.zeros((10, 11, 13)), plan)
  with pytest.raises(ValueError, match="divisible by 4, got 6"):
    tiling.previous_patches(np.zeros((5, 6, 6)), plan)
  plan8 = tiling.make_plan((10, 11, 12), 8, 1)
  with pytest.raises(ValueError, match="previous-scale volume"):
    tiling.previous_patches(np.zeros((5, 5, 6)), plan8)


def test_plan_is_hashable_and_static():
  a = tiling.make_plan((30, 31, 32), 8, 2)
  b = tiling.make_plan((30, 31, 32), 8, 2)
  assert a == b and hash(a) == hash(b)
  assert a != tiling.make_plan((30, 31, 32), 8, 1)
  assert all(isinstance(s, int) for st in a.starts for s in st)
  # A 512³ volume at the paper's settings: 25 patches per axis.
  big = tiling.make_plan(512, 32, 6)
  assert big.grid == (1 + -(-(512 - 32) // 20),) * 3
  assert big.starts[0][-1] == 512 - 32


def test_extract_batch_refuses_indices_outside_the_grid():
  plan = tiling.make_plan((40, 40, 40), 16, 2)
  vol = np.zeros((40, 40, 40), np.float32)
  for bad in ([plan.num_patches], [-1], [10**6]):
    with pytest.raises(ValueError, match=f"in \\[0, {plan.num_patches}\\)"):
      tiling.extract_batch(vol, plan, np.array(bad))
    # A JAX volume with concrete indices too (it clamped them silently).
    with pytest.raises(ValueError, match=f"in \\[0, {plan.num_patches}\\)"):
      tiling.extract_batch(jnp.asarray(vol), plan, jnp.asarray(bad))
  # Traced indices stay allowed (they cannot be checked).
  cut = jax.jit(lambda v, i: tiling.extract_batch(v, plan, i))
  assert cut(jnp.asarray(vol), jnp.arange(2)).shape == (2, 16, 16, 16)
  assert tiling.extract_batch(vol, plan, np.arange(3)).shape == (3, 16, 16, 16)
