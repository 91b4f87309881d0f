"""Tests for megan_jax.resample: scale shapes, padding and resampling."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megan_jax import resample


def _rand(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _repeat3(x, k=2):
  for a in range(3):
    x = np.repeat(x, k, axis=a)
  return x


@pytest.mark.parametrize("shape,n", [
    ((155, 240, 240), 2),
    ((512, 512, 512), 3),
    ((97, 64, 33), 3),
    ((5, 6, 7), 0),
    ((1, 2, 3), 2),
])
def test_scale_shapes(shape, n):
  shapes = resample.scale_shapes(shape, n)
  assert len(shapes) == n + 1
  assert shapes[-1] == shape
  for k, s in enumerate(shapes):
    assert s == tuple(int(np.ceil(d / 2**(n - k))) for d in shape)
  # Each HR scale doubles the previous one, then crops to the ceil size.
  for coarse, fine in zip(shapes, shapes[1:]):
    assert all(f in (2 * c - 1, 2 * c) for c, f in zip(coarse, fine))


def test_scale_shapes_examples_from_the_paper():
  assert resample.scale_shapes((155, 240, 240), 2) == [
      (39, 60, 60), (78, 120, 120), (155, 240, 240)]
  assert resample.scale_shapes(512, 3) == [(64,) * 3, (128,) * 3, (256,) * 3,
                                           (512,) * 3]
  with pytest.raises(ValueError, match="-1"):
    resample.scale_shapes(64, -1)


@pytest.mark.parametrize("shape", [(4, 6, 8), (5, 7, 3), (1, 1, 1), (9, 2, 5)])
def test_downsample2_constant_and_shape(shape):
  v = np.full(shape, 0.3, np.float32)
  d = resample.downsample2(v)
  assert d.shape == tuple(-(-n // 2) for n in shape)
  np.testing.assert_allclose(d, 0.3, rtol=1e-6)


def test_downsample2_inverts_nearest_upsampling():
  x = _rand((3, 5, 4))
  np.testing.assert_array_equal(resample.downsample2(_repeat3(x)), x)
  # Also for odd shapes: cropping the last voxel and replicating it back.
  fine = _repeat3(x)[:5, :9, :7]
  np.testing.assert_array_equal(resample.downsample2(fine), x)


def test_downsample2_odd_axis_replicates_last_plane():
  v = _rand((3, 5, 4))
  d = resample.downsample2(v)
  # Brute force: the block mean with indices clamped into the volume.
  for i, j, k in itertools.product(*(range(n) for n in d.shape)):
    vals = [v[min(2 * i + a, 2), min(2 * j + b, 4), min(2 * k + c, 3)]
            for a in (0, 1) for b in (0, 1) for c in (0, 1)]
    np.testing.assert_allclose(d[i, j, k], np.mean(vals), rtol=1e-5, atol=1e-6)


# A few shapes only: the jax path compiles once per shape.
@pytest.mark.parametrize("shape,channels", [
    ((4, 6, 8), False), ((5, 1, 7), True), ((1, 9, 2), False)])
def test_numpy_and_jax_agree(shape, channels):
  full = shape + ((2,) if channels else ())
  v = _rand(full, seed=sum(shape))
  vj = jnp.asarray(v)
  fine = tuple(2 * n - (n % 2) for n in shape)  # an odd crop where possible
  for fn in (resample.downsample2,
             lambda x: resample.upsample2(x, fine),
             lambda x: resample.nearest_upsample2(x, fine),
             lambda x: resample.resize(x, (3, 4, 5), "area")):
    a, b = fn(v), fn(vj)
    assert isinstance(a, np.ndarray) and isinstance(b, jax.Array)
    assert a.shape == b.shape
    np.testing.assert_allclose(a, np.asarray(b), rtol=1e-5, atol=1e-6)


def test_upsample2_matches_jax_image_resize():
  v = _rand((4, 5, 6, 2))
  ref = jax.image.resize(jnp.asarray(v), (8, 10, 12, 2), "trilinear")
  np.testing.assert_allclose(resample.upsample2(v), np.asarray(ref),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(resample.upsample2(v, (7, 10, 11))[..., 0],
                             np.asarray(ref)[:7, :10, :11, 0],
                             rtol=1e-5, atol=1e-6)


def test_upsample2_preserves_constants_and_interior_ramps():
  np.testing.assert_allclose(
      resample.upsample2(np.full((3, 4, 5), -0.5, np.float32)), -0.5)
  n = 6
  i = np.arange(n, dtype=np.float32)
  ramp = 0.2 * i[:, None, None] - 0.1 * i[None, :, None] + 0.05 * i[None, None]
  ramp = ramp + 0.3
  up = resample.upsample2(ramp)
  # Half-pixel centres: fine voxel j sits at coarse coordinate (j + .5)/2 - .5.
  x = (np.arange(2 * n) + 0.5) / 2 - 0.5
  expect = (0.2 * x[:, None, None] - 0.1 * x[None, :, None]
            + 0.05 * x[None, None] + 0.3)
  inner = (slice(1, -1),) * 3  # edges clamp instead of extrapolating
  np.testing.assert_allclose(up[inner], expect[inner], rtol=1e-5, atol=1e-6)


def test_nearest_upsample2_and_crop_errors():
  x = _rand((2, 3, 4))
  np.testing.assert_array_equal(resample.nearest_upsample2(x), _repeat3(x))
  with pytest.raises(ValueError, match=r"\(5, 6, 8\)"):
    resample.upsample2(x, (5, 6, 8))


def test_resize_area_and_linear():
  x = _rand((3, 4, 5))
  # Area: shrinking a nearest x2 upsampling gives the original back.
  np.testing.assert_allclose(resample.resize(_repeat3(x), x.shape, "area"), x,
                             rtol=1e-5, atol=1e-6)
  # Area preserves the mean whenever the ratio divides evenly or not.
  y = _rand((12, 10, 9), seed=1)
  z = resample.resize(y, (5, 4, 3), "area")
  assert z.shape == (5, 4, 3)
  np.testing.assert_allclose(z.mean(), y.mean(), rtol=1e-4, atol=1e-5)
  const = np.full((7, 8, 9), 0.25)
  np.testing.assert_allclose(resample.resize(const, (4, 3, 5), "area"), 0.25,
                             rtol=1e-6)
  # Linear is trilinear upsampling for x2.
  np.testing.assert_allclose(resample.resize(x, (6, 8, 10)),
                             resample.upsample2(x), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="cubic"):
    resample.resize(x, (6, 8, 10), "cubic")


@pytest.mark.parametrize("shape,n", [((20, 13, 7), 2), ((9, 16, 11), 1)])
def test_pyramid(shape, n):
  v = _rand(shape)
  levels = resample.pyramid(v, n)
  assert [l.shape for l in levels] == resample.scale_shapes(shape, n)
  assert levels[-1] is v
  for coarse, fine in zip(levels, levels[1:]):
    np.testing.assert_array_equal(coarse, resample.downsample2(fine))


@pytest.mark.parametrize("shape,target", [
    ((5, 7, 8), (8, 8, 8)), ((1, 2, 3), (4, 7, 3)), ((3, 3, 3), (3, 3, 3))])
def test_pad_to_round_trip(shape, target):
  v = _rand(shape)
  for x in (v, jnp.asarray(v)):
    padded, crop = resample.pad_to(x, target, pad_value=-1.0)
    assert padded.shape == target
    np.testing.assert_array_equal(np.asarray(padded[crop]), v)
    mask = np.ones(target, bool)
    mask[crop] = False
    assert (np.asarray(padded)[mask] == -1.0).all()
    # Centred: padding before and after differ by at most one voxel.
    for s, t, c in zip(shape, target, crop):
      assert 0 <= (t - c.stop) - c.start <= 1


def test_lr_pad_keeps_sketch_and_output_aligned():
  shape0 = (5, 8, 3)
  out0 = _rand(shape0)
  sketch = _repeat3(out0)[:9, :, :5]  # a scale-1-like volume (odd crops)
  padded0, crop0 = resample.lr_pad(out0, 8)
  padded1, crop1 = resample.lr_pad(sketch, 8, factor=2)
  assert padded0.shape == (8,) * 3 and padded1.shape == (16,) * 3
  np.testing.assert_array_equal(padded0[crop0], out0)
  np.testing.assert_array_equal(padded1[crop1], sketch)
  for c0, c1 in zip(crop0, crop1):
    assert c1.start == 2 * c0.start
  # The padded sketch is the padded output at twice the resolution (up to the
  # crop of odd axes, which the sketch fills with background).
  up = _repeat3(padded0)
  inside = padded1 != -1.0
  np.testing.assert_array_equal(padded1[inside], up[inside])


def test_lr_size_error_says_what_fits():
  with pytest.raises(ValueError, match=r"lr_size >= 150 or 2 more HR scale"):
    resample.lr_pad(np.zeros((150, 40, 60)), 64)
  with pytest.raises(ValueError, match="lr_size 64"):
    resample.check_lr_size((64, 65, 1), 64)
  resample.check_lr_size((64, 64, 1), 64)  # fits: no error
  # a size the networks take: rounded up to their multiple
  with pytest.raises(ValueError, match=r"lr_size >= 152 or 2 more"):
    resample.check_lr_size((150, 40, 60), 64, multiple=8)
