"""Tests for the 3D Canny edge sketch and the label helpers."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy import ndimage
from skimage import feature

from megan_jax import edges
from megan_jax.errors import InputError

N = 40  # side of the test volumes


def _grid(n=N):
  return np.mgrid[:n, :n, :n].astype(np.float64)


def _ball(centre, radius, n=N):
  """Solid ball and each voxel's distance to the centre."""
  z, y, x = _grid(n)
  dist = np.sqrt((z - centre[0])**2 + (y - centre[1])**2 + (x - centre[2])**2)
  return (dist < radius).astype(np.float32), dist


def _blobs(seed, n=32):
  """A smooth, asymmetric random volume with sharp and soft edges."""
  rng = np.random.default_rng(seed)
  smooth = ndimage.gaussian_filter(rng.standard_normal((n, n, n)), 2.0)
  smooth /= smooth.std()
  return ((smooth > 0.3) + 0.3 * smooth).astype(np.float32)


@pytest.fixture(params=edges.ENGINES)
def engine(request, monkeypatch):
  """Runs a test with each engine of steps 1-3 as the default."""
  monkeypatch.setattr(edges, "ENGINE", request.param)
  return request.param


# ----------------------------------------------------------------- geometry


@pytest.mark.parametrize("centre", [(19.7, 19.2, 19.9), (20.0, 20.0, 20.0),
                                    (18.3, 21.1, 19.6)])
def test_ball_edges_lie_on_a_thin_sphere(centre, engine):
  radius = 12.0
  ball, dist = _ball(centre, radius)
  sketch = edges.canny_3d(ball)
  edge = sketch > 0
  assert edge.any()
  # On the surface: nothing inside nor far outside.
  assert np.abs(dist[edge] - radius).max() <= 1.5
  # Thin: about the sphere's area in voxels (a 2-voxel shell is ~2.4x).
  area = 4 * np.pi * radius**2
  assert 0.8 * area < edge.sum() < 1.6 * area
  # Along each axis, columns near the poles cross the surface in 1 or 2
  # voxels per hemisphere.
  for axis in range(3):
    moved = np.moveaxis(edge, axis, 0)
    cz = centre[axis]
    cy, cx = np.delete(np.asarray(centre), axis)
    yy, xx = np.mgrid[:N, :N]
    polar = np.hypot(yy - cy, xx - cx) < 0.5 * radius
    for half in (moved[:int(cz)], moved[int(cz) + 1:]):
      counts = half.sum(axis=0)[polar]
      assert counts.min() >= 1 and counts.max() <= 2


def test_cube_edges_on_faces_only(engine):
  vol = np.zeros((N, N, N), np.float32)
  lo, hi = 12, 28  # the cube is [lo, hi)^3; its faces lie at lo - 0.5, hi - 0.5
  vol[lo:hi, lo:hi, lo:hi] = 1
  edge = edges.canny_3d(vol) > 0
  shell = np.zeros_like(edge)
  shell[lo - 1:hi + 1, lo - 1:hi + 1, lo - 1:hi + 1] = True
  shell[lo + 1:hi - 1, lo + 1:hi - 1, lo + 1:hi - 1] = False
  assert not (edge & ~shell).any()
  mid = (lo + hi) // 2
  for axis in range(3):
    for face in (lo, hi - 1):
      line = [mid, mid, mid]
      line[axis] = slice(face - 1, face + 2)
      assert edge[tuple(line)].any(), (axis, face)


def test_slab_edges_on_its_two_faces_only(engine):
  vol = np.zeros((N, N, N), np.float32)
  vol[:, 15:25, :] = 2.0  # a thick plane across the whole volume
  edge = edges.canny_3d(vol) > 0
  ys = np.flatnonzero(edge.any(axis=(0, 2)))
  assert set(ys) <= {14, 15, 24, 25}
  # Each face is a closed sheet: every (z, x) column meets it.
  assert edge[:, 13:17, :].any(axis=1).all()
  assert edge[:, 23:27, :].any(axis=1).all()


