"""The paper's baselines: patch-wise GAN, small GAN + upsampling, NLM."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megan_jax import baselines, configs, resample, tiling
from megan_jax import state as state_lib
from megan_jax.errors import InputError


@pytest.fixture(scope="module")
def pg_config():
  return baselines.patch_gan_config(configs.get_config("demo:smoke"))


def test_patch_gan_config_sees_edges_only(pg_config):
  base = configs.get_config("demo:smoke")
  assert base.hr_condition != "none" and pg_config.hr_condition == "none"
  batch = {k: jnp.ones(s) for k, s in
           state_lib.input_shapes(pg_config, "hr", 2).items()}
  x = state_lib.generator_input(batch, pg_config, "hr")
  assert x.shape[-1] == 1  # edges only
  d_in = state_lib.discriminator_input(batch, batch["target"], "hr", pg_config)
  assert d_in.shape[-1] == 2  # (edges, image): no previous scale either
  assert state_lib.generator_input(batch, base, "hr").shape[-1] == 2


def test_patch_gan_is_the_generator_tiled_on_the_full_volume(pg_config):
  st = state_lib.create_state(jax.random.key(3), pg_config, "hr")
  pg = baselines.PatchGan(pg_config, st.g_params, intensity=(0.0, 1.0),
                          batch_size=3)
  rng = np.random.default_rng(0)
  image = np.clip(rng.normal(0, 0.5, (21, 18, 25)), -1, 1).astype(np.float32)
  y = pg.translate_normalised(image)
  assert y.shape == image.shape and np.isfinite(y).all()
  # The same volume by hand: every patch at once, stitched.
  from megan_jax import edges as edges_lib
  c = pg_config
  sketch = edges_lib.canny_3d(image, sigma=c.edges.sigma,
                              low_threshold=c.edges.low,
                              high_threshold=c.edges.high)
  plan = tiling.make_plan(image.shape, c.patch_size, c.border)
  patches = tiling.extract(sketch, plan, pad_value=0.0)[..., None]
  g = state_lib.build_generator(c, "hr")
  gen = g.apply(st.g_params, jnp.asarray(patches), train=False)[..., 0]
  want = tiling.stitch(np.asarray(gen), plan)
  np.testing.assert_allclose(y, want, atol=1e-5)
  assert pg.plan.num_patches == plan.num_patches > 1


def test_patch_gan_refuses_a_cascade_config():
  c = configs.get_config("demo:smoke")
  with pytest.raises(InputError, match="hr_condition"):
    baselines.PatchGan(c, {})


def test_upsample_lr_follows_the_cascade_grid():
  shape = (37, 30, 26)  # not multiples of 4: ceil at every scale
  lr_shape = resample.scale_shapes(shape, 2)[0]
  const = np.full(lr_shape, 0.25, np.float32)
  y = baselines.upsample_lr(const, shape)
  assert y.shape == shape
  np.testing.assert_allclose(y, 0.25, atol=1e-6)
  # A ramp along axis 0 stays monotone and within the input's range.
  ramp = np.broadcast_to(np.linspace(-0.5, 0.5, lr_shape[0])[:, None, None],
                         lr_shape).astype(np.float32)
  y = baselines.upsample_lr(ramp, shape)
  profile = y[:, 5, 5]
  assert np.all(np.diff(profile) >= -1e-6)
  assert profile.min() >= -0.5 - 1e-6 and profile.max() <= 0.5 + 1e-6
  with pytest.raises(InputError, match="no scale"):
    baselines.upsample_lr(np.zeros((5, 5, 5), np.float32), shape)


def test_nlm_removes_noise():
  rng = np.random.default_rng(1)
  z, y, x = np.mgrid[:24, :24, :24] / 24.0
  clean = (0.5 + 0.3 * np.sin(3 * z) * np.cos(2 * y) * (x > 0.5)).astype(
      np.float32)
  noisy = clean + rng.normal(0, 0.08, clean.shape).astype(np.float32)
  den, _ = baselines.nlm(noisy)
  assert den.shape == clean.shape
  err = lambda a: float(np.mean((a - clean) ** 2))
  assert err(den) < 0.5 * err(noisy)


def test_noise_sigma_recovers_white_noise():
  rng = np.random.default_rng(2)
  smooth = np.linspace(0, 0.2, 32)[:, None, None] * np.ones((32, 32, 32))
  for sigma in (0.02, 0.1):
    noisy = smooth + rng.normal(0, sigma, smooth.shape)
    assert baselines.noise_sigma(noisy) == pytest.approx(sigma, rel=0.1)



def test_noise_sigma_ignores_the_clipped_background():
  # A skull-stripped image: two thirds exactly 0, noise inside. The median
  # over every pair was 0 there, and NLM then returned its input unchanged.
  rng = np.random.default_rng(3)
  image = np.zeros((30, 30, 30), np.float32)
  inside = np.zeros(image.shape, bool)
  inside[5:22, 4:25, 6:20] = True
  image[inside] = 0.5 + rng.normal(0, 0.01, inside.sum())
  image = np.clip(image, 0, 1)
  assert baselines.noise_sigma(image) == pytest.approx(0.01, rel=0.15)
  den, _ = baselines.nlm(image)
  assert np.abs(den - image)[inside].mean() > 1e-3  # it did something
  assert baselines.noise_sigma(inside.astype(np.float32)) == 0.0  # binary


@pytest.mark.parametrize("h_factor", [0.8, 0.35])
def test_nlm_uses_h_factor_times_sigma(monkeypatch, h_factor):
  """``nlm`` hands skimage ``h = h_factor · sigma`` with ``sigma`` from
  ``noise_sigma``, 3D fast mode, and its patch parameters."""
  import skimage.restoration
  seen = {}

  def fake(image, **kw):
    seen.update(kw)
    return image
  monkeypatch.setattr(skimage.restoration, "denoise_nl_means", fake)
  rng = np.random.default_rng(4)
  image = (0.5 + rng.normal(0, 0.05, (12, 12, 12))).astype(np.float32)
  sigma = baselines.noise_sigma(image)
  den, _ = baselines.nlm(image, h_factor=h_factor, patch_size=3,
                         patch_distance=2)
  np.testing.assert_array_equal(den, image)
  assert seen["sigma"] == pytest.approx(sigma, rel=1e-6)
  assert seen["h"] == pytest.approx(h_factor * sigma, rel=1e-6)
  assert seen["fast_mode"] is True
  assert seen["patch_size"] == 3 and seen["patch_distance"] == 2


def test_patch_gan_translate_restores_the_input_grid(pg_config):
  """A ``Volume`` stored in another voxel order (S, L, P) at another spacing
  (3 mm vs the config's 4 mm) comes back on its own grid: the input's shape,
  equal to the array path on the working grid restored by
  ``grid.to_working(...).restore``."""
  from megan_jax import grid, io
  assert pg_config.data.orientation == "RAS" and pg_config.data.spacing == 4.0
  st = state_lib.create_state(jax.random.key(5), pg_config, "hr")
  pg = baselines.PatchGan(pg_config, st.g_params, intensity=(10.0, 50.0),
                          batch_size=4)
  affine = np.array([[0, -3.0, 0, 30], [0, 0, -3.0, 20], [3.0, 0, 0, -10],
                     [0, 0, 0, 1]])
  rng = np.random.default_rng(6)
  z, y, x = np.mgrid[:15, :21, :18]
  data = (100 + 40 * (z > 7) + 30 * np.sin(y / 3.0) * (x > 6)
          + rng.normal(0, 3, z.shape)).astype(np.float32)
  vol = io.Volume(data, affine)
  out = pg.translate(vol)
  assert out.shape == data.shape
  work = grid.to_working(vol, pg_config)
  assert work.volume.data.shape != data.shape  # really another grid
  want = work.restore(pg.translate(work.volume.data))
  np.testing.assert_allclose(out, want, atol=1e-3)
  assert 10.0 - 1e-4 <= out.min() and out.max() <= 50.0 + 1e-4
