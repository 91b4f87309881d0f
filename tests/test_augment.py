"""Tests for megan_jax.augment."""
import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi

from megan_jax import augment
from megan_jax.errors import InputError

# Only the blur / only the half resolution / only the noise.
BLUR_ONLY = dict(noise_std=0.0, blur_prob=1.0, halfres_prob=0.0)
HALF_ONLY = dict(noise_std=0.0, blur_prob=0.0, halfres_prob=1.0)
NOISE_ONLY = dict(blur_prob=0.0, halfres_prob=0.0)


def _patches(seed, shape=(4, 8, 8, 8)):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.uniform(-0.8, 0.8, size=shape), jnp.float32)


def test_deterministic_for_a_key_and_different_keys_differ():
  x = _patches(0)
  a = augment.augment_previous(jax.random.key(1), x)
  b = augment.augment_previous(jax.random.key(1), x)
  c = augment.augment_previous(jax.random.key(2), x)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  assert a.shape == x.shape and a.dtype == x.dtype


@pytest.mark.parametrize("option,prob",
                         [("blur_prob", 0.3), ("halfres_prob", 0.2)])
def test_fraction_of_degraded_patches(option, prob):
  # Each patch is degraded independently with probability p, so the count of
  # degraded patches among n is Binomial(n, p): its fraction has standard
  # deviation sqrt(p (1 - p) / n) <= 0.0103 for n = 2000, and the tolerance
  # 0.05 is about 5 of those. With noise off, a random patch changes exactly
  # when it is degraded (blurring or pooling i.i.d. noise always changes it).
  n = 2000
  x = _patches(3, (n, 4, 4, 4))
  kwargs = dict(noise_std=0.0, blur_prob=0.0, halfres_prob=0.0)
  kwargs[option] = prob
  y = augment.augment_previous(jax.random.key(4), x, **kwargs)
  changed = np.any(np.abs(np.asarray(y - x)) > 1e-6, axis=(1, 2, 3))
  assert abs(changed.mean() - prob) < 0.05


def test_blur_and_half_resolution_draws_are_independent():
  # Same key, one option switched off: the other's decisions are unchanged.
  n = 400
  x = _patches(5, (n, 4, 4, 4))
  key = jax.random.key(6)
  blur = augment.augment_previous(
      key, x, noise_std=0.0, blur_prob=0.3, halfres_prob=0.0)
  both = augment.augment_previous(
      key, x, noise_std=0.0, blur_prob=0.3, halfres_prob=0.2)
  blurred = np.any(np.abs(np.asarray(blur - x)) > 1e-6, axis=(1, 2, 3))
  untouched = np.all(np.abs(np.asarray(both - x)) <= 1e-6, axis=(1, 2, 3))
  # A patch left alone with both options on was not blurred with one.
  assert not np.any(untouched & blurred)
  assert 0 < untouched.sum() < n


def test_blur_and_half_resolution_happen_together_by_chance_alone():
  """Blur and half resolution are drawn independently per patch (each from
  its own key): with both at p = 0.5 about a quarter of the patches get
  both, a quarter neither (a shared draw would give a half each). Which
  patch got what is read off the output alone (noise off): a halved patch
  is 2x2x2 block-constant (`half_resolution` leaves it as it is), and it
  was blurred first unless it equals the halved input; a patch that was not
  halved was blurred exactly when it changed."""
  n = 2000
  x = _patches(30, (n, 4, 4, 4))
  y = augment.augment_previous(jax.random.key(31), x, noise_std=0.0,
                               blur_prob=0.5, halfres_prob=0.5)
  differs = lambda a, b: np.any(np.abs(np.asarray(a - b)) > 1e-5,
                                axis=(1, 2, 3))
  halve = jax.vmap(augment.half_resolution)  # per patch
  halved = ~differs(halve(y), y)
  blurred = np.where(halved, differs(y, halve(x)), differs(y, x))
  # Binomial(2000, p) fractions: sd <= 0.0112; the tolerances are ~4.5 sd.
  assert abs(blurred.mean() - 0.5) < 0.05
  assert abs(halved.mean() - 0.5) < 0.05
  assert abs((blurred & halved).mean() - 0.25) < 0.05
  assert abs((~blurred & ~halved).mean() - 0.25) < 0.05
  # The same decisions as with one option on and the other off (same key).
  only_blur = augment.augment_previous(jax.random.key(31), x, noise_std=0.0,
                                       blur_prob=0.5, halfres_prob=0.0)
  only_half = augment.augment_previous(jax.random.key(31), x, noise_std=0.0,
                                       blur_prob=0.0, halfres_prob=0.5)
  np.testing.assert_array_equal(differs(only_blur, x), blurred)
  np.testing.assert_array_equal(differs(only_half, x), halved)