def test_is_truly_3d_step_across_slices(engine):
  vol = np.zeros((N, N, N), np.float32)
  vol[N // 2:] = 1.0  # constant within every axis-0 slice
  slicewise = np.stack([feature.canny(s, sigma=1.0) for s in vol])
  assert not slicewise.any()  # a 2D Canny per slice misses it
  edge = edges.canny_3d(vol) > 0
  zs = np.flatnonzero(edge.any(axis=(1, 2)))
  assert set(zs) <= {N // 2 - 1, N // 2}
  assert edge.any(axis=0).all()


# ----------------------------------------------------------------- symmetry


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("axes", [(0, 2), (1, 2), (0, 1)])
def test_rotation_equivariance(seed, axes, engine):
  vol = _blobs(seed)
  sketch = edges.canny_3d(vol)
  assert (sketch > 0).any()
  for k in (1, 2, 3):
    rotated = edges.canny_3d(np.rot90(vol, k, axes))
    expected = np.rot90(sketch, k, axes)
    # Quantised NMS makes the edge set exactly equivariant; values differ
    # only by float rounding (the smoothing runs the axes in another order).
    np.testing.assert_array_equal(rotated > 0, expected > 0)
    np.testing.assert_allclose(rotated, expected, atol=1e-5)


def test_flip_equivariance(engine):
  vol = _blobs(2)
  sketch = edges.canny_3d(vol)
  for axis in range(3):
    flipped = edges.canny_3d(np.flip(vol, axis))
    np.testing.assert_array_equal(flipped > 0, np.flip(sketch, axis) > 0)


def _brute_force_offsets(grads):
  """The neighbour offset with the largest cosine to each gradient."""
  r = (-1, 0, 1)
  offsets = np.array(
      [(a, b, c) for a in r for b in r for c in r if (a, b, c) != (0, 0, 0)])
  units = offsets / np.linalg.norm(offsets, axis=1, keepdims=True)
  return offsets[np.argmax(units @ np.stack(grads), axis=0)]


@settings(deadline=None, max_examples=20)
@given(seed=st.integers(0, 2**32 - 1))
def test_direction_quantisation_is_the_closest_neighbour(seed):
  grads = list(np.random.default_rng(seed).standard_normal((3, 500)).astype(
      np.float32))
  strides = (10000, 100, 1)
  steps = edges._neighbour_steps(grads, strides)
  expected = _brute_force_offsets(grads) @ np.array(strides)
  # Allow a float tie on a Voronoi boundary, at most one in 500.
  assert (steps != expected).sum() <= 1


# ----------------------------------------------------------- output, options


def test_output_range_dtype_and_shape(engine):
  vol = _blobs(3, n=24)[:, :20, :18] * 100 - 7
  sketch = edges.canny_3d(vol, sigma=0.8)
  assert sketch.shape == vol.shape and sketch.dtype == np.float32
  assert sketch.min() >= 0 and sketch.max() == pytest.approx(1.0)


@pytest.mark.parametrize("value", [0.0, -1.0, 123.5])
def test_constant_volume_gives_zeros(value, engine):
  sketch = edges.canny_3d(np.full((16, 16, 16), value, np.float32))
  assert sketch.dtype == np.float32
  np.testing.assert_array_equal(sketch, 0)


def test_integer_and_bool_volumes_accepted(engine):
  ball, _ = _ball((10, 10, 10), 6, n=20)
  np.testing.assert_allclose(edges.canny_3d(ball.astype(np.int16)),
                             edges.canny_3d(ball))
  np.testing.assert_allclose(edges.canny_3d(ball.astype(bool)),
                             edges.canny_3d(ball))
  # bfloat16 (numpy's ml_dtypes and jax's), as translate and metrics take.
  import jax.numpy as jnp
  np.testing.assert_allclose(edges.canny_3d(ball.astype(jnp.bfloat16)),
                             edges.canny_3d(ball))
  np.testing.assert_allclose(
      edges.canny_3d(jnp.asarray(ball, jnp.bfloat16),
                     mask=jnp.asarray(ball > 0.5, jnp.bfloat16)),
      edges.canny_3d(ball, mask=ball > 0.5))


def test_invariant_to_affine_intensity_change(engine):
  vol = _blobs(4)
  base = edges.canny_3d(vol) > 0
  scaled = edges.canny_3d(vol * 250.0 - 40.0) > 0
  dice = 2 * (base & scaled).sum() / (base.sum() + scaled.sum())
  assert dice > 0.99


def test_mask_zeroes_edges_outside(engine):
  vol = _blobs(5)
  mask = np.zeros(vol.shape, bool)
  mask[:, :, :16] = True
  unmasked = edges.canny_3d(vol)
  assert (unmasked[~mask] > 0).any()  # otherwise the test proves nothing
  sketch = edges.canny_3d(vol, mask=mask)
  assert (sketch[~mask] == 0).all()
  assert sketch[mask].max() == pytest.approx(1.0)
  # Integer masks work the same.
  np.testing.assert_array_equal(
      edges.canny_3d(vol, mask=mask.astype(np.uint8)), sketch)


def _two_steps(weak, strong, shape=(20, 20, 40)):
  """Planes across the last axis: a step of ``weak`` between x = 9 and 10
  and one of ``strong`` between x = 25 and 26, far enough apart (16 voxels)
  that the smoothing (radius 4) never mixes them."""
  vol = np.zeros(shape, np.float32)
  vol[..., 10:] += weak
  vol[..., 26:] += strong
  return vol


def test_sketch_is_weighted_by_the_gradient_magnitude(engine):
  """The sketch is the gradient magnitude on the edges divided by its
  largest value (METHOD.md: "Canny edges weighted by the gradient
  magnitude (not binary)"): steps of heights 1 and 3 give edges of 1/3 and
  1, and every edge voxel's value is its smoothed gradient magnitude over
  the maximum."""
  vol = _two_steps(1.0, 3.0)
  sketch = edges.canny_3d(vol)
  edge = sketch > 0
  columns = np.flatnonzero(edge.any(axis=(0, 1)))
  # Only the voxels beside the two steps (a tie may keep both of a pair).
  assert set(columns) <= {9, 10, 25, 26}
  weak, strong = sketch[..., 8:12], sketch[..., 24:28]
  assert (weak > 0).any() and (strong > 0).any()
  np.testing.assert_allclose(weak[weak > 0], 1 / 3, rtol=1e-4)
  np.testing.assert_allclose(strong[strong > 0], 1.0, rtol=1e-4)
  # The values are the smoothed gradient magnitude over its maximum.
  smooth = ndimage.gaussian_filter(vol.astype(np.float64), 1.0,
                                   mode="nearest")
  magnitude = np.sqrt(sum(g**2 for g in np.gradient(smooth)))
  np.testing.assert_allclose(sketch[edge],
                             magnitude[edge] / magnitude[edge].max(),
                             rtol=1e-4)


def test_mask_thresholds_use_the_gradients_inside_the_mask(engine):
  """Hysteresis thresholds are fractions of the largest gradient *inside*
  the mask: a step 20 times stronger outside the mask (whose 0.2 of the
  maximum would be 4 times the weak step's magnitude) does not wipe out the
  weak step inside, which becomes the sketch's maximum, 1."""
  vol = _two_steps(1.0, 20.0)
  mask = np.zeros(vol.shape, bool)
  mask[..., :18] = True  # the weak step only
  # Unmasked, the weak step (1/20 of the maximum) is below the low threshold.
  unmasked = edges.canny_3d(vol)
  assert not unmasked[..., :18].any() and unmasked[..., 24:28].any()
  sketch = edges.canny_3d(vol, mask=mask)
  assert not sketch[~mask].any()
  weak = sketch[..., 8:12]
  assert (weak > 0).sum() >= 20 * 20  # the whole plane of the step
  np.testing.assert_allclose(weak[weak > 0], 1.0, rtol=1e-4)
  # Thresholds relative to the mask's maximum: 0.9 of it still keeps the
  # step, whose magnitude is that maximum all along the plane.
  high = edges.canny_3d(vol, low_threshold=0.9, high_threshold=0.9,
                        mask=mask)
  np.testing.assert_array_equal(high > 0, sketch > 0)


@pytest.mark.parametrize("engine", edges.ENGINES)
@settings(deadline=None, max_examples=10)
@given(low=st.floats(0.0, 0.5), high_gap=st.floats(0.0, 0.4),
       raise_by=st.floats(0.0, 0.3))
def test_higher_thresholds_give_a_subset(engine, low, high_gap, raise_by):
  vol = _blobs(6, n=24)
  high = low + high_gap
  loose = edges.canny_3d(vol, low_threshold=low, high_threshold=high,
                         engine=engine) > 0
  strict = edges.canny_3d(vol, low_threshold=low + raise_by,
                          high_threshold=high + raise_by, engine=engine) > 0
  assert not (strict & ~loose).any()


def test_quantile_thresholds(engine):
  vol = _blobs(7)
  sketch = edges.canny_3d(vol, low_threshold=0.8, high_threshold=0.95,
                          use_quantiles=True)
  edge = sketch > 0
  assert edge.any()
  # Only voxels above the 80th percentile of the magnitude can be edges.
  assert edge.mean() <= 0.2
  fewer = edges.canny_3d(vol, low_threshold=0.95, high_threshold=0.99,
                         use_quantiles=True) > 0
  assert fewer.sum() < edge.sum() and not (fewer & ~edge).any()


def test_edge_pyramid_matches_per_scale_canny(engine):
  fine = _blobs(8, n=32)
  coarse = fine[::2, ::2, ::2]
  masks = [None, fine > 0]
  pyramid = edges.edge_pyramid([coarse, fine], masks=masks, sigma=0.7)
  assert [p.shape for p in pyramid] == [coarse.shape, fine.shape]
  np.testing.assert_array_equal(pyramid[0], edges.canny_3d(coarse, sigma=0.7))
  np.testing.assert_array_equal(
      pyramid[1], edges.canny_3d(fine, sigma=0.7, mask=fine > 0))
  with pytest.raises(InputError):
    edges.edge_pyramid([coarse, fine], masks=[None])


# -------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "volume",
    [np.zeros((8, 8)), np.zeros((4, 4, 4, 2)), np.zeros((1, 8, 8)),
     np.array([[[np.nan, 0], [0, 0]], [[0, 0], [0, 0]]]),
     np.full((4, 4, 4), np.inf), np.zeros((4, 4, 4), complex),
     np.full((4, 4, 4), "a")])
def test_bad_volume_raises_input_error(volume):
  with pytest.raises(InputError) as info:
    edges.canny_3d(volume)
  assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs", [
    dict(mask=np.ones((4, 4, 3))),
    dict(low_threshold=0.3, high_threshold=0.2),
    dict(low_threshold=-0.1),
    dict(low_threshold=0.5, high_threshold=1.5, use_quantiles=True),
    dict(low_threshold=0.5, high_threshold=1.0),  # nothing is above the peak
    dict(low_threshold=0.5, high_threshold=1.0, use_quantiles=True),
    dict(sigma=-1.0),
    dict(engine="torch"),
])
def test_bad_options_raise_input_error(kwargs):
  with pytest.raises(InputError):
    edges.canny_3d(np.zeros((4, 4, 4)), **kwargs)


