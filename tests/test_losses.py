"""Tests for megan_jax.losses: closed forms on small arrays."""
import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megan_jax import losses


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def test_lsgan_perfect_discriminator_is_zero():
  ones = jnp.ones((2, 3, 3, 3, 1))
  zeros = jnp.zeros((2, 3, 3, 3, 1))
  assert float(losses.gan_loss(ones, True, "lsgan")) == 0.0
  assert float(losses.gan_loss(zeros, False, "lsgan")) == 0.0
  total, parts = losses.discriminator_loss(ones, zeros, kind="lsgan")
  assert float(total) == 0.0
  assert float(parts["real"]) == 0.0 and float(parts["fake"]) == 0.0


def test_lsgan_is_mean_squared_error():
  logits = np.array([[0.2, -1.0], [3.0, 0.5]], np.float32)
  np.testing.assert_allclose(
      losses.gan_loss(logits, True, "lsgan"), np.mean((logits - 1.0) ** 2), rtol=1e-6)
  np.testing.assert_allclose(
      losses.gan_loss(logits, False, "lsgan"), np.mean(logits ** 2), rtol=1e-6)


def test_bce_equals_minus_log_sigmoid_by_hand():
  logits = np.array([-3.0, -0.5, 0.0, 0.7, 4.0], np.float32)
  np.testing.assert_allclose(
      losses.gan_loss(logits, True, "bce"),
      np.mean(-np.log(_sigmoid(logits))), rtol=1e-5)
  np.testing.assert_allclose(
      losses.gan_loss(logits, False, "bce"),
      np.mean(-np.log(1.0 - _sigmoid(logits))), rtol=1e-5)


def test_default_kind_is_the_papers_log_likelihood():
  logits = np.array([0.3, -1.2], np.float32)
  assert float(losses.gan_loss(logits, True)) == float(
      losses.gan_loss(logits, True, "bce"))


@pytest.mark.parametrize("kind", losses.GAN_KINDS)
@pytest.mark.parametrize("target", [True, False])
def test_gradients_finite_for_huge_logits(kind, target):
  logits = jnp.array([-1e4, -50.0, 0.0, 50.0, 1e4], jnp.float32)
  value, grad = jax.value_and_grad(lambda x: losses.gan_loss(x, target, kind))(logits)
  assert np.isfinite(float(value))
  assert np.all(np.isfinite(np.asarray(grad)))
  if kind == "bce":
    # Saturated wrong decisions keep a gradient pushing the right way:
    # d/dx of softplus(-x) (real target) is -1 at x = -1e4, scaled by 1/N.
    wrong = 0 if target else -1
    expected = -1.0 / logits.size if target else 1.0 / logits.size
    np.testing.assert_allclose(grad[wrong], expected, rtol=1e-5)


def test_unknown_kind_raises():
  with pytest.raises(ValueError, match="wgan"):
    losses.gan_loss(jnp.zeros(3), True, "wgan")


def test_generator_loss_combines_gan_and_weighted_l1():
  fake_logits = np.array([0.5, 2.0], np.float32)
  fake = np.array([[0.0, 0.5], [1.0, -1.0]], np.float32)
  real = np.array([[0.5, 0.5], [0.0, -1.0]], np.float32)
  total, parts = losses.generator_loss(
      fake_logits, fake, real, kind="lsgan", l1_weight=3.0)
  gan = np.mean((fake_logits - 1.0) ** 2)
  l1 = np.mean(np.abs(fake - real))
  np.testing.assert_allclose(parts["gan"], gan, rtol=1e-6)
  np.testing.assert_allclose(parts["l1"], l1, rtol=1e-6)
  np.testing.assert_allclose(total, gan + 3.0 * l1, rtol=1e-6)


def test_discriminator_loss_is_half_the_sum():
  real_logits = np.array([1.5, -0.5, 0.2], np.float32)
  fake_logits = np.array([-2.0, 0.3], np.float32)
  total, parts = losses.discriminator_loss(real_logits, fake_logits, kind="bce")
  real = np.mean(-np.log(_sigmoid(real_logits)))
  fake = np.mean(-np.log(1.0 - _sigmoid(fake_logits)))
  np.testing.assert_allclose(parts["real"], real, rtol=1e-5)
  np.testing.assert_allclose(parts["fake"], fake, rtol=1e-5)
  np.testing.assert_allclose(total, 0.5 * (real + fake), rtol=1e-5)


def test_l1_with_mask_counts_only_masked_voxels():
  a = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
  b = np.zeros_like(a)
  mask = np.array([[True, False], [False, True]])
  np.testing.assert_allclose(losses.l1(a, b, mask), (1.0 + 4.0) / 2, rtol=1e-6)
  # Soft weights: a weighted mean.
  w = np.array([[0.5, 0.0], [0.0, 1.5]], np.float32)
  np.testing.assert_allclose(
      losses.l1(a, b, w), (0.5 * 1.0 + 1.5 * 4.0) / 2.0, rtol=1e-6)
  np.testing.assert_allclose(losses.l1(a, b), np.mean(a), rtol=1e-6)


def test_l1_mask_broadcasts_and_empty_mask_gives_zero_with_finite_grad():
  a = jnp.arange(8.0).reshape(2, 2, 2, 1)
  mask = jnp.zeros((2, 2, 2, 1)).at[0, 0, 0, 0].set(1.0)
  np.testing.assert_allclose(losses.l1(a, a + 2.0, mask[:1]), 2.0, rtol=1e-6)
  empty = jnp.zeros_like(a)
  value, grad = jax.value_and_grad(lambda x: losses.l1(x, 0.0 * x + 1.0, empty))(a)
  assert float(value) == 0.0
  assert np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.parametrize("kind,thr", [("lsgan", 0.5), ("bce", 0.0)])
def test_discriminator_accuracy(kind, thr):
  # Real: 3 of 4 above the threshold; fake: 1 of 4 below.
  real = np.array([thr + 1, thr + 0.1, thr + 2, thr - 0.1], np.float32)
  fake = np.array([thr - 1, thr + 0.2, thr + 1, thr + 3], np.float32)
  acc = float(losses.discriminator_accuracy(real, fake, kind))
  np.testing.assert_allclose(acc, (3 + 1) / 8, rtol=1e-6)
  perfect = float(losses.discriminator_accuracy(real + 10, fake - 10, kind))
  assert perfect == 1.0


@hypothesis.settings(deadline=None, max_examples=25)
@hypothesis.given(
    logits=hnp.arrays(np.float32, st.integers(1, 12),
                      elements=st.floats(-30, 30, width=32)))
def test_bce_real_plus_fake_matches_binary_entropy_identity(logits):
  # -log s(x) - log(1 - s(x)) = softplus(-x) + softplus(x)
  #                            = |x| + 2 log(1 + exp(-|x|))
  both = (losses.gan_loss(logits, True, "bce")
          + losses.gan_loss(logits, False, "bce"))
  x = logits.astype(np.float64)
  expected = np.mean(np.abs(x) + 2.0 * np.log1p(np.exp(-np.abs(x))))
  np.testing.assert_allclose(float(both), expected, rtol=1e-4, atol=1e-5)
