"""DCGAN (Radford et al., 2016) in 3D: noise -> volume.

Channels: the DCGAN paper's generator goes 1024 (4×4) -> 512 -> 256 -> 128 ->
image at 64×64; the reference PyTorch example uses ngf = 64, i.e. 512 at 4×4
down to 64 at 32×32. Here, for a side N, the layer at resolution r has
``min(1024, 64 · N / (2r))`` channels: 64 at N/2 (the last hidden layer, as
in the example), doubling at every halving of the resolution, capped at the
paper's 1024 at 4³. N = 64 gives exactly the example's 512/256/128/64; from
N = 128 on the 4³ layer has the paper's 1024. The discriminator mirrors it:
``min(1024, 64 · N / (2r))`` channels at resolution r, i.e. 64 after the
first stride-2 conv, up to 1024.

Layers (kernel 4, stride 2, padding 1 for every up/down conv, as DCGAN):
- G: z (100) -> dense to 4³ × C(4) (PyTorch's 4×4 transposed conv of a 1×1
  input), BN, ReLU; [transposed conv, BN, ReLU] up to N/2; transposed conv to
  1 channel, tanh.
- D: conv to N/2 (no norm), LeakyReLU 0.2; [conv, BN, LeakyReLU] down to 4³;
  conv 4³ valid to one logit.
BN is `megan_jax.models.layers.BatchNorm` (batch statistics, no running
averages: those are not device memory a step needs).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from benchmarks.baselines.common import Baseline, check_size, scaled
from megan_jax.models import layers

NZ = 100  # DCGAN's latent size
MAX_FEATURES = 1024
BASE_FEATURES = 64


def features(size: int, res: int, width_scale: float = 1.0) -> int:
  """Channels at resolution ``res`` of a network for ``size``³ volumes."""
  return scaled(min(MAX_FEATURES, BASE_FEATURES * size // (2 * res)),
                width_scale)


class Generator(nn.Module):
  """``[B, nz] -> [B, size, size, size, 1]`` in [-1, 1]."""
  size: int
  width_scale: float = 1.0
  impl: str = "plain"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z, *, train: bool = True):
    del train  # no dropout
    n = self.size
    c = features(n, 4, self.width_scale)
    common = dict(dtype=self.dtype, impl=self.impl)
    x = nn.Dense(4**3 * c, name="project")(jnp.asarray(z, self.dtype))
    x = x.reshape((z.shape[0], 4, 4, 4, c))
    x = nn.relu(layers.BatchNorm(dtype=self.dtype, name="project_norm")(x))
    res = 4
    while 2 * res < n:
      res *= 2
      x = layers.UpConv(features(n, res, self.width_scale), **common,
                        name=f"up_{res}")(x)
      x = nn.relu(layers.BatchNorm(dtype=self.dtype, name=f"norm_{res}")(x))
    x = layers.UpConv(1, **common, name="up_out")(x)
    return jnp.tanh(x)


class Discriminator(nn.Module):
  """``[B, size, size, size, 1] -> [B, 1, 1, 1, 1]`` logits."""
  size: int
  width_scale: float = 1.0
  impl: str = "plain"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    n = self.size
    common = dict(dtype=self.dtype, impl=self.impl)
    res = n // 2
    x = layers.DownConv(features(n, res, self.width_scale), **common,
                        name=f"down_{res}")(jnp.asarray(x, self.dtype))
    x = nn.leaky_relu(x, 0.2)
    while res > 4:
      res //= 2
      x = layers.DownConv(features(n, res, self.width_scale), **common,
                          name=f"down_{res}")(x)
      x = layers.BatchNorm(dtype=self.dtype, name=f"norm_{res}")(x)
      x = nn.leaky_relu(x, 0.2)
    return layers.Conv3d(1, kernel_size=4, padding=0, **common,
                         name="logit")(x)


def build(size: int, *, width_scale: float = 1.0, impl: str = "plain"
          ) -> Baseline:
  check_size("dcgan", size, 8)
  res = [2**k for k in range(2, int(math.log2(size)))]
  chans = "/".join(str(features(size, r, width_scale)) for r in res)
  return Baseline(
      name="dcgan", size=size,
      generator=Generator(size, width_scale, impl),
      discriminator=Discriminator(size, width_scale, impl),
      g_in_shape=(1, NZ),
      channels=(f"G: z {NZ} -> {chans} channels at "
                f"{'/'.join(f'{r}³' for r in res)} -> 1 at {size}³; "
                "D mirrors"))
