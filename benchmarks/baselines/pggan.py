"""PGGAN (Karras et al., 2018) in 3D, its final network at resolution N.

No progressive growing: the memory of a training step is largest once the
network has grown to its final resolution, and that network is what is built
here (with no fade-in branch).

Channels follow the PGGAN paper's table (CelebA-HQ, 1024²): at resolution r
``min(512, 16384 / r)``: 512 at 4³ ... 32³, 256 at 64³, 128 at 128³, 64 at
256³, 32 at 512³, 16 at 1024³ (``fmap_base`` 8192, ``fmap_max`` 512 in the
official code). The paper's network is the same for every final resolution,
cut at N.

- G: z (512), pixel norm; dense to 4³ × 512 (the paper's 4×4 conv of a 1×1
  input), LeakyReLU 0.2, pixel norm; conv 3³, LReLU, PN; then per resolution
  r = 8 .. N: nearest ×2 upsampling, 2 × [conv 3³ to C(r), LReLU, PN];
  toRGB: conv 1³ to 1 channel (linear).
- D: fromRGB conv 1³ to C(N), LReLU; per resolution r = N .. 8: conv 3³ to
  C(r), LReLU, conv 3³ to C(r/2), LReLU, 2³ average pooling; at 4³:
  minibatch standard deviation (one more channel), conv 3³, LReLU, conv 4³
  valid (the paper's dense layer over 4×4), LReLU, dense to one logit.
Equalised learning rate only rescales weights at run time (no memory) and is
left out; so is WGAN-GP's gradient penalty (see `common`).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from benchmarks.baselines.common import Baseline, check_size, scaled
from megan_jax.models import layers

NZ = 512
FMAP_MAX = 512
FMAP_TOP = 16384  # channels × resolution where the table drops below 512


def features(res: int, width_scale: float = 1.0) -> int:
  return scaled(min(FMAP_MAX, FMAP_TOP // res), width_scale)


def pixel_norm(x, eps: float = 1e-8):
  return x * jnp.reciprocal(jnp.sqrt(jnp.mean(jnp.square(x), -1,
                                              keepdims=True) + eps))


def upsample(x):
  for axis in (1, 2, 3):
    x = jnp.repeat(x, 2, axis=axis)
  return x


def avg_pool(x):
  b, d, h, w, c = x.shape
  return x.reshape(b, d // 2, 2, h // 2, 2, w // 2, 2, c).mean((2, 4, 6))


class Generator(nn.Module):
  """``[B, 512] -> [B, size, size, size, 1]``."""
  size: int
  width_scale: float = 1.0
  impl: str = "plain"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z, *, train: bool = True):
    del train
    act = lambda y: pixel_norm(nn.leaky_relu(y, 0.2))
    conv = lambda c, name: layers.Conv3d(c, kernel_size=3, padding=1,
                                         dtype=self.dtype, impl=self.impl,
                                         name=name)
    c = features(4, self.width_scale)
    x = nn.Dense(4**3 * c, name="project")(
        pixel_norm(jnp.asarray(z, self.dtype)))
    x = act(x.reshape((z.shape[0], 4, 4, 4, c)))
    x = act(conv(c, "conv_4")(x))
    res = 4
    while res < self.size:
      res *= 2
      x = upsample(x)
      x = act(conv(features(res, self.width_scale), f"conv_{res}_0")(x))
      x = act(conv(features(res, self.width_scale), f"conv_{res}_1")(x))
    return layers.Conv3d(1, kernel_size=1, padding=0, dtype=self.dtype,
                         impl=self.impl, name="to_rgb")(x)


class Discriminator(nn.Module):
  """``[B, size, size, size, 1] -> [B, 1]`` logits."""
  size: int
  width_scale: float = 1.0
  impl: str = "plain"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    lrelu = lambda y: nn.leaky_relu(y, 0.2)
    conv = lambda c, name, k=3, p=1: layers.Conv3d(
        c, kernel_size=k, padding=p, dtype=self.dtype, impl=self.impl,
        name=name)
    ws = self.width_scale
    res = self.size
    x = lrelu(conv(features(res, ws), "from_rgb", 1, 0)(
        jnp.asarray(x, self.dtype)))
    while res > 4:
      x = lrelu(conv(features(res, ws), f"conv_{res}_0")(x))
      x = lrelu(conv(features(res // 2, ws), f"conv_{res}_1")(x))
      x = avg_pool(x)
      res //= 2
    # Minibatch standard deviation: one channel, the mean over features and
    # positions of the per-position std over the batch.
    std = jnp.sqrt(jnp.var(x.astype(jnp.float32), axis=0) + 1e-8).mean()
    x = jnp.concatenate(
        [x, jnp.broadcast_to(std.astype(x.dtype), x.shape[:-1] + (1,))], -1)
    x = lrelu(conv(features(4, ws), "conv_4")(x))
    x = lrelu(conv(features(4, ws), "dense_4", 4, 0)(x))
    return nn.Dense(1, name="logit")(x.reshape(x.shape[0], -1))


def build(size: int, *, width_scale: float = 1.0, impl: str = "plain"
          ) -> Baseline:
  check_size("pggan", size, 8)
  res = [2**k for k in range(2, int(math.log2(size)) + 1)]
  chans = "/".join(str(features(r, width_scale)) for r in res)
  return Baseline(
      name="pggan", size=size,
      generator=Generator(size, width_scale, impl),
      discriminator=Discriminator(size, width_scale, impl),
      g_in_shape=(1, NZ),
      channels=(f"G: z {NZ} -> {chans} channels at "
                f"{'/'.join(f'{r}³' for r in res)} -> 1; D mirrors"))