def test_defaults_are_the_papers():
  """The module's and the ``default`` config's augmentation settings are the
  values METHOD.md gives, and `augment_previous` / `augment_edges` /
  `augment_batch` default to the module's constants."""
  import inspect

  from megan_jax import configs, edges
  # METHOD.md, HR GANs: "Augmentation of the previous-scale input: noise;
  # Gaussian blur on 30 % of patches; resolution halved on 20 %."
  assert augment.DEFAULT_BLUR_PROB == 0.3
  assert augment.DEFAULT_HALFRES_PROB == 0.2
  # METHOD.md, Edge sketch: "Edges are given noise (sigma 0.01 in the code)
  # during training."
  assert augment.DEFAULT_EDGE_NOISE_STD == 0.01
  defaults = lambda f: {k: v.default for k, v in
                        inspect.signature(f).parameters.items()
                        if v.default is not inspect.Parameter.empty}
  prev = defaults(augment.augment_previous)
  assert prev["blur_prob"] == augment.DEFAULT_BLUR_PROB
  assert prev["halfres_prob"] == augment.DEFAULT_HALFRES_PROB
  assert prev["noise_std"] == augment.DEFAULT_NOISE_STD
  assert prev["blur_sigma"] == augment.DEFAULT_BLUR_SIGMA
  assert defaults(augment.augment_edges)["std"] == 0.01
  assert defaults(augment.augment_edges)["gain"] == 0.0  # not the paper's
  assert defaults(augment.augment_batch)["edge_noise_std"] == 0.01
  # METHOD.md, Edge sketch: "for augmentation the mask can be scaled by
  # ±15 % and mirrored."
  label = defaults(edges.augment_label)
  assert label["scale_range"] == 0.15 and label["mirror"] is True

  c = configs.get_config("default").augment
  assert c.blur_prob == 0.3  # "Gaussian blur on 30 % of patches"
  assert c.halfres_prob == 0.2  # "resolution halved on 20 %"
  assert c.edge_noise_std == 0.01  # "noise (sigma 0.01 in the code)"
  assert c.edge_gain == 0.0  # our option, off by default
  assert c.label_scale == 0.15 and c.label_mirror is True  # "±15 %", mirrored
  # The paper gives no level for the previous-scale noise: the config takes
  # the module's (our choice), and it is on.
  assert c.prev_noise_std == augment.DEFAULT_NOISE_STD > 0


@hypothesis.settings(deadline=None, max_examples=15)
@hypothesis.given(
    # A few shapes (each compiles once), all longer than the largest radius.
    shape=st.sampled_from([(7, 7, 7), (8, 9, 10), (12, 7, 9)]),
    sigma=st.floats(0.3, 1.5),
    value=st.floats(-1.0, 1.0),
    seed=st.integers(0, 1000))
def test_blur_keeps_constants_and_the_mean(shape, sigma, value, seed):
  const = jnp.full(shape, value, jnp.float32)
  np.testing.assert_allclose(augment.gaussian_blur(const, sigma), value, atol=1e-6)
  v = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
  blurred = np.asarray(augment.gaussian_blur(jnp.asarray(v), sigma))
  np.testing.assert_allclose(blurred.mean(), v.mean(), atol=1e-5)
  assert blurred.std() < v.std()  # it does smooth


@pytest.mark.parametrize("sigma", [0.5, 1.0, 1.5])
def test_blur_matches_scipy_reflect(sigma):
  v = np.random.default_rng(7).normal(size=(9, 8, 10)).astype(np.float32)
  np.testing.assert_allclose(
      augment.gaussian_blur(jnp.asarray(v), sigma),
      ndi.gaussian_filter(v, sigma, mode="reflect", truncate=4.0), atol=1e-5)


def test_blur_with_traced_sigma_under_jit():
  v = jnp.asarray(np.random.default_rng(8).normal(size=(8, 8, 8, 1)), jnp.float32)
  f = jax.jit(functools.partial(
      augment.gaussian_blur, radius=augment.blur_radius(1.0)))
  np.testing.assert_allclose(
      f(v, jnp.float32(1.0)), augment.gaussian_blur(v, 1.0), atol=1e-6)


