"""Pix2Pix (Isola et al., 2017) in 3D: volume -> volume, U-Net G + PatchGAN D.

Channels are pix2pix's: ngf = ndf = 64.

- G (``unet_256`` in 3D): encoder level i is a 4³ stride-2 conv to
  ``64 · min(2^i, 8)`` channels (64, 128, 256, 512, 512, ...), BN on all but
  the outermost and innermost; the decoder mirrors it with transposed convs,
  BN, skip concatenations, dropout 0.5 in the three decoder levels next to
  the bottleneck, and a last transposed conv to 1 channel with tanh.
  pix2pix uses 8 levels for 256² images (down to 1²); here the U-Net uses as
  many levels as the size allows, ``log2(N)`` (down to 1³): 5 at 32³, 8 at
  256³, 9 at 512³.
- D (``NLayerDiscriminator``, the 70×70 PatchGAN, n_layers 3): conv 4³ s2
  to 64, LeakyReLU 0.2; conv s2 to 128, BN, LReLU; conv s2 to 256, BN,
  LReLU; conv 4³ s1 to 512, BN, LReLU; conv 4³ s1 to 1 (a map of logits).
  It sees ``concat(source, image)``. Below 32³ there is room for fewer
  stride-2 convs: ``min(3, floor(log2(N / 3)))`` of them (2 at 16³).
- Loss: GAN + 100 · L1 (pix2pix's lambda).

BN is `megan_jax.models.layers.BatchNorm` (batch statistics only).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from benchmarks.baselines.common import Baseline, check_size, scaled
from megan_jax.models import layers

NGF = NDF = 64
DROPOUT_LEVELS = 3
L1_WEIGHT = 100.0


def unet_features(level: int, width_scale: float = 1.0) -> int:
  return scaled(NGF * min(2**level, 8), width_scale)


def num_levels(size: int) -> int:
  """U-Net levels for a side ``size``: down to 1³."""
  return int(math.log2(size))


def num_strided(size: int) -> int:
  """PatchGAN stride-2 convs that fit: 3 (pix2pix) from 32³ on."""
  return max(1, min(3, int(math.floor(math.log2(size / 3)))))


class UNet(nn.Module):
  """``[B, N, N, N, C] -> [B, N, N, N, 1]`` in [-1, 1]; N divisible by
  ``2**levels``."""
  levels: int
  width_scale: float = 1.0
  dropout_rate: float = 0.5
  impl: str = "plain"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = True):
    common = dict(dtype=self.dtype, impl=self.impl)
    n_levels = self.levels
    innermost = n_levels - 1
    x = jnp.asarray(x, self.dtype)
    skips = []
    for i in range(n_levels):
      if i:
        x = nn.leaky_relu(x, 0.2)
      x = layers.DownConv(unet_features(i, self.width_scale), **common,
                          name=f"down_{i}")(x)
      if 0 < i < innermost:
        x = layers.BatchNorm(dtype=self.dtype, name=f"down_norm_{i}")(x)
      skips.append(x)
    x = skips.pop()
    for i in reversed(range(innermost)):
      x = nn.relu(x)
      x = layers.UpConv(unet_features(i, self.width_scale), **common,
                        name=f"up_{i}")(x)
      x = layers.BatchNorm(dtype=self.dtype, name=f"up_norm_{i}")(x)
      if self.dropout_rate and 1 <= innermost - i - 1 < 1 + DROPOUT_LEVELS:
        x = nn.Dropout(self.dropout_rate, deterministic=not train,
                       name=f"dropout_{i}")(x)
      x = jnp.concatenate([x, skips.pop()], axis=-1)
    x = nn.relu(x)
    x = layers.UpConv(1, **common, name="up_out")(x)
    return jnp.tanh(x)


class PatchGAN(nn.Module):
  """``[B, N, N, N, C] -> [B, n, n, n, 1]`` logits (pix2pix's PatchGAN)."""
  strided: int = 3
  width_scale: float = 1.0
  impl: str = "plain"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    common = dict(dtype=self.dtype, impl=self.impl)
    ch = lambda n: scaled(NDF * min(2**n, 8), self.width_scale)
    x = layers.DownConv(ch(0), **common, name="conv_0")(
        jnp.asarray(x, self.dtype))
    x = nn.leaky_relu(x, 0.2)
    for n in range(1, self.strided):
      x = layers.DownConv(ch(n), **common, name=f"conv_{n}")(x)
      x = layers.BatchNorm(dtype=self.dtype, name=f"norm_{n}")(x)
      x = nn.leaky_relu(x, 0.2)
    n = self.strided
    x = layers.Conv3d(ch(n), kernel_size=4, padding=1, **common,
                      name=f"conv_{n}")(x)
    x = layers.BatchNorm(dtype=self.dtype, name=f"norm_{n}")(x)
    x = nn.leaky_relu(x, 0.2)
    return layers.Conv3d(1, kernel_size=4, padding=1, **common,
                         name="logits")(x)


def build(size: int, *, width_scale: float = 1.0, impl: str = "plain"
          ) -> Baseline:
  check_size("pix2pix", size, 8)
  levels, strided = num_levels(size), num_strided(size)
  g_ch = "/".join(str(unet_features(i, width_scale)) for i in range(levels))
  d_ch = "/".join(str(scaled(NDF * min(2**n, 8), width_scale))
                  for n in range(strided + 1))
  return Baseline(
      name="pix2pix", size=size,
      generator=UNet(levels, width_scale, impl=impl),
      discriminator=PatchGAN(strided, width_scale, impl=impl),
      g_in_shape=(1, size, size, size, 1), conditional=True,
      l1_weight=L1_WEIGHT,
      channels=(f"G: U-Net, {levels} levels, {g_ch} channels; "
                f"D: PatchGAN {d_ch} -> 1 ({strided} stride-2 convs)"))