# ------------------------------------------------------------------- labels


def test_add_label_writes_boundary_and_interior():
  rng = np.random.default_rng(0)
  sketch = rng.uniform(0, 1, (24, 24, 24)).astype(np.float32)
  original = sketch.copy()
  label, _ = _ball((12, 11, 13), 5, n=24)
  out = edges.add_label(sketch, label, value=0.9)
  inside = label > 0
  boundary = inside & ~ndimage.binary_erosion(inside)
  assert boundary.any() and (inside & ~boundary).any()
  np.testing.assert_allclose(out[boundary], 0.9)
  np.testing.assert_allclose(out[inside & ~boundary], 0.45)
  np.testing.assert_array_equal(out[~inside], sketch[~inside])
  np.testing.assert_array_equal(sketch, original)  # input untouched
  assert out.dtype == np.float32
  custom = edges.add_label(sketch, label.astype(np.uint8), interior=0.0)
  np.testing.assert_allclose(custom[inside & ~boundary], 0.0)
  np.testing.assert_allclose(custom[boundary], 1.0)


def test_label_boundary_is_closed_and_thin():
  label, _ = _ball((12, 12, 12), 7, n=24)
  boundary = edges.label_boundary(label)
  # Closed: removing it disconnects the interior from the outside.
  assert ndimage.label(~boundary)[1] == 2
  # Thin: eroding the label once removes exactly the boundary.
  np.testing.assert_array_equal(
      boundary, (label > 0) & ~ndimage.binary_erosion(label > 0))


