"""LR generators (scale 0): edge sketch at 2L³ -> whole volume at L³.

Two generators, both ``[B, 2L, 2L, 2L, C_in] -> [B, L, L, L, out_channels]``
with a tanh output:

- `LRUNetGenerator`: the paper's choice (a U-Net; its bottleneck generalises
  and blur is harmless at low resolution). The default.
- `LRResNetGenerator`: the public code's (the HR ResNet generator with one
  more stride-2 conv).
"""
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from megan_jax.errors import InputError
from megan_jax.models import layers
from megan_jax.models.hr import ResNetGenerator
from megan_jax.types import Array


class LRResNetGenerator(ResNetGenerator):
  """The public code's LR generator: ``[B, 2L, 2L, 2L, C_in] -> [B, L, L, L, 1]``.

  `hr.ResNetGenerator` with one more conv 4³ s2 p1 ngf→ngf, IN, ReLU right
  after the first conv (128³ in -> 64³ out; sizes divisible by 8). At ngf 64,
  6 blocks, C_in 1: 26,773,697 parameters, 433 GFLOP per 128³ forward.
  Flax default initialisation (``init_scheme="default"``), as the reference keeps
  its framework's default for the LR nets.
  """
  init_scheme: str = "default"

  N_PRE_DOWN: ClassVar[int] = 1


def _unet_channels(ngf: int, level: int) -> int:
  return ngf * min(2**level, 8)


class LRUNetGenerator(nn.Module):
  """A 3D U-Net whose output is at half the input size: ``[B, 2L, 2L, 2L, C_in] -> [B, L, L, L, 1]``.

  pix2pix's U-Net in 3D, with the encoder one level deeper than the decoder
  comes back, so the output lands at the first level's resolution:

  - encoder level ``i = 0 .. num_levels-1``: conv 4³ s2 p1 to
    ``ngf·min(2**i, 8)`` channels; levels after the first take a
    LeakyReLU(0.2) input; all but the first and the innermost are followed
    by IN (pix2pix);
  - decoder, from the innermost level back to level 0: ReLU, transposed
    conv 4³ s2 p1 to the channels of the encoder level it lands on, IN,
    dropout (innermost ``dropout_levels`` decoder levels only), concatenated
    with that encoder level's output (skip connection);
  - head at level 0 (L³): ReLU, conv 3³ p1 to ``out_channels``, tanh.

  With the defaults (ngf 64, 5 levels, C_in 1) a 128³ input is reduced to
  4³ × 512 at the bottleneck; 66,598,273 parameters; about 190 GFLOP per
  128³ forward (against 433 for `LRResNetGenerator`).

  Attributes:
    ngf: channels of the first level.
    num_levels: encoder levels (stride-2 convs); input sizes must be
      divisible by ``2**num_levels``.
    out_channels: output channels.
    dropout_rate: dropout rate in the innermost decoder levels (``'dropout'``
      rng stream when ``train=True``).
    dropout_levels: how many decoder levels (from the innermost) use dropout.
    dtype: compute dtype (input cast once); params float32, norms computed in
      float32; output in ``dtype``.
    impl: ``"fast"`` or ``"plain"`` convolutions (`layers`); same params.
    init_scheme: ``"default"`` (Flax defaults, as the reference's LR nets) or
      ``"reference"`` (see `layers.initializers`).
  """
  ngf: int = 64
  num_levels: int = 5
  out_channels: int = 1
  dropout_rate: float = 0.5
  dropout_levels: int = 2
  dtype: Any = jnp.float32
  impl: str = "fast"
  init_scheme: str = "default"

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    """Runs the generator.

    Args:
      x: ``[B, 2L, 2L, 2L, C_in]`` (any D, H, W divisible by
        ``2**num_levels``).
      train: enables dropout (needs a ``'dropout'`` rng).

    Returns:
      ``[B, L, L, L, out_channels]`` in [-1, 1], in ``dtype``.
    """
    if x.ndim != 5:
      raise InputError(
          f"LRUNetGenerator: expected input [B, D, H, W, C], got shape "
          f"{tuple(x.shape)}")
    if self.num_levels < 2:
      raise ValueError(f"num_levels must be >= 2, got {self.num_levels}")
    factor = 2**self.num_levels
    if any(n % factor for n in x.shape[1:4]):
      raise InputError(
          f"LRUNetGenerator: spatial size {tuple(x.shape[1:4])} must be "
          f"divisible by 2**num_levels = {factor}")
    layers.check_impl(self.impl)
    kernel_init, bias_init, scale_init = layers.initializers(self.init_scheme)
    common = dict(dtype=self.dtype, impl=self.impl, kernel_init=kernel_init,
                  bias_init=bias_init)

    def norm(y, name):
      return layers.InstanceNorm(dtype=self.dtype, scale_init=scale_init,
                                 name=name)(y)

    x = jnp.asarray(x, self.dtype)
    innermost = self.num_levels - 1
    skips = []
    for i in range(self.num_levels):
      if i:
        x = nn.leaky_relu(x, 0.2)
      x = layers.DownConv(_unet_channels(self.ngf, i), padding=1, **common,
                          name=f"down_{i}")(x)
      if 0 < i < innermost:
        x = norm(x, f"down_norm_{i}")
      skips.append(x)
    x = skips.pop()  # the bottleneck has no skip of its own
    for i in reversed(range(innermost)):
      x = nn.relu(x)
      x = layers.UpConv(_unet_channels(self.ngf, i), **common,
                        name=f"up_{i}")(x)
      x = norm(x, f"up_norm_{i}")
      if self.dropout_rate and innermost - i <= self.dropout_levels:
        x = nn.Dropout(self.dropout_rate, deterministic=not train,
                       name=f"dropout_{i}")(x)
      x = jnp.concatenate([x, skips.pop()], axis=-1)
    x = nn.relu(x)
    x = layers.Conv3d(self.out_channels, kernel_size=3, padding=1, **common,
                      name="conv_out")(x)
    return jnp.tanh(x)
