"""HR patch generator: previous-scale patch + edge patch -> patch at this scale.

The ResNet generator of the public MEGAN code (``shared/METHOD.md``, "The
public code, layer by layer"), channels-last. `ResNetGenerator` is the shared
body; `HRGenerator` (here) and ``lr.LRResNetGenerator`` fix its defaults.
"""
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from megan_jax.errors import InputError
from megan_jax.models import layers
from megan_jax.types import Array


class ResNetBlock(nn.Module):
  """conv 3³, IN, ReLU, dropout, conv 3³, IN, + x: ``[B, D, H, W, C] -> same``."""
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32
  impl: str = "fast"
  init_scheme: str = "reference"

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    kernel_init, bias_init, scale_init = layers.initializers(self.init_scheme)
    c = x.shape[-1]
    conv = dict(features=c, kernel_size=3, padding=1, dtype=self.dtype,
                impl=self.impl, kernel_init=kernel_init, bias_init=bias_init)
    y = layers.Conv3d(**conv, name="conv_0")(x)
    y = layers.InstanceNorm(dtype=self.dtype, scale_init=scale_init,
                            name="norm_0")(y)
    y = nn.relu(y)
    if self.dropout_rate:
      y = nn.Dropout(self.dropout_rate, deterministic=not train,
                     name="dropout")(y)
    y = layers.Conv3d(**conv, name="conv_1")(y)
    y = layers.InstanceNorm(dtype=self.dtype, scale_init=scale_init,
                            name="norm_1")(y)
    return x + y


class ResNetGenerator(nn.Module):
  """The MEGAN ResNet generator; output at ``2**-N_PRE_DOWN`` × the input size.

  conv 3³ C_in→ngf, IN, ReLU; ``N_PRE_DOWN`` × [conv 4³ s2 p1 ngf→ngf, IN,
  ReLU]; 2 × [conv 4³ s2 p1, IN, ReLU] ngf→2ngf→4ngf; ``n_blocks``
  `ResNetBlock`\\ s at 4ngf; 2 × [transposed conv 4³ s2 p1, IN, ReLU]
  4ngf→2ngf→ngf; conv 7³ p3 ngf→out_channels; tanh. Zero padding throughout;
  every conv keeps its bias, also before a norm (as the reference).

  Attributes:
    ngf: channels after the first conv.
    n_blocks: number of ResNet blocks.
    out_channels: output channels.
    dropout_rate: dropout inside the ResNet blocks (with input noise, it
      replaces the latent z); uses the ``'dropout'`` rng stream when
      ``train=True``.
    N_PRE_DOWN: (class constant) extra stride-2 convs right after the first
      conv: 0 for `HRGenerator`, 1 for ``lr.LRResNetGenerator``.
    dtype: compute dtype (the input is cast once); params stay float32 and
      norms compute in float32. The output is in ``dtype``.
    impl: ``"fast"`` or ``"plain"`` convolutions (`layers`); same params.
    init_scheme: ``"reference"`` (conv weights N(0, 0.001²), norm scales
      N(1, 0.02²)) or ``"default"`` (Flax defaults); see
      `layers.initializers`. (Not called ``init``: that would shadow
      ``nn.Module.init``.)
  """
  ngf: int = 64
  n_blocks: int = 6
  out_channels: int = 1
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32
  impl: str = "fast"
  init_scheme: str = "reference"

  N_PRE_DOWN: ClassVar[int] = 0

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    """Runs the generator.

    Args:
      x: ``[B, D, H, W, C_in]``; D, H, W divisible by ``2**(2 + N_PRE_DOWN)``.
      train: enables dropout (needs a ``'dropout'`` rng).

    Returns:
      ``[B, D', H', W', out_channels]`` in [-1, 1], ``D' = D / 2**N_PRE_DOWN``.
    """
    if x.ndim != 5:
      raise InputError(
          f"{type(self).__name__}: expected input [B, D, H, W, C], got shape "
          f"{tuple(x.shape)}")
    factor = 2**(2 + self.N_PRE_DOWN)
    if any(n % factor for n in x.shape[1:4]):
      raise InputError(
          f"{type(self).__name__}: spatial size {tuple(x.shape[1:4])} must be "
          f"divisible by {factor}")
    layers.check_impl(self.impl)
    kernel_init, bias_init, scale_init = layers.initializers(self.init_scheme)
    common = dict(dtype=self.dtype, impl=self.impl, kernel_init=kernel_init,
                  bias_init=bias_init)

    def norm_relu(y, name):
      y = layers.InstanceNorm(dtype=self.dtype, scale_init=scale_init,
                              name=name)(y)
      return nn.relu(y)

    x = jnp.asarray(x, self.dtype)
    ngf = self.ngf
    x = layers.Conv3d(ngf, kernel_size=3, padding=1, **common,
                      name="conv_in")(x)
    x = norm_relu(x, "norm_in")
    for i in range(self.N_PRE_DOWN):
      x = layers.DownConv(ngf, padding=1, **common, name=f"pre_down_{i}")(x)
      x = norm_relu(x, f"pre_down_norm_{i}")
    for i in range(2):
      x = layers.DownConv(ngf * 2**(i + 1), padding=1, **common,
                          name=f"down_{i}")(x)
      x = norm_relu(x, f"down_norm_{i}")
    for i in range(self.n_blocks):
      block = ResNetBlock(self.dropout_rate, dtype=self.dtype, impl=self.impl,
                          init_scheme=self.init_scheme, name=f"block_{i}")
      x = block(x, train=train)
    for i in range(2):
      x = layers.UpConv(ngf * 2**(1 - i), **common, name=f"up_{i}")(x)
      x = norm_relu(x, f"up_norm_{i}")
    x = layers.OutConv(self.out_channels, kernel_size=7, padding=3, **common,
                       name="conv_out")(x)
    return jnp.tanh(x)


class HRGenerator(ResNetGenerator):
  """HR patch generator: ``[B, p, p, p, C_in] -> [B, p, p, p, 1]`` (p % 4 == 0).

  The input channels are the previous-scale patch and the edge patch (C_in =
  2; a label mask is written onto the sketch, not given a channel of its
  own); C_in is read from the input. At ngf 64, 6 blocks and C_in 2: 26,513,089 parameters and 36.3
  GFLOP per 32³ patch (the reference's). Initialisation defaults to the
  reference's ``"reference"`` scheme. See `ResNetGenerator` for the layers
  and attributes.
  """
