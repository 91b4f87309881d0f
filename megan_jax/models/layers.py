"""3D convolution layers, norms and initialisers shared by the MEGAN networks.

Tensors are channels-last, ``[B, D, H, W, C]``. Every convolution is a small
module with two implementations selected by ``impl``:

- ``"plain"``: the straight ``lax.conv_general_dilated`` form (strided convs,
  ``lhs_dilation`` for the transposed conv). Short and obviously right.
- ``"fast"``: the same function written as stride-1 convolutions or dots
  only, so that autodiff also produces only stride-1 convolutions or dots.
  XLA's CPU backend runs convolutions with input dilation (every transposed
  conv forward, the input gradient of every strided conv) and the 7³ conv to
  one channel at 0.3-3 GFLOP/s against ~95 for a plain 3³ conv
  (``shared/XLA-CPU.md``). On CPU (`use_dots`) the stride-1 convs inside are
  further written as dots (im2col, or a matmul to the taps where C_in >= 4·
  C_out: the 7³ output conv, most space-to-depth convs), whose gradients
  XLA's CPU backend also runs far faster; on GPUs they
  stay ``lax`` stride-1 convs, which cost no extra memory.

Both implementations create IDENTICAL parameters: an ordinary ``kernel`` of
shape ``[k, k, k, C_in, C_out]`` and a ``bias`` of shape ``[C_out]``; the fast
forms re-arrange the kernel inside the (jitted) function, so checkpoints,
weight import and tests see one layout. Importing PyTorch weights:
``Conv3d.weight [C_out, C_in, k, k, k]`` -> ``w.transpose(2, 3, 4, 1, 0)``;
``ConvTranspose3d.weight [C_in, C_out, k, k, k]`` -> ``w.transpose(2, 3, 4, 0,
1)`` (no flip: ``UpConv`` uses PyTorch's semantics).

Padding is zero padding everywhere, as in the PyTorch reference.
"""
import functools
import itertools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from megan_jax.types import Array

Dtype = Any
Initializer = Callable[..., Array]

# "fast": the forms below (several with their own backward through
# jax.custom_vjp, so reverse mode only: jax.jvp / jacfwd / hessian need
# "plain"); "plain": lax convs, every autodiff mode.
IMPLS = ("fast", "plain")
INITS = ("reference", "default")
NORMS = ("instance", "batch")

_DN = ("NDHWC", "DHWIO", "NDHWC")  # lax dimension numbers, channels-last


# ---------------------------------------------------------------------------
# Initialisers.


def normal_around(mean: float, stddev: float) -> Initializer:
  """Initialiser drawing from N(mean, stddev**2)."""

  def init(key, shape, dtype=jnp.float32):
    return mean + stddev * jax.random.normal(key, shape, dtype)

  return init


def initializers(init: str) -> tuple[Initializer, Initializer, Initializer]:
  """Returns ``(kernel_init, bias_init, norm_scale_init)`` for an init scheme.

  Args:
    init: ``"reference"``: the public MEGAN code's scheme for the HR nets
      (``shared/METHOD.md``): every conv weight from N(0, 0.001²) (standard
      deviation 0.001, as PyTorch's ``init.normal_(w, 0.0, 0.001)``), biases
      zero, norm scales from N(1, 0.02²), norm shifts zero. ``"default"``:
      Flax's defaults (LeCun normal kernels, zero biases, unit scales).

  Returns:
    The three initialisers.
  """
  if init == "reference":
    return (nn.initializers.normal(stddev=0.001), nn.initializers.zeros,
            normal_around(1.0, 0.02))
  if init == "default":
    return (nn.initializers.lecun_normal(), nn.initializers.zeros,
            nn.initializers.ones)
  raise ValueError(f"init_scheme must be one of {INITS}, got {init!r}")


def check_impl(impl: str) -> None:
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


# ---------------------------------------------------------------------------
# Space-to-depth helpers.