def test_half_resolution_of_a_repeated_volume_is_identity():
  low = np.random.default_rng(9).normal(size=(3, 4, 2)).astype(np.float32)
  high = low.repeat(2, 0).repeat(2, 1).repeat(2, 2)
  np.testing.assert_allclose(augment.half_resolution(jnp.asarray(high)), high, atol=1e-6)


def test_half_resolution_is_block_mean():
  v = np.random.default_rng(10).normal(size=(4, 6, 2, 1)).astype(np.float32)
  out = np.asarray(augment.half_resolution(jnp.asarray(v)))
  np.testing.assert_allclose(out[0:2, 2:4, 0:2], v[0:2, 2:4, 0:2].mean(), atol=1e-6)
  np.testing.assert_allclose(out.mean(), v.mean(), atol=1e-6)
  odd = augment.half_resolution(jnp.asarray(v[:3, :5]))
  assert odd.shape == (3, 5, 2, 1)


def test_output_is_clipped_to_the_network_range():
  x = _patches(11, (8, 6, 6, 6)).at[:, 0].set(1.0).at[:, 1].set(-1.0)
  y = np.asarray(augment.augment_previous(jax.random.key(12), x, noise_std=0.5))
  assert y.min() >= -1.0 and y.max() <= 1.0
  assert y.min() == -1.0 and y.max() == 1.0  # the noise did push past the range


def test_noise_level():
  x = jnp.zeros((8, 8, 8, 8), jnp.float32)
  y = augment.augment_previous(jax.random.key(13), x, noise_std=0.05, **NOISE_ONLY)
  # 4096 samples: the sample std is within ~1.1 % of 0.05 (1 sd); allow 5 %.
  np.testing.assert_allclose(np.std(np.asarray(y)), 0.05, rtol=0.05)
  assert abs(float(jnp.mean(y))) < 0.005


def test_blur_only_and_half_only_keep_the_mean():
  x = _patches(14)
  for kwargs in (BLUR_ONLY, HALF_ONLY):
    y = augment.augment_previous(jax.random.key(15), x, **kwargs)
    np.testing.assert_allclose(
        jnp.mean(y, axis=(1, 2, 3)), jnp.mean(x, axis=(1, 2, 3)), atol=1e-5)
    assert not np.allclose(y, x)


def test_jit_compiles_once_per_shape():
  traces = []

  def step(key, x):
    traces.append(1)  # runs only while tracing
    return augment.augment_previous(key, x)

  f = jax.jit(step)
  x = _patches(16)
  a = f(jax.random.key(0), x)
  b = f(jax.random.key(1), x + 0.1)
  assert len(traces) == 1
  assert not np.allclose(a, b)
  np.testing.assert_allclose(a, augment.augment_previous(jax.random.key(0), x), atol=1e-6)


def test_a_patch_does_not_depend_on_the_rest_of_the_batch():
  x = _patches(17)
  key = jax.random.key(18)
  full = augment.augment_previous(key, x, blur_prob=0.5, halfres_prob=0.5)
  alone = augment.augment_previous(key, x[:1], blur_prob=0.5, halfres_prob=0.5)
  np.testing.assert_allclose(full[:1], alone, atol=1e-6)
  # Changing the other patches leaves patch 0 alone.
  other = augment.augment_previous(
      key, x.at[1:].set(0.3), blur_prob=0.5, halfres_prob=0.5)
  np.testing.assert_allclose(full[0], other[0], atol=1e-6)
  # With one key per patch, any patch can be augmented on its own.
  keys = jax.random.split(key, 4)
  per_patch = augment.augment_previous(keys, x, blur_prob=0.5, halfres_prob=0.5)
  for i in range(4):
    np.testing.assert_allclose(
        per_patch[i:i + 1],
        augment.augment_previous(keys[i:i + 1], x[i:i + 1], blur_prob=0.5,
                                 halfres_prob=0.5), atol=1e-6)


def test_raw_uint32_keys_work():
  x = _patches(19)
  y = augment.augment_previous(jax.random.PRNGKey(0), x)
  z = augment.augment_previous(jax.random.split(jax.random.PRNGKey(0), 4), x)
  assert y.shape == z.shape == x.shape


