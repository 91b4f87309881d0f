"""What the baselines share: their description and one GAN training step.

The step does the same work as MEGAN's (``megan_jax.train.train_step``), so
the memory of a step compares networks, not training loops: G forward (its
VJP kept), D forward and backward on the real and on the fake volume, D's
Adam update, G's loss through the updated D, G backward, G's Adam update.
Every baseline trains with the non-saturating log-likelihood GAN loss (plus
L1 for the conditional pix2pix): the lower bound the paper counts ("one
forward and backward pass of G and D"). PGGAN's WGAN-GP gradient penalty
(a second backward through D) is left out, which can only lower its number.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from megan_jax import losses
from megan_jax.state import GanState


@dataclasses.dataclass(frozen=True)
class Baseline:
  """A baseline GAN at one volume size.

  Attributes:
    name: "dcgan", "pix2pix" or "pggan".
    size: the volume side length.
    generator: maps ``batch["g_in"]`` to a ``[B, size, size, size, 1]``
      volume; called as ``apply(params, x, train=...)``.
    discriminator: maps a volume (with the condition as channels when
      ``conditional``) to logits.
    g_in_shape: the generator's input at batch 1: ``(1, nz)`` for noise,
      ``(1, size, size, size, 1)`` for an image.
    conditional: D sees ``concat(g_in, image)`` (pix2pix) rather than the
      image alone.
    l1_weight: weight of the L1 term of G's loss (0: none).
    channels: a one-line description of the channel counts used.
  """
  name: str
  size: int
  generator: nn.Module
  discriminator: nn.Module
  g_in_shape: tuple[int, ...]
  conditional: bool = False
  l1_weight: float = 0.0
  channels: str = ""


def scaled(channels: int, width_scale: float) -> int:
  """``channels × width_scale``, rounded, at least 1."""
  return max(1, int(round(channels * width_scale)))


def check_size(name: str, size: int, smallest: int) -> None:
  if size < smallest or size & (size - 1):
    raise ValueError(f"{name}: size {size} must be a power of two >= "
                     f"{smallest}")


def make_optimizer() -> optax.GradientTransformation:
  """Adam as in DCGAN/pix2pix and MEGAN: lr 2e-4, beta1 0.5."""
  return optax.adam(2e-4, b1=0.5, b2=0.999)


def abstract_batch(baseline: Baseline, batch_size: int = 1) -> dict:
  """``{"g_in", "target"}`` as ``jax.ShapeDtypeStruct``\\ s (float32)."""
  n = baseline.size
  g_in = (batch_size,) + tuple(baseline.g_in_shape[1:])
  return {"g_in": jax.ShapeDtypeStruct(g_in, jnp.float32),
          "target": jax.ShapeDtypeStruct((batch_size, n, n, n, 1),
                                         jnp.float32)}


def _d_input(baseline: Baseline, g_in, image):
  if baseline.conditional:
    return jnp.concatenate([g_in, image], axis=-1)
  return image


def _init(rng, baseline: Baseline) -> GanState:
  batch = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       abstract_batch(baseline))
  kg, kd, kdrop = jax.random.split(rng, 3)
  g_params = baseline.generator.init({"params": kg, "dropout": kdrop},
                                     batch["g_in"], train=False)
  d_params = baseline.discriminator.init(
      kd, _d_input(baseline, batch["g_in"], batch["target"]))
  opt = make_optimizer()
  return GanState(step=jnp.zeros((), jnp.int32), g_params=g_params,
                  d_params=d_params, g_opt=opt.init(g_params),
                  d_opt=opt.init(d_params))


def abstract_state(baseline: Baseline) -> GanState:
  """The training state's shapes and dtypes (``jax.eval_shape``: nothing is
  allocated, no forward pass runs)."""
  return jax.eval_shape(functools.partial(_init, baseline=baseline),
                        jax.random.key(0))


def train_step(state: GanState, batch, rng, *, baseline: Baseline,
               optimizer: optax.GradientTransformation):
  """One update of D, then G (the structure of MEGAN's step).

  Args:
    state: a `GanState` of the baseline.
    batch: ``{"g_in": noise or source volume, "target": real volume}``.
    rng: base key; the step folds in ``state.step`` (dropout).
    baseline, optimizer: static, bound by ``partial``.

  Returns:
    ``(new_state, metrics)``.
  """
  g, d = baseline.generator, baseline.discriminator
  k_drop = jax.random.fold_in(rng, state.step)
  real = batch["target"]

  def g_fwd(g_params):
    return g.apply(g_params, batch["g_in"], train=True,
                   rngs={"dropout": k_drop})
  fake, g_vjp = jax.vjp(g_fwd, state.g_params)

  def d_logits(d_params, image):
    out = d.apply(d_params, _d_input(baseline, batch["g_in"], image))
    return out.astype(jnp.float32)

  def d_loss_fn(d_params):
    real_logits = d_logits(d_params, real)
    fake_logits = d_logits(d_params, jax.lax.stop_gradient(fake))
    loss, _ = losses.discriminator_loss(real_logits, fake_logits, kind="bce")
    return loss

  d_loss, d_grads = jax.value_and_grad(d_loss_fn)(state.d_params)
  d_updates, d_opt = optimizer.update(d_grads, state.d_opt, state.d_params)
  d_params = optax.apply_updates(state.d_params, d_updates)

  def g_loss_fn(fake_img):
    loss = losses.gan_loss(d_logits(d_params, fake_img), True, kind="bce")
    if baseline.l1_weight:
      loss = loss + baseline.l1_weight * losses.l1(fake_img, real)
    return loss

  g_loss, dfake = jax.value_and_grad(g_loss_fn)(fake)
  (g_grads,) = g_vjp(dfake)
  g_updates, g_opt = optimizer.update(g_grads, state.g_opt, state.g_params)
  g_params = optax.apply_updates(state.g_params, g_updates)
  new_state = GanState(step=state.step + 1, g_params=g_params,
                       d_params=d_params, g_opt=g_opt, d_opt=d_opt)
  return new_state, {"g_loss": g_loss, "d_loss": d_loss}


def make_train_step(baseline: Baseline, donate: bool = True) -> Callable:
  """The jitted ``train_step(state, batch, rng)`` of a baseline; the state is
  donated (updated in place), as MEGAN's."""
  step = functools.partial(train_step, baseline=baseline,
                           optimizer=make_optimizer())
  return jax.jit(step, donate_argnums=(0,) if donate else ())