def space_to_depth(x: Array, block: int = 2) -> Array:
  """Folds ``block³`` neighbourhoods into channels.

  Args:
    x: ``[B, D, H, W, C]`` with D, H, W divisible by ``block``.
    block: the block size.

  Returns:
    ``[B, D/b, H/b, W/b, b³·C]``; channel index ``((i·b + j)·b + k)·C + c``
    holds ``x[:, b·d + i, b·h + j, b·w + k, c]``.
  """
  b, d, h, w, c = x.shape
  if d % block or h % block or w % block:
    raise ValueError(
        f"space_to_depth: spatial shape {(d, h, w)} not divisible by {block}")
  x = x.reshape(b, d // block, block, h // block, block, w // block, block, c)
  x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
  return x.reshape(b, d // block, h // block, w // block, block**3 * c)


def depth_to_space(x: Array, block: int = 2) -> Array:
  """Inverse of `space_to_depth`: ``[B, D, H, W, b³·C] -> [B, bD, bH, bW, C]``."""
  b, d, h, w, cc = x.shape
  if cc % block**3:
    raise ValueError(
        f"depth_to_space: {cc} channels not divisible by {block**3}")
  c = cc // block**3
  x = x.reshape(b, d, h, w, block, block, block, c)
  x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
  return x.reshape(b, d * block, h * block, w * block, c)


# ---------------------------------------------------------------------------
# Functional convolutions (kernels in the ordinary [k, k, k, C_in, C_out]).


def conv3d(x: Array, kernel: Array, padding: int = 0, stride: int = 1) -> Array:
  """Plain zero-padded 3D cross-correlation (PyTorch ``Conv3d`` semantics)."""
  return lax.conv_general_dilated(
      x, kernel, window_strides=(stride,) * 3, padding=[(padding, padding)] * 3,
      dimension_numbers=_DN)


def conv3d_im2col(x: Array, kernel: Array, padding: int = 0) -> Array:
  """Stride-1 3D conv as im2col (concatenated shifted slices) plus one dot.

  Its autodiff is two dots plus slices and pads, which XLA's CPU backend runs
  far faster than a convolution's weight gradient (measured 5-50× on the
  layers here; ``shared/XLA-CPU.md``). It materialises k³ × the input.
  Up to ``IM2COL_ONE_CONCAT_TAPS`` taps and from
  ``IM2COL_ONE_CONCAT_CHANNELS`` input channels the columns are one
  concatenation of the k³ shifted slices: for the HR generator's ResNet
  convs (3³, 256 channels at 8³) forward and backward 41 ms against 52
  when built one axis at a time (3 concatenations of k slices each; batch
  4: 196 against 232), the HR training step 0.975× (median of 16
  alternating rounds; 0.92× in a 5-round run), the LR step 0.97× (same
  process; compile 5-10 % longer); 2³ convs over 1024 channels 0.91×.
  Narrower inputs copy short rows and mostly lost: the HR generator's
  first conv (2 channels, 32³, batch 8) forward 109 against 70 ms, a 3³
  conv over 64 channels at 16³ 1.2-1.4×; 32 channels won (0.68×
  forward and backward), 16 were even. Larger kernels keep the per-axis
  build (3·k slices instead of k³, much faster to compile).

  Args:
    x: ``[B, D, H, W, C_in]``.
    kernel: ``[k, k, k, C_in, C_out]``.
    padding: zero padding per side.

  Returns:
    ``[B, D + 2p - k + 1, ..., C_out]`` in ``x.dtype`` (accumulated in float32).
  """
  k = kernel.shape[0]
  dtype = x.dtype
  if padding:
    x = jnp.pad(x, [(0, 0)] + [(padding, padding)] * 3 + [(0, 0)])
  if (k**3 <= IM2COL_ONE_CONCAT_TAPS
      and x.shape[-1] >= IM2COL_ONE_CONCAT_CHANNELS):
    n = [s - k + 1 for s in x.shape[1:4]]
    x = jnp.concatenate([x[:, a:a + n[0], b:b + n[1], c:c + n[2]]
                         for a in range(k) for b in range(k)
                         for c in range(k)], axis=-1)
  else:
    # W first, so the channels end up ordered (kd, kh, kw, c_in) as the kernel.
    for axis in (3, 2, 1):
      n = x.shape[axis] - k + 1
      x = jnp.concatenate(
          [lax.slice_in_dim(x, t, t + n, axis=axis) for t in range(k)], axis=-1)
  y = lax.dot_general(x, kernel.reshape(-1, kernel.shape[-1]),
                      (((4,), (0,)), ((), ())),
                      preferred_element_type=jnp.float32)
  return y.astype(dtype)


def _columns_channel_major(x: Array, k: int, padding: int) -> Array:
  """im2col transposed: ``[k³·C_in, B·D'·H'·W']``, rows ordered (kd, kh, kw,
  c_in) as the kernel; each row is a shifted copy of one input channel."""
  if padding:
    x = jnp.pad(x, [(0, 0)] + [(padding, padding)] * 3 + [(0, 0)])
  outs = [n - k + 1 for n in x.shape[1:4]]
  xt = jnp.moveaxis(x, -1, 0)  # [C_in, B, D, H, W]
  rows = [xt[:, :, a:a + outs[0], b:b + outs[1], c:c + outs[2]]
          for a in range(k) for b in range(k) for c in range(k)]
  return jnp.stack(rows, 0).reshape(k**3 * x.shape[-1], -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3d_im2col_narrow(x: Array, kernel: Array, padding: int = 0) -> Array:
  """`conv3d_im2col` for inputs with few channels (the edge sketch), with
  its own backward.

  Autodiff of im2col contracts the columns with the output gradient over
  the voxels, and XLA's CPU backend then transposes the output gradient to
  channel-major in a strided loop: for the LR generator's first conv (1 ->
  64 channels at 128³) that one copy took 1.6 s of a 17.5 s training step.
  Here the kernel gradient is ``columnsᵀ · dy`` with the columns built
  channel-major (cheap with one input channel) and the input gradient the
  stride-1 conv of ``dy`` with the flipped kernel (`conv3d_fast`). That
  conv's forward and kernel gradient: 1.1 s against 2.9 s (2-core Xeon).
  The forward uses the same channel-major columns (``kernelᵀ · columns``,
  then one transpose of the output) and keeps them for the backward,
  instead of building voxel-major ones as well: the HR discriminator's
  first conv (4³, 3 -> 64 channels at 32³) forward and backward 0.77× the
  time, its three passes in a training step 0.91×. Wider inputs lose (a 3³
  256-channel conv: 63 against 53 ms): see ``NARROW_CHANNELS``.
  """
  return conv3d_im2col(x, kernel, padding)


def _im2col_narrow_fwd(x, kernel, padding):
  k, cout = kernel.shape[0], kernel.shape[-1]
  cols = _columns_channel_major(x, k, padding)
  y = lax.dot_general(kernel.reshape(-1, cout).astype(x.dtype), cols,
                      (((0,), (0,)), ((), ())),
                      preferred_element_type=x.dtype)  # [C_out, voxels]
  outs = [n + 2 * padding - k + 1 for n in x.shape[1:4]]
  y = y.T.reshape([x.shape[0]] + outs + [cout]).astype(x.dtype)
  return y, (kernel, cols)


def _im2col_narrow_bwd(padding, residuals, dy):
  kernel, cols = residuals
  k = kernel.shape[0]
  dk = lax.dot_general(cols, dy.reshape(-1, dy.shape[-1]),
                       (((1,), (0,)), ((), ())),
                       preferred_element_type=jnp.float32)
  flipped = jnp.flip(kernel, (0, 1, 2)).swapaxes(3, 4)
  # The full correlation of dy with the flipped kernel, less the padding:
  # a conv padded by k - 1 - padding, or (padding > k - 1) unpadded and
  # cropped by the rest.
  crop = max(padding - (k - 1), 0)
  dx = conv3d_fast(dy, flipped, max(k - 1 - padding, 0))
  if crop:
    dx = dx[:, crop:-crop, crop:-crop, crop:-crop]
  return dx.astype(cols.dtype), dk.reshape(kernel.shape).astype(kernel.dtype)


conv3d_im2col_narrow.defvjp(_im2col_narrow_fwd, _im2col_narrow_bwd)


def use_dots() -> bool:
  """Whether the fast forms write stride-1 convs as dots (im2col, tap matmul).

  True on the CPU backend, where that wins (``shared/XLA-CPU.md``). Elsewhere
  (GPU) the vendor convolutions are fast and im2col would multiply activation
  memory by k³, so the fast forms keep ``lax`` stride-1 convolutions there
  (still without strides or input dilation). Decided at trace time.
  """
  return jax.default_backend() == "cpu"


# The skinny convs (at most NARROW_CHANNELS input channels: the first conv,
# on the edge sketch; `OutConv`, to one channel) as dots (im2col, tap
# matmul) or as `lax` convs: None follows `use_dots`; True takes the dots on
# any backend too (a GPU experiment: cuDNN may leave its tensor cores idle
# on one output channel, where the tap matmul is a GEMM 343 wide).
SKINNY_DOTS = None


def skinny_dots() -> bool:
  """Whether `conv3d_fast` and `OutConv` write the skinny convs as dots."""
  return use_dots() if SKINNY_DOTS is None else bool(SKINNY_DOTS)


# Where the skinny convs stay lax convs (off the CPU, `skinny_dots` false):
# as `conv3d_blocked` over blocks of this side (None: the direct lax conv).
# A GPU experiment, off by default until a GPU measures it
# (``throughput.conv_form("fast-blocked")``): `OutConv` (the 7³ conv to one
# channel: 58 % of the bf16 HR forward on an H100, at 1 % of the peak) and
# the convs on at most NARROW_CHANNELS input channels (the first).
OUT_CONV_BLOCK = None
NARROW_CONV_BLOCK = None


WINOGRAD_MIN_TILES = 256  # 2³ output tiles from which 3³/2³ convs go Winograd
WINOGRAD_MIN_CHANNELS = 32  # and at least this many input and output channels
TAPS_RATIO = 4  # C_in / C_out from which `conv3d_fast` takes the taps form
TAPS_OVER_WINOGRAD = 8  # C_in / C_out from which taps go before Winograd
NARROW_CHANNELS = 4  # up to this many input channels: `conv3d_im2col_narrow`
TAPS_VOXEL_MAJOR = 16  # C_out from which `conv3d_taps` keeps voxels major
TAPS_MAX_EXTRA = 1.5  # the most input voxels per output voxel it accepts
TAPS_OWN_GRAD_TAPS = 8  # up to this many taps, `_taps_small`'s backward
IM2COL_ONE_CONCAT_TAPS = 64  # up to this many taps, im2col's columns in one go
IM2COL_ONE_CONCAT_CHANNELS = 128  # from this many input channels
UP_OWN_GRAD = True  # `up_conv_fast` takes `_up_conv_own_grad`'s backward
# Kernel sizes whose Winograd convs are also differentiated in the Winograd
# form; the others (2³) run the Winograd forward and the backward of the
# dot form (`conv3d_winograd`).
WINOGRAD_GRAD_KERNELS = (3,)


def conv3d_fast(x: Array, kernel: Array, padding: int = 0) -> Array:
  """Stride-1 conv; on the CPU (`use_dots`) as dots, elsewhere `conv3d`.

  Chosen per conv at trace time, in this order (times per layer, forward
  and backward unless said, 2-core Xeon, against the form used before):

  1. Winograd (`conv3d_winograd`, fewest multiplies) for 3³ and 2³
     kernels (ResNet convs; the 2³ convs inside the stride-2 and transposed
     convs) with at least ``WINOGRAD_MIN_TILES`` 2³ output tiles,
     ``WINOGRAD_MIN_CHANNELS`` channels in and out, and C_in <
     ``TAPS_OVER_WINOGRAD``·C_out. HR ResNet conv at batch 8: forward
     2.8×, forward and backward 1.6× faster than im2col; the LR U-Net's
     large 2³ convs 1.3-1.7×. Below the tile bound it lost (3.5× on the
     U-Net's 4³-tile bottleneck), and with C_in 8× C_out (the LR ResNet's
     first stride-2 conv, 2³ conv 512→64 at 64³, a 1.9 GB transformed
     input) the taps form took 5.7 s against 8.2.
  2. The tap matmul (`conv3d_taps`: k³·C_out values per input voxel) when
     C_in >= ``TAPS_RATIO``·C_out and the input has at most
     ``TAPS_MAX_EXTRA`` × the output's voxels (it multiplies at every
     input voxel). That LR conv: 8.4 s against im2col's 18.1 (its columns
     are 4.3 GB). On an 8³ output of a valid 2³ conv (the HR generator's
     second stride-2 conv, 42 % more multiplies) im2col won until the 2³
     taps form had its own backward (`_taps_small`); since, taps 0.88× its
     time, so the bound went from 1.25 to 1.5.
  3. `conv3d_im2col_narrow` for at most ``NARROW_CHANNELS`` input channels
     (the edge sketch): the LR generator's first conv, forward and kernel
     gradient 1.1 s against 2.9.
  4. Otherwise im2col (`conv3d_im2col`: k³·C_in values per output voxel).

  The whole-network effect is in ``benchmarks/throughput.py`` (impl
  ``"fast-im2col"``: everything as im2col).
  """
  if not use_dots():
    k = kernel.shape[0]
    narrow = kernel.shape[3] <= NARROW_CHANNELS
    if skinny_dots() and narrow and padding <= k - 1:
      return conv3d_im2col_narrow(x, kernel, padding)
    if NARROW_CONV_BLOCK and narrow:
      return conv3d_blocked(x, kernel, padding, NARROW_CONV_BLOCK)
    return conv3d(x, kernel, padding)
  if _takes_winograd(x.shape, kernel.shape, padding):
    return conv3d_winograd(x, kernel, padding)
  return _dots_form(x, kernel, padding)


def _takes_winograd(x_shape, kernel_shape, padding: int) -> bool:
  """Whether `conv3d_fast` runs a conv of these shapes as Winograd."""
  k = kernel_shape[0]
  outs = [n + 2 * padding - k + 1 for n in x_shape[1:4]]
  tiles = x_shape[0] * math.prod(-(-o // 2) for o in outs)
  return (k in _WINOGRAD and tiles >= WINOGRAD_MIN_TILES
          and min(kernel_shape[3:]) >= WINOGRAD_MIN_CHANNELS
          and kernel_shape[3] < TAPS_OVER_WINOGRAD * kernel_shape[4])


def _dots_form(x: Array, kernel: Array, padding: int) -> Array:
  """`conv3d_fast`'s choice among its forms 2-4 (no Winograd)."""
  k = kernel.shape[0]
  outs = [n + 2 * padding - k + 1 for n in x.shape[1:4]]
  if (kernel.shape[3] >= TAPS_RATIO * kernel.shape[4]
      and math.prod(x.shape[1:4]) <= TAPS_MAX_EXTRA * math.prod(outs)):
    return conv3d_taps(x, kernel, padding).astype(x.dtype)
  if kernel.shape[3] <= NARROW_CHANNELS and padding <= k - 1:
    return conv3d_im2col_narrow(x, kernel, padding)
  return conv3d_im2col(x, kernel, padding)


# Winograd F(2, k) (Lavin & Gray 2016) for correlation: per axis,
# y = Aᵀ[(G g) ⊙ (Bᵀ d)] on (k + 1)-sample input tiles giving 2 outputs; in
# 3D per axis. F(2, 3): 4 multiplies per 2 outputs instead of 6; F(2, 2)
# (the 2³ convs inside the stride-2 and transposed convs): 3 instead of 4,
# with integer coefficients (exact).
_WINOGRAD = {
    3: (((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),  # Bᵀ
        ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1)),  # G
        ((1, 1, 1, 0), (0, 1, -1, -1))),  # Aᵀ
    2: (((1, -1, 0), (0, 1, 0), (0, -1, 1)),
        ((1, 0), (1, 1), (0, 1)),
        ((1, 1, 0), (0, 1, 1))),
}


def _combine(parts, coefs):
  """``Σ coef·part`` skipping zeros (adds and subtracts for ±1)."""
  acc = None
  for part, c in zip(parts, coefs):
    if c == 0:
      continue
    term = part if c == 1 else -part if c == -1 else part * c
    acc = term if acc is None else acc + term
  return acc


def winograd_kernel(kernel: Array) -> Array:
  """``G g Gᵀ`` per axis: ``[k, k, k, C_in, C_out] -> [(k+1)³, C_in, C_out]``.

  Tile positions ordered (W, H, D) outermost first, as `conv3d_winograd`'s
  input transform. Written as scaled adds that XLA fuses into one pass:
  an ``einsum`` with the 4×3 matrices ran as three tiny dots with
  transposes, 72 ms for a 256→256 kernel against 5 ms (2-core Xeon), paid
  once per call, which is what made Winograd lose at small batches.
  """
  k = kernel.shape[0]
  g = _WINOGRAD[k][1]
  for axis in (0, 1, 2):  # D, H, W; each new tap axis goes in front
    parts = [lax.index_in_dim(kernel, i, axis, keepdims=False)
             for i in range(k)]
    kernel = jnp.stack([_combine(parts, row) for row in g], axis=0)
  return kernel.reshape((k + 1)**3, kernel.shape[-2], kernel.shape[-1])


def _winograd_setup(x: Array, kernel: Array, padding: int):
  """Checks the kernel; pads ``x`` to whole tiles; output sizes and tiles."""
  k = kernel.shape[0]
  if kernel.shape[:3] != (k,) * 3 or k not in _WINOGRAD:
    raise ValueError(f"conv3d_winograd: needs a 3³ or 2³ kernel, got "
                     f"{kernel.shape[:3]}")
  outs = [n + 2 * padding - k + 1 for n in x.shape[1:4]]
  tiles = [-(-o // 2) for o in outs]
  config = [(0, 0, 0)] + [(padding, 2 * m + k - 1 - n - padding, 0)
                          for m, n in zip(tiles, x.shape[1:4])] + [(0, 0, 0)]
  return lax.pad(x, jnp.zeros((), x.dtype), config), outs, tiles


def _transform_dtype(x: Array, kernel: Array) -> tuple[Array, Array]:
  """Input and kernel in float32 for Winograd's transforms (sums and
  halvings): in bfloat16 their extra roundings before the dot gave 2.2×
  the error of the plain bf16 conv (3³ kernel, 32 channels), 1.55× so.
  The dot itself still takes the compute dtype (its operands are cast back
  just before it); their rounding is what is left (2³: ~2.3× either
  way)."""
  if x.dtype == jnp.float32 and kernel.dtype == jnp.float32:
    return x, kernel
  return x.astype(jnp.float32), kernel.astype(jnp.float32)


def _winograd_stacked(x: Array, kernel: Array, padding: int) -> Array:
  """`conv3d_winograd` with the tile positions stacked on a leading axis.

  One batched dot; the transforms are stacks of sums of slices, whose
  transposes (pads and slices) XLA runs well: this is the form that is
  differentiated.
  """
  dtype = x.dtype
  k = kernel.shape[0]
  bt, _, at = _WINOGRAD[k]
  t = k + 1  # input tile size
  b, cin, cout = x.shape[0], x.shape[-1], kernel.shape[-1]
  x, kernel = _transform_dtype(x, kernel)
  x, outs, tiles = _winograd_setup(x, kernel, padding)
  # Input transform along D, H, W; each adds a leading tile-position axis:
  # [t_w, t_h, t_d, B, tD, tH, tW, C].
  for j, m in enumerate(tiles):
    axis = 2 * j + 1  # the spatial axis, behind the j leading ones
    parts = [lax.slice_in_dim(x, i, i + 2 * m - 1, stride=2, axis=axis)
             for i in range(t)]
    x = jnp.stack([_combine(parts, row) for row in bt], axis=0)
  n = b * tiles[0] * tiles[1] * tiles[2]
  v = x.reshape(t**3, n, cin).astype(dtype)
  u = winograd_kernel(kernel).astype(dtype)
  m = lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))),
                      preferred_element_type=jnp.float32)
  y = m.reshape(t, t, t, b, tiles[0], tiles[1], tiles[2], cout)
  # Output transform: D (axis 2), then H (1), then W (0); each interleaves
  # its 2 outputs behind the tile axis, which is axis 3 once the
  # transformed axis is gone.
  for axis in (2, 1, 0):
    parts = [lax.index_in_dim(y, j, axis, keepdims=False) for j in range(t)]
    y = jnp.stack([_combine(parts, row) for row in at], axis=4)
    shape = list(y.shape)
    y = y.reshape(shape[:3] + [2 * shape[3]] + shape[5:])
  return y[:, :outs[0], :outs[1], :outs[2]].astype(dtype)


def _winograd_split(x: Array, kernel: Array, padding: int) -> Array:
  """`conv3d_winograd` with every tile position its own array and dot.

  The same arithmetic as `_winograd_stacked`, but no (k+1)³-way stack is
  ever written: each transform stage maps a list of arrays to a list of
  arrays, each position gets its own ``[tiles, C_in] @ [C_in, C_out]`` dot,
  and the 8 output phases are interleaved in one pass at the end. On a
  2-core Xeon at batch 8 (forward): the HR generator's first stride-2 conv
  (its 2³ conv 512→128 at 16³) 247 ms against 384, the last transposed
  conv 313-330 against 517, a ResNet conv about even. Its autodiff is
  slow (hundreds of small pads summed), so only the primal uses it.
  """
  dtype = x.dtype
  k = kernel.shape[0]
  bt, _, at = _WINOGRAD[k]
  t = k + 1
  x, kernel = _transform_dtype(x, kernel)
  x, outs, tiles = _winograd_setup(x, kernel, padding)
  pieces = {(): x}  # keyed by the tile positions (D, H, W) chosen so far
  for j, m in enumerate(tiles):
    axis = j + 1
    new = {}
    for key, arr in pieces.items():
      parts = [lax.slice_in_dim(arr, i, i + 2 * m - 1, stride=2, axis=axis)
               for i in range(t)]
      for a, row in enumerate(bt):
        new[key + (a,)] = _combine(parts, row)
    pieces = new
  # Positions ordered (W, H, D), outermost first.
  u = winograd_kernel(kernel).astype(dtype)
  dn = (((4,), (0,)), ((), ()))
  pieces = {key: lax.dot_general(v.astype(dtype),
                                 u[(key[2] * t + key[1]) * t + key[0]],
                                 dn, preferred_element_type=jnp.float32)
            for key, v in pieces.items()}
  for axis in range(3):  # replace each position index by an output phase
    new = {}
    for key in sorted(pieces):
      if key[axis] != 0:
        continue
      parts = [pieces[key[:axis] + (i,) + key[axis + 1:]] for i in range(t)]
      for phase, row in enumerate(at):
        new[key[:axis] + (phase,) + key[axis + 1:]] = _combine(parts, row)
    pieces = new
  y = jnp.stack([jnp.stack([jnp.stack([pieces[(pd, ph, pw)] for pw in (0, 1)],
                                      axis=4) for ph in (0, 1)], axis=3)
                 for pd in (0, 1)], axis=2)  # [B, tD, 2, tH, 2, tW, 2, C]
  y = y.reshape(y.shape[0], 2 * tiles[0], 2 * tiles[1], 2 * tiles[2], -1)
  return y[:, :outs[0], :outs[1], :outs[2]].astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3d_winograd(x: Array, kernel: Array, padding: int = 0) -> Array:
  """Stride-1 3³ or 2³ conv by Winograd F(2³, k³): per 2³ outputs and
  channel pair 64 multiplies instead of 216 (k = 3, 3.4× fewer) or 27
  instead of 64 (k = 2, 2.4× fewer).

  The input is cut into (k+1)³ tiles at stride 2 and transformed (``Bᵀ``
  per axis: adds and subtracts only), the kernel transformed
  (`winograd_kernel`), then one dot per tile position (``[tiles, C_in] @
  [C_in, C_out]``) and the output transform (``Aᵀ``). The transformed input
  is 8× (k = 3) or 3.4× (k = 2) the input (im2col: k³×). The dots are
  the part XLA's CPU backend runs well, so it pays with enough tiles
  (`WINOGRAD_MIN_TILES`). The forward runs `_winograd_split`. Under
  differentiation, 3³ convs (`WINOGRAD_GRAD_KERNELS`) run the forward and
  backward of `_winograd_stacked` (same values); 2³ convs keep the split
  forward and take the backward of the dot form `conv3d_fast` would pick
  without Winograd: its transforms' transposes cost more than F(2, 2)
  saves (forward and backward at batch 1, HR generator: first stride-2
  conv 116 → 107 ms, second transposed conv 154 → 120, discriminator's
  second conv 82 → 56; batch 4 alike; HR training step 1.8 % faster,
  LR step unchanged within noise). Per layer on a 2-core Xeon (HR ResNet
  conv, 8³, 256 channels, batch 8): forward 86-102 ms against im2col's
  286 ms; forward and backward 232-311 against 369-487 ms; at batch 1
  forward 19 against 25 ms, forward and backward 72-86 against 42-58 ms
  (im2col wins: `WINOGRAD_MIN_TILES`).

  Args:
    x: ``[B, D, H, W, C_in]``.
    kernel: ``[k, k, k, C_in, C_out]``, k = 2 or 3.
    padding: zero padding per side.

  Returns:
    ``[B, D + 2p - k + 1, ..., C_out]`` in ``x.dtype`` (dots accumulated in
    float32).
  """
  return _winograd_split(x, kernel, padding)


def _winograd_fwd(x, kernel, padding):
  if kernel.shape[0] in WINOGRAD_GRAD_KERNELS:
    y, vjp = jax.vjp(lambda x, kernel: _winograd_stacked(x, kernel, padding),
                     x, kernel)
    return y, (vjp, None)
  return _winograd_split(x, kernel, padding), (None, (x, kernel))


def _winograd_bwd(padding, residuals, dy):
  vjp, inputs = residuals
  if vjp is None:  # the backward of the dot form `conv3d_fast` would take
    _, vjp = jax.vjp(lambda x, kernel: _dots_form(x, kernel, padding),
                     *inputs)
  return vjp(dy)


conv3d_winograd.defvjp(_winograd_fwd, _winograd_bwd)


def conv3d_blocked(x: Array, kernel: Array, padding: int = 0,
                   block: int = 4) -> Array:
  """A stride-1 conv as a conv over ``block³`` blocks (same result).

  For the skinny convs off the CPU (`OUT_CONV_BLOCK`, `NARROW_CONV_BLOCK`):
  cuDNN runs the 7³ conv to one channel at 1 % of a GPU's bf16 peak
  (``op_profile``, H100), where its ResNet convs (256 channels) run at
  60 %. Output voxel ``o = b·q + r`` (``r`` in ``[0, b)³``) reads input
  ``b·q + r + t``; written as ``b·(q + s) + u``, it is a valid stride-1
  conv with kernel ``S³`` (``S = (b + k - 2)//b + 1``) from the
  space-to-depth input (``b³·C_in`` channels) to ``b³·C_out`` channels (one
  per ``r``), followed by depth-to-space; the blocked kernel ``W[s, (u,
  c), (r, f)] = kernel[b·s + u - r, c, f]`` (zero where that tap is
  outside ``[0, k)``) is built from the ordinary one inside the function,
  so parameters and gradients keep their layout. It multiplies
  ``(S·b/k)³`` times as much: for the 7³ conv to one channel with ``b=4``,
  ``S=3``, a 3³ conv 64·64 -> 64 channels on an 8³ grid per 32³ patch,
  5.0× the direct conv's multiplies, in the shape tensor cores run well
  (as the ResNet convs).

  Args:
    x: ``[B, D, H, W, C_in]``.
    kernel: ``[k, k, k, C_in, C_out]``.
    padding: zero padding per side.
    block: ``b``.

  Returns:
    ``[B, D', H', W', C_out]`` with ``D' = D + 2p - k + 1``, as `conv3d`.
  """
  k = kernel.shape[0]
  b = int(block)
  taps = (b + k - 2) // b + 1  # S
  config, outs = [(0, 0, 0)], []
  for n in x.shape[1:4]:
    out = n + 2 * padding - k + 1
    if out < 1:
      raise ValueError(f"conv: input size {n} too small for kernel {k}")
    q = -(-out // b)  # output blocks
    # Blocks q + s for s < S: b·(q + S - 1) padded input voxels.
    config.append((padding, b * (q + taps - 1) - n - padding, 0))
    outs.append(out)
  config.append((0, 0, 0))
  x = lax.pad(x, jnp.zeros((), x.dtype), config)  # a negative hi crops
  x = space_to_depth(x, b)
  w = _blocked_kernel(kernel, b, taps).astype(x.dtype)
  y = depth_to_space(conv3d(x, w), b)
  return y[:, :outs[0], :outs[1], :outs[2]]


def _blocked_kernel(kernel: Array, b: int, taps: int) -> Array:
  """`conv3d_blocked`'s kernel ``W[s, (u, c), (r, f)] = kernel[b·s + u - r,
  c, f]`` (zero outside ``[0, k)``), ``[S, S, S, b³·C_in, b³·C_out]``.

  Per axis, output offset ``r`` reads taps ``j - r`` at ``j = b·s + u`` in
  ``[0, S·b)``: the kernel zero-padded by ``r`` before and ``S·b - k - r``
  after; the ``b`` offsets are stacked, then ``j`` split into ``(s, u)``.
  Pads and copies only, in float32 (exact for any dtype), so the kernel
  gradient sums its ``b³`` slices in float32: in bf16, its relative error
  against fp32 (7³ conv, 8 -> 1 channel, 16³) was 0.71 %, the direct
  conv's 0.57 %, a bf16 gather's (scatter-add in bf16) 1.18 %.
  """
  k = kernel.shape[0]
  span = taps * b
  w = kernel.astype(jnp.float32)  # [kd, kh, kw, C_in, C_out]
  for axis in (0, 2, 4):  # kd; then kh, kw behind the stacked offsets
    pads = [(0, 0)] * w.ndim
    w = jnp.stack([jnp.pad(w, pads[:axis] + [(r, span - k - r)]
                           + pads[axis + 1:]) for r in range(b)])
  # [rw, rh, rd, jd, jh, jw, C_in, C_out], j = (s, u):
  cin, cout = kernel.shape[3], kernel.shape[4]
  w = w.reshape(b, b, b, taps, b, taps, b, taps, b, cin, cout)
  # -> (sd, sh, sw, ud, uh, uw, C_in, rd, rh, rw, C_out).
  w = w.transpose(3, 5, 7, 4, 6, 8, 9, 2, 1, 0, 10)
  return w.reshape(taps, taps, taps, b**3 * cin, b**3 * cout)


def down_conv_fast(x: Array, kernel: Array, padding: int) -> Array:
  """A stride-2 conv as space-to-depth plus a stride-1 conv (same result).

  Pads, crops to the extent the strided conv reads, folds 2³ blocks into
  channels and runs a ``ceil(k/2)³`` stride-1 valid conv over 8× the input
  channels; odd kernels are zero-padded to even size first.

  Args:
    x: ``[B, D, H, W, C_in]``.
    kernel: ``[k, k, k, C_in, C_out]``.
    padding: zero padding per side of the equivalent strided conv.

  Returns:
    ``[B, D', H', W', C_out]`` with ``D' = (D + 2p - k) // 2 + 1``.
  """
  k, cin, cout = kernel.shape[0], kernel.shape[3], kernel.shape[4]
  ke = k + k % 2  # even kernel size
  if k % 2:
    kernel = jnp.pad(kernel, [(0, 1)] * 3 + [(0, 0)] * 2)
  config = [(0, 0, 0)]
  for n in x.shape[1:4]:
    out = (n + 2 * padding - k) // 2 + 1
    if out < 1:
      raise ValueError(f"down conv: input size {n} too small for kernel {k}")
    extent = 2 * (out - 1) + ke  # what the (even) kernel reads, padded coords
    config.append((padding, extent - n - padding, 0))  # negative hi crops
  config.append((0, 0, 0))
  x = lax.pad(x, jnp.zeros((), x.dtype), config)
  x = space_to_depth(x, 2)
  kh = ke // 2
  # k index = 2·a + b: a is the block offset (new kernel tap), b the position
  # inside the block (new channel group, ordered as space_to_depth's).
  kernel = kernel.reshape(kh, 2, kh, 2, kh, 2, cin, cout)
  kernel = kernel.transpose(0, 2, 4, 1, 3, 5, 6, 7)
  kernel = kernel.reshape(kh, kh, kh, 8 * cin, cout)
  return conv3d_fast(x, kernel)


def up_conv_plain(x: Array, kernel: Array) -> Array:
  """PyTorch ``ConvTranspose3d(k=4, stride=2, padding=1)`` via input dilation.

  Equals a stride-1 conv of the input dilated by 2, padded 2 per side, with
  all three spatial kernel axes flipped (our kernel is already ``[.., C_in,
  C_out]``, so no in/out swap is needed).
  """
  return lax.conv_general_dilated(
      x, jnp.flip(kernel, (0, 1, 2)), window_strides=(1, 1, 1),
      padding=[(2, 2)] * 3, lhs_dilation=(2, 2, 2), dimension_numbers=_DN)


def up_conv_fast(x: Array, kernel: Array) -> Array:
  """``ConvTranspose3d(k=4, stride=2, padding=1)`` in sub-pixel form.

  On the CPU (`use_dots`, with ``UP_OWN_GRAD``), where the input gradient's
  conv goes Winograd, its backward is `_up_conv_own_grad`'s.

  Per axis, ``out[2m] = x[m]·w[1] + x[m-1]·w[3]`` and ``out[2m+1] =
  x[m+1]·w[0] + x[m]·w[2]``: over the window ``(x[j-1], x[j])`` phase ``r``
  uses taps ``(w[3-r], w[1-r])``, at ``j = m + r``. One 2³ stride-1 conv of
  the 1-padded input computes all 8 phases at all ``(n+1)³`` windows; each
  phase keeps its ``n³`` and they are interleaved (depth-to-space).

  Args:
    x: ``[B, D, H, W, C_in]``.
    kernel: ``[4, 4, 4, C_in, C_out]``.

  Returns:
    ``[B, 2D, 2H, 2W, C_out]``.
  """
  b, d, h, w, cin = x.shape
  cout = kernel.shape[4]
  # The input gradient's stride-2 conv, in `down_conv_fast`'s form: a 2³
  # conv 8·C_out -> C_in over (n + 1)³ blocks. Only as Winograd did the own
  # backward win (HR generator, batch 1: the 16³ -> 32³ conv 0.78× the
  # autodiff time, the 8³ -> 16³ conv 1.22×; that one at batch 4: 0.84×).
  if use_dots() and UP_OWN_GRAD and _takes_winograd(
      (b, d + 1, h + 1, w + 1, 8 * cout), (2, 2, 2, 8 * cout, cin), 0):
    return _up_conv_own_grad(x, kernel)
  return _up_conv_subpixel(x, kernel)


def _up_conv_subpixel(x: Array, kernel: Array) -> Array:
  """`up_conv_fast`'s forward."""
  b, d, h, w, _ = x.shape
  cin, cout = kernel.shape[3], kernel.shape[4]
  # flipped index k' = 3 - k = 2·t + r: t is the tap, r the phase.
  kf = jnp.flip(kernel, (0, 1, 2)).reshape(2, 2, 2, 2, 2, 2, cin, cout)
  kf = kf.transpose(0, 2, 4, 6, 1, 3, 5, 7).reshape(2, 2, 2, cin, 8 * cout)
  y = conv3d_fast(x, kf, padding=1)  # [B, D+1, H+1, W+1, 8·C_out]
  y = y.reshape(b, d + 1, h + 1, w + 1, 2, 2, 2, cout)
  # Interleave one axis at a time: phase r of axis a reads windows r..r+n-1.
  # The phase axis of the axis being interleaved is always dim 4.
  for axis, n in ((1, d), (2, h), (3, w)):
    p0 = lax.slice_in_dim(lax.index_in_dim(y, 0, 4, keepdims=False), 0, n,
                          axis=axis)
    p1 = lax.slice_in_dim(lax.index_in_dim(y, 1, 4, keepdims=False), 1, n + 1,
                          axis=axis)
    y = jnp.stack([p0, p1], axis=axis + 1)
    shape = list(y.shape)
    y = y.reshape(shape[:axis] + [2 * n] + shape[axis + 2:])
  return y


@jax.custom_vjp
def _up_conv_own_grad(x: Array, kernel: Array) -> Array:
  """`_up_conv_subpixel` with the transposed conv's own backward: the input
  gradient is the stride-2 conv of ``dy`` with the same kernel
  (`down_conv_fast`, the form of the encoder's convs), and the kernel
  gradient one dot of the 2³-tap columns of ``x`` with the space-to-depth
  of the padded ``dy``. Autodiff of the sub-pixel form went back through
  the phase interleaving and an im2col (HR generator's last transposed
  conv, forward and backward: 147 ms; PyTorch's 82)."""
  return _up_conv_subpixel(x, kernel)


def _up_conv_own_grad_fwd(x, kernel):
  return _up_conv_subpixel(x, kernel), (x, kernel)


def _up_conv_own_grad_bwd(residuals, dy):
  x, kernel = residuals
  b, d, h, w, cin = x.shape
  cout = kernel.shape[4]
  dy = dy.astype(x.dtype)
  # out[o] = Σ x[i]·w[k] over o = 2i + k - 1, so dx[i] = Σ_k dy[2i + k - 1]·
  # w[k]ᵀ: a stride-2 conv with padding 1.
  dx = down_conv_fast(dy, kernel.swapaxes(3, 4).astype(x.dtype), 1)
  # With P = dy padded by 1 and k = 2a + b: dy[2i + k - 1] = P[2(i + a) + b]
  # = S[i + a, b] for S = space_to_depth(P). So dw[a, b] = Σ_j x[j - a] ⊗
  # S[j, b] over the n + 1 blocks j; x[j - a] = Xp[j + 1 - a] for x padded
  # by 1.
  zero = jnp.zeros((), x.dtype)
  s2d = space_to_depth(lax.pad(dy, zero, [(0, 0, 0)] + [(1, 1, 0)] * 3
                               + [(0, 0, 0)]), 2)  # [B, d+1, h+1, w+1, 8·C_out]
  xp = lax.pad(x, zero, [(0, 0, 0)] + [(1, 1, 0)] * 3 + [(0, 0, 0)])
  cols = jnp.stack([xp[:, 1 - az:2 - az + d, 1 - ay:2 - ay + h,
                       1 - ax:2 - ax + w]
                    for az in range(2) for ay in range(2) for ax in range(2)],
                   axis=4)  # [B, d+1, h+1, w+1, 8 (a), C_in]
  dw = lax.dot_general(cols.reshape(-1, 8 * cin), s2d.reshape(-1, 8 * cout),
                       (((0,), (0,)), ((), ())),
                       preferred_element_type=x.dtype)
  dw = dw.reshape(2, 2, 2, cin, 2, 2, 2, cout)  # (a_zyx, C_in, b_zyx, C_out)
  dw = dw.transpose(0, 4, 1, 5, 2, 6, 3, 7).reshape(kernel.shape)
  return dx.astype(x.dtype), dw.astype(kernel.dtype)


_up_conv_own_grad.defvjp(_up_conv_own_grad_fwd, _up_conv_own_grad_bwd)


def conv3d_taps(x: Array, kernel: Array, padding: int = 0) -> Array:
  """A stride-1 conv as one matmul to the taps, then shift-and-add.

  For convs to few channels (C_out much smaller than C_in: the 7³ output
  conv, the space-to-depth convs of the stride-2 layers).

  ``y = kernel·x`` gives, per voxel, its contribution to every tap;
  ``out[o] = Σ_t y[t, o + t - p]``. Below ``TAPS_VOXEL_MAJOR`` output
  channels ``y`` is kept taps-major (``[k, k, k, C_out, B, D, H, W]``) so
  each shifted term is a contiguous block (the 7³ conv to one channel);
  from there voxel-major (`_taps_voxel_major`). The sum is done one axis
  at a time (3·k shifted adds instead of k³), in float32. The taps are taken apart with ``lax.split``, whose transpose is a
  concatenate: the backward pass is then one im2col of the output gradient
  and two dots (slicing the taps out one by one made XLA's backward ~15×
  slower).

  Args:
    x: ``[B, D, H, W, C_in]``.
    kernel: ``[k, k, k, C_in, C_out]``.
    padding: zero padding per side.

  Returns:
    ``[B, D + 2p - k + 1, ..., C_out]`` in float32.
  """
  k, cin, cout = kernel.shape[0], kernel.shape[3], kernel.shape[4]
  if cout >= TAPS_VOXEL_MAJOR:
    return _taps_voxel_major(x, kernel, padding)
  w = kernel.reshape(k**3, cin, cout).transpose(0, 2, 1)
  w = w.reshape(k**3 * cout, cin)
  y = lax.dot_general(w, x, (((1,), (4,)), ((), ())),
                      preferred_element_type=jnp.float32)
  y = y.reshape((k, k, k, cout) + x.shape[:4])
  # Reduce W with its tap axis 2, then H with tap axis 1, then D with tap
  # axis 0 (the spatial axis index drops as tap axes disappear).
  y = _shift_add(y, padding, ((2, 7), (1, 5), (0, 3)))
  return jnp.moveaxis(y, 0, -1)  # [C_out, B, D', H', W'] -> channels-last


def _taps_voxel_major(x: Array, kernel: Array, padding: int) -> Array:
  """`conv3d_taps` with ``y = x·kernel`` kept voxel-major (``[B, D, H, W,
  k, k, k, C_out]``): no transposed copy of ``x`` for the dot. For the LR
  ResNet's first stride-2 conv (2³ conv 512→64 at 64³) XLA's CPU backend
  spent 1.2 s of a training step on that copy. Kernels of at most
  ``TAPS_OWN_GRAD_TAPS`` taps take `_taps_small`'s backward."""
  if kernel.shape[0] ** 3 <= TAPS_OWN_GRAD_TAPS:
    return _taps_small(x, kernel, padding)
  return _taps_voxel_major_form(x, kernel, padding)


def _taps_voxel_major_form(x: Array, kernel: Array, padding: int) -> Array:
  k, cin, cout = kernel.shape[0], kernel.shape[3], kernel.shape[4]
  w = kernel.reshape(k**3, cin, cout).transpose(1, 0, 2)
  w = w.reshape(cin, k**3 * cout)
  y = lax.dot_general(x, w, (((4,), (0,)), ((), ())),
                      preferred_element_type=jnp.float32)
  y = y.reshape(x.shape[:4] + (k, k, k, cout))
  return _shift_add(y, padding, ((6, 3), (5, 2), (4, 1)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _taps_small(x: Array, kernel: Array, padding: int) -> Array:
  """`_taps_voxel_major_form` with its own backward, for few taps (the 2³
  convs of the stride-2 layers): the output gradient at every tap,
  ``dY[v, t] = dy[v - t + p]``, is built in one concatenation of k³
  shifted copies (autodiff of `_shift_add` builds it one axis at a time,
  through three materialised stages), then ``dx = dY·wᵀ`` and
  ``dw = xᵀ·dY``."""
  return _taps_voxel_major_form(x, kernel, padding)


def _taps_small_fwd(x, kernel, padding):
  return _taps_voxel_major_form(x, kernel, padding), (x, kernel)


def _taps_small_bwd(padding, residuals, dy):
  x, kernel = residuals
  k, cin, cout = kernel.shape[0], kernel.shape[3], kernel.shape[4]
  n_in, n_out = x.shape[1:4], dy.shape[1:4]
  zero = jnp.zeros((), x.dtype)
  dy = dy.astype(x.dtype)
  parts = []
  for t in itertools.product(range(k), repeat=3):
    config = [(0, 0, 0)]
    for a in range(3):  # dY[v] = dy[v - lo]: pad lo = t - p below
      lo = t[a] - padding
      config.append((lo, n_in[a] - n_out[a] - lo, 0))
    parts.append(lax.pad(dy, zero, config + [(0, 0, 0)]))
  d_taps = jnp.stack(parts, axis=4)  # [B, D, H, W, k³, C_out]
  w = kernel.reshape(k**3, cin, cout).astype(x.dtype)
  dx = lax.dot_general(d_taps, w, (((4, 5), (0, 2)), ((), ())),
                       preferred_element_type=x.dtype)
  dw = lax.dot_general(x.reshape(-1, cin), d_taps.reshape(-1, k**3, cout),
                       (((0,), (0,)), ((), ())),
                       preferred_element_type=x.dtype)  # [C_in, k³, C_out]
  dw = dw.transpose(1, 0, 2).reshape(kernel.shape)
  return dx.astype(x.dtype), dw.astype(kernel.dtype)


_taps_small.defvjp(_taps_small_fwd, _taps_small_bwd)


def _shift_add(y: Array, padding: int, axes) -> Array:
  """``out[o] = Σ_t y[t, o + t - p]`` along each (tap axis, spatial axis)
  pair in turn; the tap axis is dropped. Taps taken apart with
  ``lax.split`` (its transpose is a concatenate)."""
  zero = jnp.zeros((), y.dtype)
  for tap_axis, axis in axes:
    k = y.shape[tap_axis]
    n = y.shape[axis]
    n_out = n + 2 * padding - k + 1
    acc = None
    for t, part in enumerate(lax.split(y, [1] * k, axis=tap_axis)):
      part = lax.squeeze(part, (tap_axis,))
      # out[o] += part[o + t - p]: shift by padding - t, crop/pad to n_out.
      config = [(0, 0, 0)] * part.ndim
      ax = axis - (1 if axis > tap_axis else 0)
      config[ax] = (padding - t, t + n_out - n - padding, 0)
      part = lax.pad(part, zero, config)
      acc = part if acc is None else acc + part
    y = acc
  return y


out_conv_fast = conv3d_taps  # the name it had when only the 7³ conv used it


# ---------------------------------------------------------------------------
# Modules.


class _ConvBase(nn.Module):
  """Holds the common fields and creates ``kernel`` and ``bias``."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  impl: str = "fast"
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros

  def _params(self, x: Array, k: int) -> tuple[Array, Array, Array]:
    check_impl(self.impl)
    if x.ndim != 5:
      raise ValueError(
          f"{type(self).__name__}: expected [B, D, H, W, C], got {x.shape}")
    kernel = self.param("kernel", self.kernel_init,
                        (k, k, k, x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,),
                      self.param_dtype)
    return (jnp.asarray(x, self.dtype), jnp.asarray(kernel, self.dtype),
            jnp.asarray(bias, self.dtype))


class Conv3d(_ConvBase):
  """Stride-1 3D conv with zero padding: ``[B, D, H, W, C] -> [B, D', H', W', F]``.

  ``D' = D + 2·padding - kernel_size + 1``. ``impl="fast"``: `conv3d_fast`
  (im2col + dot on CPU, where its forward and backward ran 3-13× faster than
  the convolution's on the HR generator's layers).
  """
  kernel_size: int = 3
  padding: int = 1

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x, kernel, bias = self._params(x, self.kernel_size)
    if self.impl == "plain":
      return conv3d(x, kernel, self.padding) + bias
    return conv3d_fast(x, kernel, self.padding) + bias


class DownConv(_ConvBase):
  """Stride-2 3D conv: ``[B, D, H, W, C] -> [B, (D + 2p - k)//2 + 1, ..., F]``.

  Defaults: kernel 4, padding 1 (halves even sizes). ``impl="fast"`` uses
  `down_conv_fast` (space-to-depth + stride-1 conv): the strided conv's input
  gradient would otherwise be an input-dilated conv, ~20× slower on XLA CPU.
  """
  kernel_size: int = 4
  padding: int = 1

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x, kernel, bias = self._params(x, self.kernel_size)
    if self.impl == "plain":
      y = conv3d(x, kernel, self.padding, stride=2)
    else:
      y = down_conv_fast(x, kernel, self.padding)
    return y + bias


class UpConv(_ConvBase):
  """PyTorch ``ConvTranspose3d(k=4, s=2, p=1)``: ``[B, D, H, W, C] -> [B, 2D, 2H, 2W, F]``.

  ``kernel[kd, kh, kw, c, f]`` is PyTorch's ``weight[c, f, kd, kh, kw]``:
  input voxel ``i`` adds ``x[i, c]·kernel[k, c, f]`` to output ``2i + k - 1``.
  ``impl="plain"``: `up_conv_plain` (input dilation); ``"fast"``:
  `up_conv_fast` (sub-pixel form).
  """

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x, kernel, bias = self._params(x, 4)
    y = up_conv_plain(x, kernel) if self.impl == "plain" else up_conv_fast(
        x, kernel)
    return y + bias


class OutConv(_ConvBase):
  """Stride-1 conv to few channels (the 7³ output conv): ``[B, D, H, W, C] -> [B, D', H', W', F]``.

  ``impl="fast"``: on CPU (`use_dots`) `conv3d_taps` (one matmul to the
  k³ taps, then shift-and-add in float32, cast back to ``dtype``), since XLA
  CPU runs the direct 7³ conv to one channel at ~0.3 GFLOP/s; elsewhere a
  plain conv (the tap tensor is k³ × the output, 45 MB per 32³ patch),
  unless `SKINNY_DOTS` says otherwise, or `conv3d_blocked` with
  `OUT_CONV_BLOCK`.
  """
  features: int = 1
  kernel_size: int = 7
  padding: int = 3

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x, kernel, bias = self._params(x, self.kernel_size)
    if self.impl != "plain" and not skinny_dots() and OUT_CONV_BLOCK:
      return conv3d_blocked(x, kernel, self.padding, OUT_CONV_BLOCK) + bias
    if self.impl == "plain" or not skinny_dots():
      return conv3d(x, kernel, self.padding) + bias
    y = conv3d_taps(x, kernel, self.padding)
    return y.astype(self.dtype) + bias


class _Norm(nn.Module):
  """Normalises over ``reduce_axes`` in float32, then learned scale and shift."""
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  scale_init: Initializer = nn.initializers.ones
  bias_init: Initializer = nn.initializers.zeros

  def _normalise(self, x: Array, reduce_axes: Sequence[int]) -> Array:
    c = x.shape[-1]
    scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
    bias = self.param("bias", self.bias_init, (c,), self.param_dtype)
    x32 = jnp.asarray(x, jnp.float32)
    mean = jnp.mean(x32, axis=reduce_axes, keepdims=True)
    # Biased variance (PyTorch's normalisation), two-pass for accuracy.
    var = jnp.mean(jnp.square(x32 - mean), axis=reduce_axes, keepdims=True)
    y = (x32 - mean) * lax.rsqrt(var + self.epsilon)
    y = y * jnp.asarray(scale, jnp.float32) + jnp.asarray(bias, jnp.float32)
    return y.astype(self.dtype)


class InstanceNorm(_Norm):
  """Instance norm: statistics per sample and channel over D, H, W.

  ``[B, D, H, W, C] -> [B, D, H, W, C]``; computed in float32 whatever the
  input dtype, returned in ``dtype``. Params ``scale``, ``bias``: ``[C]``.
  """

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return self._normalise(x, (1, 2, 3))


class BatchNorm(_Norm):
  """Batch norm with the current batch's statistics only (per channel over B, D, H, W).

  Stateless: no running averages and no ``batch_stats`` collection (the
  discriminators that use it never run at inference). Equals PyTorch's
  ``BatchNorm3d`` in training mode. Computed in float32, returned in
  ``dtype``. Under ``jit`` with a sharded batch the statistics are global.
  """

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return self._normalise(x, (0, 1, 2, 3))


def make_norm(kind: str, name: str, *, dtype: Dtype, scale_init: Initializer,
              param_dtype: Dtype = jnp.float32) -> nn.Module:
  """Returns an `InstanceNorm` (``kind="instance"``) or `BatchNorm` (``"batch"``)."""
  if kind == "instance":
    cls = InstanceNorm
  elif kind == "batch":
    cls = BatchNorm
  else:
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")
  return cls(dtype=dtype, param_dtype=param_dtype, scale_init=scale_init,
             name=name)