def test_add_label_shape_mismatch_raises():
  with pytest.raises(InputError):
    edges.add_label(np.zeros((8, 8, 8)), np.zeros((8, 8, 7)))


def _off_centre_label(n=32):
  label, _ = _ball((10, 14, 17), 6, n=n)
  return label.astype(np.uint8)


def test_augment_label_is_deterministic_per_seed():
  label = _off_centre_label()
  a = edges.augment_label(label, np.random.default_rng(3))
  b = edges.augment_label(label, np.random.default_rng(3))
  np.testing.assert_array_equal(a, b)
  others = [edges.augment_label(label, np.random.default_rng(s))
            for s in range(4, 10)]
  assert any(not np.array_equal(a, o) for o in others)


@settings(deadline=None, max_examples=15)
@given(seed=st.integers(0, 2**32 - 1))
def test_augment_label_scaling_bounds(seed):
  label = _off_centre_label()
  out = edges.augment_label(label, np.random.default_rng(seed), mirror=False)
  assert out.shape == label.shape and out.dtype == label.dtype
  assert set(np.unique(out)) <= {0, 1}
  ratio = out.sum() / label.sum()
  # Volume scales by factor**3 with factor in [0.85, 1.15]; allow 25 % for
  # the voxel grid: nearest-neighbour resampling of a radius-6 ball moves
  # its ~450 surface voxels in or out (seen: 0.52 to 1.73 over 300 seeds).
  assert 0.85**3 * 0.75 <= ratio <= 1.15**3 * 1.25
  # Scaling is about the centre of mass, which stays put.
  np.testing.assert_allclose(ndimage.center_of_mass(out),
                             ndimage.center_of_mass(label), atol=1.0)


