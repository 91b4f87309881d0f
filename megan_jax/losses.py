"""GAN losses (log-likelihood and least squares), L1, discriminator accuracy.

MEGAN trains every scale with a conditional GAN loss plus L1 (METHOD.md):

* ``kind="bce"``: the paper's log-likelihood GAN loss, sigmoid cross-entropy
  on the discriminator's logits (numerically stable for any logit).
* ``kind="lsgan"``: the public code's least-squares loss, mean squared error
  of the raw discriminator output to 1 (real) or 0 (fake).

All GAN terms are means over every logit, so a PatchGAN map of logits
``[B, d, h, w, 1]`` counts each patch decision equally, whatever its size.
Everything here is pure jax and can run inside a jitted train step.
"""
from typing import Mapping

import jax.numpy as jnp
import optax

from megan_jax.types import Array

GAN_KINDS = ("bce", "lsgan")

# A raw D output above this counts as "real" (see `discriminator_accuracy`):
# LSGAN regresses to 1/0, so the midpoint; BCE logits are log-odds, so 0.
_THRESHOLDS = {"lsgan": 0.5, "bce": 0.0}


def _check_kind(kind: str) -> str:
  if kind not in GAN_KINDS:
    raise ValueError(f"GAN loss kind must be one of {GAN_KINDS}, got {kind!r}")
  return kind


def gan_loss(logits: Array, target_is_real: bool, kind: str = "bce") -> Array:
  """GAN loss of discriminator outputs against an all-real or all-fake target.

  Args:
    logits: raw discriminator outputs of any shape (a PatchGAN map, or one
      logit per patch); no sigmoid applied.
    target_is_real: whether the target label is "real" (1) or "fake" (0).
      A Python bool: it selects the target statically.
    kind: ``"bce"`` (the paper's log-likelihood loss, the default) or
      ``"lsgan"`` (the public code's least-squares loss).

  Returns:
    The scalar loss, a mean over all elements of ``logits``, in float32.
  """
  _check_kind(kind)
  logits = jnp.asarray(logits, jnp.float32)
  target = jnp.full_like(logits, 1.0 if target_is_real else 0.0)
  if kind == "lsgan":
    return jnp.mean(jnp.square(logits - target))
  # optax uses log-sigmoid, so huge |logits| give finite values and gradients.
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, target))


def l1(a: Array, b: Array, mask: Array | None = None) -> Array:
  """Mean absolute difference, optionally weighted by ``mask``.

  Args:
    a: an array.
    b: an array of the same shape.
    mask: optional weights (boolean or float) that broadcast to ``a.shape``
      under numpy rules (so a ``[B, D, H, W]`` mask needs a trailing axis for
      ``[B, D, H, W, 1]`` images). The loss is
      ``sum(mask * |a - b|) / sum(mask)``, and 0 where the mask is all zero.

  Returns:
    The scalar L1 loss in float32.
  """
  diff = jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))
  if mask is None:
    return jnp.mean(diff)
  weights = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), diff.shape)
  total = jnp.sum(weights)
  # A safe denominator keeps the gradient finite for an all-zero mask
  # (0 / 0 in the unselected branch of a `where` would still poison it).
  safe_total = jnp.where(total > 0, total, 1.0)
  return jnp.where(total > 0, jnp.sum(weights * diff) / safe_total, 0.0)


def generator_loss(
    fake_logits: Array,
    fake: Array,
    real: Array,
    *,
    kind: str,
    l1_weight: float = 10.0,
    mask: Array | None = None,
) -> tuple[Array, Mapping[str, Array]]:
  """The generator's objective: fool D, and stay close to the target in L1.

  Args:
    fake_logits: D's outputs on (condition, generated image).
    fake: the generated images.
    real: the target images, same shape as ``fake``.
    kind: ``"bce"`` or ``"lsgan"``, see `gan_loss`.
    l1_weight: weight of the L1 term (10 in the public code).
    mask: optional L1 weights, see `l1`.

  Returns:
    ``(total, parts)`` with ``total = gan + l1_weight * l1`` and ``parts`` a
    dict ``{"gan": ..., "l1": ...}`` of the unweighted scalar terms.
  """
  gan = gan_loss(fake_logits, True, kind)
  l1_term = l1(fake, real, mask)
  return gan + l1_weight * l1_term, {"gan": gan, "l1": l1_term}


def discriminator_loss(
    real_logits: Array, fake_logits: Array, *, kind: str
) -> tuple[Array, Mapping[str, Array]]:
  """The discriminator's objective, halved as in pix2pix.

  Halving slows D relative to G (pix2pix's choice, kept by the public code).

  Args:
    real_logits: D's outputs on (condition, real image).
    fake_logits: D's outputs on (condition, generated image); the caller
      stops gradients into G (or differentiates only D's parameters).
    kind: ``"bce"`` or ``"lsgan"``, see `gan_loss`.

  Returns:
    ``(total, parts)`` with ``total = 0.5 * (real + fake)`` and ``parts`` a
    dict ``{"real": ..., "fake": ...}`` of the two scalar terms.
  """
  real = gan_loss(real_logits, True, kind)
  fake = gan_loss(fake_logits, False, kind)
  return 0.5 * (real + fake), {"real": real, "fake": fake}


def discriminator_accuracy(
    real_logits: Array, fake_logits: Array, kind: str
) -> Array:
  """Fraction of D's decisions that are right, real and fake weighted equally.

  A real output counts as right when it is above the threshold (0.5 for
  ``"lsgan"``, whose targets are 1 and 0; 0 for ``"bce"``, the logit of
  probability 0.5), a fake one when it is below. The reference training loop
  skips D's update while this is above 0.8 (METHOD.md).

  Args:
    real_logits: D's outputs on real pairs, any shape.
    fake_logits: D's outputs on generated pairs, any shape.
    kind: ``"bce"`` or ``"lsgan"``.

  Returns:
    A float32 scalar in [0, 1]: the mean of the accuracy on the real outputs
    and the accuracy on the fake ones (the plain fraction of all decisions
    when both have the same size).
  """
  threshold = _THRESHOLDS[_check_kind(kind)]
  real_right = jnp.mean(jnp.asarray(real_logits) > threshold, dtype=jnp.float32)
  fake_right = jnp.mean(jnp.asarray(fake_logits) < threshold, dtype=jnp.float32)
  return 0.5 * (real_right + fake_right)


__all__ = [
    "GAN_KINDS",
    "discriminator_accuracy",
    "discriminator_loss",
    "gan_loss",
    "generator_loss",
    "l1",
]