def test_channel_axis_is_optional():
  x = _patches(20)
  key = jax.random.key(21)
  with_channel = augment.augment_previous(key, x[..., None], blur_prob=0.5)
  assert with_channel.shape == x.shape + (1,)
  np.testing.assert_allclose(
      with_channel[..., 0], augment.augment_previous(key, x, blur_prob=0.5), atol=1e-6)


def test_bad_arguments():
  x = _patches(22)
  key = jax.random.key(0)
  with pytest.raises(InputError, match="blur_prob"):
    augment.augment_previous(key, x, blur_prob=1.5)
  with pytest.raises(InputError, match="blur_sigma"):
    augment.augment_previous(key, x, blur_sigma=(2.0, 1.0))
  with pytest.raises(ValueError, match=r"\(8, 8, 8\)"):
    augment.augment_previous(key, x[0])
  with pytest.raises(ValueError, match="3 keys"):
    augment.augment_previous(jax.random.split(key, 3), x)


def test_edge_noise():
  e = jnp.zeros((6, 8, 8, 8, 1), jnp.float32)
  key = jax.random.key(23)
  noisy = augment.augment_edges(key, e)
  np.testing.assert_array_equal(noisy, augment.augment_edges(key, e))
  # 3072 samples: the sample std is within ~1.3 % of 0.01 (1 sd); allow 5 %.
  np.testing.assert_allclose(np.std(np.asarray(noisy)), 0.01, rtol=0.05)
  assert float(noisy.min()) < 0.0  # not clipped to [0, 1]
  np.testing.assert_array_equal(augment.augment_edges(key, e[:1]), noisy[:1])
  np.testing.assert_array_equal(augment.augment_edges(key, e, std=0.0), e)


def test_edge_gain():
  e = jnp.concatenate([jnp.zeros((3, 8, 8, 8, 1)), jnp.ones((3, 8, 8, 8, 1))])
  key = jax.random.key(29)
  g = np.asarray(augment.augment_edges(key, e, std=0.0, gain=0.5))
  np.testing.assert_array_equal(g[:3], 0.0)  # no edge, nothing to weight
  ones = g[3:]
  assert ones.min() >= 0.5 and ones.max() <= 1.5
  # 1536 uniform draws on [0.5, 1.5]: mean 1 (sd 0.007), std 0.289.
  np.testing.assert_allclose(ones.mean(), 1.0, atol=0.03)
  np.testing.assert_allclose(ones.std(), 0.5 / np.sqrt(3), rtol=0.05)
  assert len(np.unique(ones)) > 1000  # a factor per voxel, not per patch
  # Per patch: patch i's draw does not depend on the others in the batch.
  np.testing.assert_array_equal(
      augment.augment_edges(augment.patch_keys(key, 6)[3:], e[3:], std=0.0,
                            gain=0.5), ones)
  # Without a gain the noise is what it was before the option existed.
  noise = jax.vmap(lambda k: augment._normal(k, e.shape[1:], e.dtype))(
      augment.patch_keys(key, 6))
  np.testing.assert_allclose(augment.augment_edges(key, e),
                             e + jnp.float32(0.01) * noise, rtol=1e-6,
                             atol=1e-9)
  # With both: weighted first, then noised.
  both = np.asarray(augment.augment_edges(key, e, std=0.01, gain=0.5))
  np.testing.assert_allclose(both, g + 0.01 * np.asarray(noise), atol=1e-6)
  with pytest.raises(InputError, match="edge gain"):
    augment.augment_edges(key, e, gain=1.5)


def test_augment_batch():
  batch = {"previous": _patches(24), "edges": jnp.zeros((4, 8, 8, 8)),
           "target": _patches(25)}
  out = augment.augment_batch(jax.random.key(26), batch, blur_prob=0.0)
  assert set(out) == set(batch)
  np.testing.assert_array_equal(out["target"], batch["target"])
  assert not np.allclose(out["previous"], batch["previous"])
  assert not np.allclose(out["edges"], batch["edges"])
  assert batch["edges"] is not out["edges"]  # the input dict is left alone
  lr = augment.augment_batch(jax.random.key(26), {"edges": batch["edges"]},
                             previous=None)
  np.testing.assert_array_equal(lr["edges"], out["edges"])
  with pytest.raises(KeyError, match="previous"):
    augment.augment_batch(jax.random.key(0), {"edges": batch["edges"]})