def test_augment_label_without_changes_is_identity():
  label = _off_centre_label()
  out = edges.augment_label(label, np.random.default_rng(0), scale_range=0.0,
                            mirror=False)
  np.testing.assert_array_equal(out, label)


def test_augment_label_mirrors_along_the_given_axes():
  label = _off_centre_label()
  for axes in [(0,), (1, 2)]:
    seen = set()
    for seed in range(20):
      out = edges.augment_label(label, np.random.default_rng(seed),
                                scale_range=0.0, axes=axes)
      matches = [a for a in axes if np.array_equal(out, np.flip(label, a))]
      if np.array_equal(out, label):
        seen.add(None)
      else:
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == {None, *axes}  # both outcomes, every allowed axis


def test_augment_label_bad_input():
  rng = np.random.default_rng(0)
  with pytest.raises(InputError):
    edges.augment_label(np.zeros((8, 8)), rng)
  with pytest.raises(InputError):
    edges.augment_label(np.zeros((8, 8, 8)), np.random.RandomState(0))
  with pytest.raises(InputError):
    edges.augment_label(np.zeros((8, 8, 8)), rng, scale_range=1.0)
  with pytest.raises(InputError):
    edges.augment_label(np.zeros((8, 8, 8)), rng, axes=(3,))


def test_augment_label_empty_label():
  empty = np.zeros((8, 8, 8), bool)
  out = edges.augment_label(empty, np.random.default_rng(0))
  assert out.dtype == bool and not out.any()


@pytest.mark.parametrize("kwargs", [{}, {"sigma": 0}, {"sigma": 2.0},
                                    {"use_quantiles": True,
                                     "low_threshold": 0.5,
                                     "high_threshold": 0.9},
                                    {"mask": "half"}])
@pytest.mark.parametrize("shape", [(70, 33, 41), (2, 5, 7), (9, 12, 10)])
def test_canny_on_slabs_in_threads_is_bitwise_the_one_thread_result(
    monkeypatch, kwargs, shape):
  # Smoothing, gradients and non-maximum suppression run on slabs of planes
  # with a halo (the smoothing radius plus one); tiny slabs put slab edges
  # everywhere, including inside the smoothing radius of the volume's ends.
  v = np.random.default_rng(sum(shape)).random(shape).astype(np.float32)
  if kwargs.get("mask") == "half":
    kwargs = dict(kwargs, mask=v > 0.3)
  monkeypatch.setattr(edges, "EDGE_THREADS", 1)
  want = edges.canny_3d(v, engine="numpy", **kwargs)
  monkeypatch.setattr(edges, "EDGE_THREADS", 4)
  monkeypatch.setattr(edges, "_SLAB_PLANES", 2)
  got = edges.canny_3d(v, engine="numpy", **kwargs)
  np.testing.assert_array_equal(got, want)
  assert want.any()


@pytest.mark.parametrize("kwargs", [{}, {"sigma": 0}, {"sigma": 1.7},
                                    {"use_quantiles": True,
                                     "low_threshold": 0.5,
                                     "high_threshold": 0.9},
                                    {"mask": "half"}])
@pytest.mark.parametrize("shape", [(70, 33, 41), (2, 5, 7), (9, 12, 10),
                                   (33, 2, 17)])
