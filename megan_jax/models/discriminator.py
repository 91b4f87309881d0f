"""PatchGAN discriminators for the HR scales and for the LR scale.

Both return ``(logits, features)``: ``logits`` are the patch scores the GAN
loss is taken over (float32, no sigmoid), ``features`` the activations after
each LeakyReLU (in the compute dtype), for feature matching or inspection.
"""
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from megan_jax.errors import InputError
from megan_jax.models import layers
from megan_jax.types import Array

KINDS = ("hr", "lr")
# "map": a one-channel map of patch logits (the paper's PatchGAN, as
# pix2pix's); "code": the public MEGAN code's outputs (one logit per HR
# patch; the LR scale's last features, no final conv).
OUTPUTS = ("map", "code")


class PatchDiscriminator(nn.Module):
  """Fully convolutional PatchGAN (kernel 4), in the public MEGAN code's two kinds.

  ``kind="hr"`` (input: concat(edges, previous-scale patch, patch) as
  channels, ``[B, p, p, p, C]``, C read from the input, 3 in MEGAN):
  conv 4³ s1 p0 C→ndf, LReLU 0.2; ``n_layers - 1`` × [conv 4³ s2 p0 to
  ``ndf·min(2**n, 8)``, norm, LReLU 0.2]; conv 4³ p0 →1, stride 1 for
  ``output="map"`` (a 32³ patch gives a 2³ map of logits, ``[B, 2, 2, 2,
  1]``: 29³ -> 13³ -> 5³ -> 2³), stride 2 for ``"code"`` (one logit, 1³). At
  ndf 64, C 3: 2,651,329 parameters either way.

  ``kind="lr"`` (input: the tuple ``(edges [B, 2L, 2L, 2L, C_e], image [B, L,
  L, L, C_i])``): conv 3³ s2 p1 C_e→C_e on the sketch (2L -> L), concatenated
  with the image; conv 4³ s2 p1 →ndf, LReLU 0.2; ``n_layers - 1`` × [conv 4³
  s2 p1 to ``ndf·min(2**n, 8)``, norm, LReLU 0.2]; then ``output="map"``:
  pix2pix's final conv 4³ s1 p1 →1, a ``[B, L/8 - 1, ..., 1]`` map of logits
  (7³ at L 64; 2,647,261 parameters at ndf 64); ``"code"``: no final conv,
  the logits are the last features, ``[B, L/8, L/8, L/8, 4ndf]`` (the GAN
  loss is taken over them, as in the reference; 2,630,876 parameters).

  All stride-2 convs are `layers.DownConv` (fast form: space-to-depth).

  Attributes:
    kind: ``"hr"`` or ``"lr"``.
    ndf: channels of the first conv.
    n_layers: the first conv plus ``n_layers - 1`` normalised stride-2 convs.
    norm: ``"instance"`` (the paper's, the default) or ``"batch"`` (the
      public code's; statistics of the current batch only, stateless; see
      `layers.BatchNorm`). Both have a scale and a shift per channel.
    dtype: compute dtype (input cast once); params float32.
    impl: ``"fast"`` or ``"plain"`` convolutions; same params.
    output: ``"map"`` (the paper's, the default) or ``"code"`` (the public
      code's); see above.
    init_scheme: ``"reference"`` (conv weights N(0, 0.001²), norm scales N(1,
      0.02²)) or ``"default"`` (Flax defaults); None picks the reference's
      choice per kind: ``"reference"`` for ``"hr"``, ``"default"`` for
      ``"lr"``.
  """
  kind: str = "hr"
  ndf: int = 64
  n_layers: int = 3
  norm: str = "instance"
  dtype: Any = jnp.float32
  impl: str = "fast"
  init_scheme: Optional[str] = None
  output: str = "map"

  @nn.compact
  def __call__(self, inputs, *, train: bool = True
               ) -> tuple[Array, tuple[Array, ...]]:
    """Scores patches.

    Args:
      inputs: ``kind="hr"``: ``[B, p, p, p, C]`` (concat(edges, previous-scale
        patch, patch); p = 32 gives one logit). ``kind="lr"``: a tuple
        ``(edges [B, 2L, 2L, 2L, C_e], image [B, L, L, L, C_i])``, L divisible
        by ``2**n_layers``.
      train: accepted for a uniform signature with the generators; no effect
        (no dropout, and ``norm="batch"`` always uses batch statistics).

    Returns:
      ``(logits, features)``: logits float32 (``"hr"``: ``[B, p', p', p',
      1]``, p' = `hr_logit_side`; ``"lr"``, ``output="map"``: ``[B,
      L/2**n_layers - 1, ..., 1]``, ``"code"``: ``[B, L/2**n_layers, ...,
      ndf·min(2**(n_layers-1), 8)]``); features, a tuple of the ``n_layers``
      activations after each LeakyReLU, in ``dtype``.
    """
    del train
    if self.kind not in KINDS:
      raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
    if self.output not in OUTPUTS:
      raise ValueError(f"output must be one of {OUTPUTS}, got "
                       f"{self.output!r}")
    layers.check_impl(self.impl)
    if self.n_layers < 1:
      raise ValueError(f"n_layers must be >= 1, got {self.n_layers}")
    scheme = self.init_scheme or ("reference" if self.kind == "hr" else
                                  "default")
    kernel_init, bias_init, scale_init = layers.initializers(scheme)
    common = dict(dtype=self.dtype, impl=self.impl, kernel_init=kernel_init,
                  bias_init=bias_init)
    if self.kind == "hr":
      x = self._check_hr(inputs)
      x = jnp.asarray(x, self.dtype)
      x = layers.Conv3d(self.ndf, kernel_size=4, padding=0, **common,
                        name="conv_0")(x)
      padding = 0
    else:
      edges, image = self._check_lr(inputs)
      edges = jnp.asarray(edges, self.dtype)
      image = jnp.asarray(image, self.dtype)
      sketch = layers.DownConv(edges.shape[-1], kernel_size=3, padding=1,
                               **common, name="sketch_down")(edges)
      x = jnp.concatenate([sketch, image], axis=-1)
      x = layers.DownConv(self.ndf, kernel_size=4, padding=1, **common,
                          name="conv_0")(x)
      padding = 1
    x = nn.leaky_relu(x, 0.2)
    features = [x]
    for n in range(1, self.n_layers):
      x = layers.DownConv(self.ndf * min(2**n, 8), kernel_size=4,
                          padding=padding, **common, name=f"conv_{n}")(x)
      x = layers.make_norm(self.norm, f"norm_{n}", dtype=self.dtype,
                           scale_init=scale_init)(x)
      x = nn.leaky_relu(x, 0.2)
      features.append(x)
    if self.kind == "hr" and self.output == "code":
      logits = layers.DownConv(1, kernel_size=4, padding=0, **common,
                               name="conv_out")(x)
    elif self.kind == "hr":
      logits = layers.Conv3d(1, kernel_size=4, padding=0, **common,
                             name="conv_out")(x)
    elif self.output == "map":
      logits = layers.Conv3d(1, kernel_size=4, padding=1, **common,
                             name="conv_out")(x)
    else:
      logits = x
    return jnp.asarray(logits, jnp.float32), tuple(features)

  def _check_hr(self, x: Array) -> Array:
    if isinstance(x, (tuple, list)) or x.ndim != 5:
      raise InputError(
          "PatchDiscriminator(kind='hr'): expected one [B, p, p, p, C] array "
          f"(edges, previous-scale patch and patch concatenated), got "
          f"{_shapes(x)}")
    if hr_logit_side(min(x.shape[1:4]), self.n_layers, self.output) < 1:
      raise InputError(
          f"PatchDiscriminator(kind='hr'): patch size {tuple(x.shape[1:4])} "
          f"too small for n_layers={self.n_layers}")
    return x

  def _check_lr(self, inputs) -> tuple[Array, Array]:
    if not isinstance(inputs, (tuple, list)) or len(inputs) != 2:
      raise InputError(
          "PatchDiscriminator(kind='lr'): expected a tuple (edges [B, 2L, 2L, "
          f"2L, C], image [B, L, L, L, C]), got {_shapes(inputs)}")
    edges, image = inputs
    if edges.ndim != 5 or image.ndim != 5 or edges.shape[0] != image.shape[0]:
      raise InputError(
          "PatchDiscriminator(kind='lr'): expected edges [B, 2L, 2L, 2L, C] "
          f"and image [B, L, L, L, C], got {_shapes(inputs)}")
    spatial = tuple(image.shape[1:4])
    if tuple(edges.shape[1:4]) != tuple(2 * n for n in spatial):
      raise InputError(
          "PatchDiscriminator(kind='lr'): edges size "
          f"{tuple(edges.shape[1:4])} is not twice the image size {spatial}")
    factor = 2**self.n_layers
    if any(n % factor for n in spatial):
      raise InputError(
          f"PatchDiscriminator(kind='lr'): image size {spatial} must be "
          f"divisible by 2**n_layers = {factor}")
    if self.output == "map" and min(spatial) < 2 * factor:
      raise InputError(
          f"PatchDiscriminator(kind='lr'): image size {spatial} too small "
          f"for output='map' with n_layers={self.n_layers} (at least "
          f"{2 * factor}: its last conv leaves side - 1)")
    return edges, image


def hr_logit_side(patch_side: int, n_layers: int, output: str = "map"
                  ) -> int:
  """Side of the ``kind="hr"`` logits for a patch side; below 1 the patch is
  too small. Sizes through the layers: ``p - 3``, then ``(n - 4) // 2 + 1``
  per stride-2 conv, then ``n - 3`` (``"map"``) or ``(n - 4) // 2 + 1``
  (``"code"``): both below 1 exactly where n < 4."""
  n = patch_side - 3
  for _ in range(n_layers - 1):
    n = (n - 4) // 2 + 1
  return n - 3 if output == "map" else (n - 4) // 2 + 1


def _shapes(x):
  if isinstance(x, (tuple, list)):
    return [tuple(getattr(a, "shape", ())) for a in x]
  return tuple(getattr(x, "shape", ()))