def test_jax_engine_agrees_with_the_numpy_engine(kwargs, shape):
  # The engines share the arithmetic but for the smoothing's precision
  # (float32 in JAX, float64 in scipy): the same edges but for voxels within
  # rounding of a tie, the same values to rounding. Shapes: deeper
  # than a slab (the last slab overlaps the one before), 2-voxel sides,
  # sides that are not multiples of the slab bucket. (Gradients are
  # differences of nearby smoothed values, so the smoothing's float32
  # rounding reaches them amplified: ~1e-5 of the sketch's maximum.)
  rng = np.random.default_rng(sum(shape))
  v = ndimage.gaussian_filter(rng.random(shape), 1.0).astype(np.float32)
  v += 0.05 * rng.random(shape).astype(np.float32)
  if kwargs.get("mask") == "half":
    kwargs = dict(kwargs, mask=v > np.median(v))
  want = edges.canny_3d(v, engine="numpy", **kwargs)
  got = edges.canny_3d(v, engine="jax", **kwargs)
  assert (want > 0).sum() > 3
  differ = ((got > 0) != (want > 0)).sum()
  assert differ <= max(1, 1e-3 * (want > 0).sum()), differ
  both = (got > 0) & (want > 0)
  np.testing.assert_allclose(got[both], want[both], rtol=0, atol=2e-5)


@pytest.mark.parametrize("sigma", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("shape", [(70, 33, 41), (5, 19, 2)])
def test_jax_engine_slabs_are_bitwise_one_slab(monkeypatch, sigma, shape):
  # Slabs of 3 planes (a halo bigger than the slab, overlapping last slab)
  # and rows/columns padded to the bucket or not: the same bits as one slab.
  v = np.random.default_rng(9).random(shape).astype(np.float32)
  monkeypatch.setattr(edges, "JAX_SLAB_PLANES", {"cpu": 128, "gpu": 128})
  monkeypatch.setattr(edges, "_JAX_BUCKET", 1)
  want = edges.canny_3d(v, sigma=sigma, engine="jax")
  assert want.any()
  for planes, bucket in [(3, 1), (3, 16), (16, 32)]:
    monkeypatch.setattr(edges, "JAX_SLAB_PLANES", {"cpu": planes,
                                                   "gpu": planes})
    monkeypatch.setattr(edges, "_JAX_BUCKET", bucket)
    np.testing.assert_array_equal(
        edges.canny_3d(v, sigma=sigma, engine="jax"), want)


@pytest.mark.parametrize("sigma", [0.0, 1.0])
@pytest.mark.parametrize("shape,planes,bucket", [
    ((70, 33, 41), 16, 16), ((70, 33, 41), 3, 1), ((5, 19, 2), 32, 16)])
def test_jax_sparse_transfer_is_bitwise_the_dense_one(monkeypatch, sigma,
                                                      shape, planes, bucket):
  """`edges.JAX_SPARSE_TRANSFER`: candidates compacted on the device, in
  two passes over slabs (overlapping last slab, padded rows and columns),
  a slab over `SPARSE_CAPACITY` sent dense: the same sketch, bit for bit;
  with a mask or quantiles the dense path runs."""
  rng = np.random.default_rng(11)
  n = max(shape)
  ball, _ = _ball((0.4 * n, 0.5 * n, 0.55 * n), 0.3 * n, n=n)
  vols = [rng.random(shape).astype(np.float32),  # 40 % local maxima
          _blobs(4, n)[:shape[0], :shape[1], :shape[2]],
          ball[:shape[0], :shape[1], :shape[2]]]  # a thin surface
  monkeypatch.setattr(edges, "JAX_SLAB_PLANES", {"cpu": planes,
                                                 "gpu": planes})
  monkeypatch.setattr(edges, "_JAX_BUCKET", bucket)
  for v in vols:
    want = edges.canny_3d(v, sigma=sigma, engine="jax")
    monkeypatch.setattr(edges, "JAX_SPARSE_TRANSFER", True)
    for capacity in (1.0, 1 / 16, 1e-4):  # 1e-4: every slab over it
      monkeypatch.setattr(edges, "SPARSE_CAPACITY", capacity)
      np.testing.assert_array_equal(
          edges.canny_3d(v, sigma=sigma, engine="jax"), want)
    monkeypatch.setattr(edges, "JAX_SPARSE_TRANSFER", False)
  monkeypatch.setattr(edges, "JAX_SPARSE_TRANSFER", True)
  np.testing.assert_array_equal(edges.canny_3d(np.zeros(shape), engine="jax"),
                                np.zeros(shape))
  monkeypatch.setattr(edges, "_SPARSE_EXECUTABLES", {})
  edges.compile_canny(shape, sigma)  # the cascade's plan compiles them too
  assert len(edges._SPARSE_EXECUTABLES) == 1

  def refuse(*a, **k):
    raise AssertionError("the sparse path ran")
  monkeypatch.setattr(edges, "_candidates_jax_sparse", refuse)
  edges.canny_3d(vols[1], engine="jax", mask=np.ones(vols[1].shape))
  edges.canny_3d(vols[1], engine="jax", use_quantiles=True)


def test_jax_sparse_transfer_brings_back_what_it_found(monkeypatch):
  """Per slab the first n >= count candidates (n a power of two), not the
  whole capacity; slabs of 2³¹ voxels or more take the dense path."""
  import jax
  monkeypatch.setattr(edges, "JAX_SPARSE_TRANSFER", True)
  monkeypatch.setattr(edges, "JAX_SLAB_PLANES", {"cpu": 16, "gpu": 16})
  got = []
  real = jax.device_get

  def device_get(x):
    got.append([a.shape for a in x])
    return real(x)
  monkeypatch.setattr(jax, "device_get", device_get)
  v, _ = _ball((23.6, 24.2, 24.9), 15.0, n=48)
  sketch = edges.canny_3d(v, engine="jax")
  assert sketch.any() and len(got) == 3  # 48 planes: 3 slabs
  capacity = int(edges.SPARSE_CAPACITY * 16 * 48 * 48)
  for (n,), (m,) in got:
    assert n == m and 0 < n < capacity and n & (n - 1) == 0
  monkeypatch.setattr(edges, "_jax_geometry",
                      lambda *a: (128, 4096, 4096, 5))
  assert edges._canny_jax_sparse(v, 1.0, 0.1, 0.2) is None


def test_jax_engine_compiles_once_per_bucket(monkeypatch):
  monkeypatch.setattr(edges, "_EXECUTABLES", {})
  rng = np.random.default_rng(10)
  edges.compile_canny((30, 33, 47), sigma=1.0)
  assert len(edges._EXECUTABLES) == 1
  for shape in [(30, 33, 47), (31, 40, 44), (20, 48, 33)]:  # one bucket
    edges.canny_3d(rng.random(shape), engine="jax")
  assert len(edges._EXECUTABLES) == 1
  edges.canny_3d(rng.random((30, 50, 47)), engine="jax")  # rows: next bucket
  edges.canny_3d(rng.random((30, 33, 47)), sigma=2.0, engine="jax")
  assert len(edges._EXECUTABLES) == 3


@pytest.mark.parametrize("engine,threads", [("numpy", 1), ("numpy", 2),
                                            ("jax", 1)])
@pytest.mark.parametrize("layout", ["flipped", "transposed", "fortran"])
def test_canny_does_not_depend_on_the_memory_layout(monkeypatch, layout,
                                                    engine, threads):
  monkeypatch.setattr(edges, "EDGE_THREADS", threads)
  monkeypatch.setattr(edges, "ENGINE", engine)
  v = np.random.default_rng(1).random((40, 37, 39)).astype(np.float32)
  view = {"flipped": v[::-1], "transposed": v.transpose(2, 1, 0),
          "fortran": np.asfortranarray(v)}[layout]
  mask = view > 0.2
  for kwargs in ({}, {"mask": mask}, {"mask": np.asfortranarray(mask)}):
    np.testing.assert_array_equal(
        edges.canny_3d(view, **kwargs),
        edges.canny_3d(np.ascontiguousarray(view),
                       **{k: np.ascontiguousarray(m)
                          for k, m in kwargs.items()}))


def _hysteresis_reference(weak, magnitude, high):
  labels, count = ndimage.label(weak, structure=np.ones((3, 3, 3), bool))
  strong = np.zeros(count + 1, bool)
  strong[labels[weak & (magnitude > high)]] = True
  strong[0] = False
  return strong[labels]


@pytest.mark.parametrize("threads,planes,density", [
    (1, 16, 0), (4, 2, 0), (7, 1, 0), (1, 16, 1.0), (2, 2, 1 / 256)])
def test_hysteresis_joins_components_across_slabs(monkeypatch, threads,
                                                  planes, density):
  # Labels come from slabs of planes labelled in threads and joined across
  # the slab cuts (density 0), or from the weak voxels' neighbours among
  # their indices (density 1; 1/256: the default switch, here per case):
  # a U whose arms meet only in the last slab, a line that crosses every
  # cut diagonally only, and random sparse masks must keep exactly what
  # whole-volume labelling keeps.
  monkeypatch.setattr(edges, "EDGE_THREADS", threads)
  monkeypatch.setattr(edges, "_SLAB_PLANES", planes)
  monkeypatch.setattr(edges, "SPARSE_HYSTERESIS_DENSITY", density)
  shape = (12, 9, 10)
  u = np.zeros(shape, bool)
  u[:, 2, 2] = u[:, 2, 7] = True  # two arms through every slab
  u[-1, 2, 2:8] = True  # joined at the far end only
  diag = np.zeros(shape, bool)
  for z in range(shape[0]):
    diag[z, min(z, 8), min(z, 9)] = True  # touches the next plane diagonally
  rng = np.random.default_rng(3)
  cases = [u, diag] + [rng.random(shape) > q for q in (0.7, 0.85, 0.95)]
  for weak in cases:
    magnitude = np.zeros(shape, np.float32)
    magnitude[weak] = 0.5
    # One strong voxel per case, far from most of its component.
    z, y, x = np.argwhere(weak)[0]
    magnitude[z, y, x] = 1.0
    idx, keep = edges._hysteresis_sparse(weak, magnitude, 0.8)
    got = np.zeros(shape, bool)
    got.reshape(-1)[idx[keep]] = True
    want = _hysteresis_reference(weak, magnitude, 0.8)
    np.testing.assert_array_equal(got, want)
    # From the indices alone (the weak volume made from them if needed).
    np.testing.assert_array_equal(edges._hysteresis(
        idx, magnitude.reshape(-1)[idx], 0.8, shape), keep)
  # The U and the line are single components: kept whole from one voxel.
  for weak in (u, diag):
    magnitude = np.where(weak, 0.5, 0).astype(np.float32)
    magnitude[0, 2, 2] = magnitude[0, 0, 0] = 1.0
    idx, keep = edges._hysteresis_sparse(weak, magnitude, 0.8)
    assert keep.all()


@pytest.mark.parametrize("shape", [(2, 2, 2), (7, 3, 5), (12, 2, 9)])
def test_gradient_into_is_bitwise_np_gradient(shape):
  v = np.random.default_rng(4).normal(size=shape).astype(np.float32)
  want = np.gradient(v)
  n = shape[0]
  for lo, hi in [(0, n), (0, 1), (n - 1, n), (1, n - 1), (n // 2, n)]:
    if hi <= lo:
      continue
    outs = [np.full((hi - lo,) + shape[1:], np.nan, np.float32)
            for _ in range(3)]
    edges._gradient_into(v, lo, hi, outs)
    for got, w in zip(outs, want):
      np.testing.assert_array_equal(got, w[lo:hi])


@pytest.mark.parametrize("engine", edges.ENGINES)
@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_canny_leaves_its_input_unchanged(engine, sigma):
  # A float32 C-ordered input is used in place (not copied): it must only
  # be read.
  v = _blobs(11, n=20)
  before = v.copy()
  edges.canny_3d(v, sigma=sigma, engine=engine, mask=v > 0)
  np.testing.assert_array_equal(v, before)


@pytest.mark.parametrize("engine", ["jax", "numpy"])
def test_canny_does_not_depend_on_the_intensity_scale(engine):
  # float32 squared gradients overflow (or underflow) at extreme scales: the
  # sketch used to be all zeros there.
  rng = np.random.default_rng(0)
  x = ndimage.gaussian_filter(rng.normal(size=(20, 20, 20)), 2).astype(
      np.float32)
  ref = edges.canny_3d(x, engine=engine)
  assert (ref > 0).sum() > 1000
  for scale in (1e-25, 1e-12, 1e12, 1e30):
    got = edges.canny_3d(x.astype(np.float64) * scale, engine=engine)
    np.testing.assert_array_equal(got > 0, ref > 0)
    np.testing.assert_allclose(got, ref, atol=1e-5)
  np.testing.assert_array_equal(edges._well_scaled(x), x)
  assert edges._well_scaled(x) is x
