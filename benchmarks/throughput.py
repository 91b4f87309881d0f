r"""Speed of MEGAN in JAX, side by side with PyTorch and MONAI.

    python -m benchmarks.throughput
        [--only hr_forward train_step stitch cascade paired edges]
        [--batches 1 4 8 16 32] [--repeats 3] [--quick]
        [--out benchmarks/results]

Sections (``--only`` picks some):

- ``hr_forward``: the HR generator forward (``models.HRGenerator``, ngf 64,
  6 ResNet blocks, 2 input channels, 32³ patches, ``train=False``) in s/patch
  and patches/s at each of ``--batches``; fp32 and bf16 (Flax
  ``dtype=bfloat16``, parameters fp32); impl ``"fast"`` (ours) and ``"plain"``
  (the straight port, the "before" number; ``--plain-batches``, on the CPU
  batch 1 and fp32 only by default: it takes ~7 s per patch there) and
  ``"fast-im2col"`` (the fast form with every stride-1 conv but the 7³
  output conv as im2col, i.e. without the tap-matmul space-to-depth convs
  and the Winograd 3³ convs: the "before" of those changes;
  ``--im2col-batches``, on the CPU the largest batch). PyTorch
  (``benchmarks.torch_port``, the same weights copied in; eval mode,
  ``no_grad``) in fp32 and under ``torch.autocast(bfloat16)``; its fp32 output
  is checked against ours (``max_abs_diff``, expected < 1e-4). On a GPU (or
  with ``--flops``) also the achieved FLOP/s of our forward (``flops``).
- ``train_step``: one G + D forward, backward and Adam update, s/step. JAX:
  the library's own ``megan_jax.train.make_train_step(config, kind)`` on
  ``configs.get_config("default")`` (``model.d_norm="instance"``,
  ``model.d_output="code"`` as the port, augmentation as configured); HR at ``--train-batches`` patches of 32³, LR
  (the public code's ResNet generator, ``model.lr_generator="resnet"``, 128³
  edges -> 64³, LR discriminator) at ``--lr-train-batches`` (default 1 2;
  --quick 1). Plain for HR at ``--plain-train-batches`` (default 1), for LR
  at batch 1 only with ``--lr-plain``;
  ``fast-im2col`` at batch 1 for ``--im2col-train-kinds`` (CPU: hr lr).
  PyTorch: ``torch_port.make_train_step`` on the same initial weights. The
  JAX step also augments its inputs and computes the D-skip rule; the PyTorch
  step does neither (``meta.notes``).
- ``stitch``: cutting a volume into 32³ patches, an identity network, and
  stitching the 20³ centres back: ours (``tiling.make_plan`` and
  ``tiling.map_patches``: batches of ``--stitch-batch`` patches cut into
  reused buffers and stitched back on host threads, as ``infer.Translator``
  does on the CPU) against MONAI's
  ``sliding_window_inference`` (roi 32³, overlap 12/32 so its step is 20 too,
  ``sw_batch_size`` the same, mode ``"constant"``), on random volumes of
  ``--stitch-sizes``. Ours must give the volume back exactly (``exact``).
  The two alternate, one call each per repeat (``alternated``), so both see
  the same machine state (this memory-bound loop moves with the machine's
  memory speed).
- ``cascade``: a whole translation (edges -> LR -> every HR scale ->
  stitched volume) with ``infer.Translator`` from randomly initialised
  parameters (speed does not depend on the weights), on a smooth synthetic
  volume (Gaussian blobs) of each of ``--cascade-sizes``; per-stage seconds
  from ``Translator.timings``, patches per scale. ``--cascade-widths demo``
  uses the demo config's generator widths (ngf 8, 2 ResNet blocks) on the
  paper's geometry, so a CPU finishes. ``--cascade-skinny-sizes``: sizes
  run a second time with impl ``"fast-skinny"`` (`conv_form`; rows carry
  their ``impl``), as ``--cascade-blocked-sizes`` with ``"fast-blocked"``;
  ``--cascade-sparse-edges-sizes``: sizes run again (impl
  ``"fast"``) with the JAX edge engine sending back only its candidates
  (`edges.JAX_SPARSE_TRANSFER`; rows carry their ``edges`` engine,
  ``"jax"`` or ``"jax-sparse"``).

- ``edges``: ``edges.canny_3d`` (the sketch every scale is conditioned on,
  the cascade's host-side stage) on the cascade's blob volume at each of
  ``--edge-sizes``, its two engines called alternately (``--repeats``
  rounds): ``"numpy"`` (scipy.ndimage on ``edges.EDGE_THREADS`` host
  threads) and ``"jax"`` (jitted slabs on JAX's default device; its compile
  apart, ``compile_s``). ``differ_voxels``: edge voxels where the engines
  disagree (float rounding near ties). Ratio ``edges_jax_over_numpy``.
- ``paired``: JAX and PyTorch called alternately, one call each per round
  (``--paired-rounds``), for the HR forward at ``--paired-batch`` and the HR
  and LR training steps at batch 1; the ratio is the median of the rounds'
  ratios (``ratio_median``), robust to a machine whose speed drifts during
  the run (the other sections run all JAX cases, then all PyTorch ones).
  Its ratios are ``paired_jax_over_torch_*``.

Timing: every case is run once untimed first (its ``compile_s``: for JAX the
lowering, XLA compile and that first call; ``xla_compile_s`` is the compile
alone; for PyTorch, MONAI and numpy the first call), then ``--repeats`` times
with ``time.perf_counter`` around the call and ``block_until_ready`` (or
``torch.cuda.synchronize``); rows give the median (``median_s``) and every
run (``times_s``). The cascade compiles in ``Translator.plan`` (its
``compile_s``) and has no extra warm-up run. PyTorch gets as many threads as
XLA's CPU thread pool (the CPUs this process may run on; ``meta.threads``).

Without torch (or monai) the JAX parts still run; the missing comparisons
are rows with ``"error": "torch not installed"`` and null ratios. A case
that fails is recorded with its error, never dropped.

Writes ``throughput-<backend>.json``::

    {"meta": {...},
     "results": {"hr_forward": [row, ...], "train_step": [...],
                 "stitch": [...], "cascade": [...], "flops": [...]},
     "ratios": {"jax_over_torch_per_patch": ..., ...}}

(a section not run is null; ``flops`` off the GPU is one row saying why;
``ratios`` in `RATIO_KEYS`; a time ratio ``x_over_y`` is x's seconds over
y's, < 1 where x is faster; ``stitch_speedup_vs_monai`` is MONAI's seconds
over ours; null where not measured, the reason in ``meta.ratio_missing``)
and ``throughput-<backend>.md`` (tables for the README). The JSON is
rewritten after every section, so a run killed late keeps what it measured.
``--quick`` shrinks everything for tests (seconds, not hours): ngf/ndf 8,
2 blocks, 2 D layers, 16³ patches (border 3), LR 16³, batches 1 2, stitch
48³, the cascade at 64³ on the demo config (LR 32³, demo widths), 1 repeat.
The GPU defaults add 512³ and 1024³ cascades, run the cascade in bf16
(``--cascade-dtype``; fp32 elsewhere) and the plain impl at every batch and
dtype.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

SECTIONS = ("hr_forward", "train_step", "stitch", "cascade", "paired", "edges")
PAIRED_CASES = ("hr_forward", "train_step_hr", "train_step_lr")
DTYPES = ("fp32", "bf16")
DEFAULT_BATCHES = (1, 4, 8, 16, 32)
DEFAULT_TRAIN_BATCHES = (1, 4)
DEFAULT_STITCH_SIZES = (128, 256)
DEFAULT_CASCADE_SIZES = (128, 256)
DEFAULT_EDGE_SIZES = (128, 256, 512)
GPU_CASCADE_SIZES = (512, 1024)
AGREE_TOL = 1e-4  # torch fp32 vs our fp32 forward, max abs difference
NO_TORCH = "torch not installed"
NO_MONAI = "monai not installed"

RATIO_KEYS = ("jax_over_torch_per_patch", "jax_over_torch_per_patch_bf16",
              "jax_over_torch_train_step_hr", "jax_over_torch_train_step_lr",
              "stitch_speedup_vs_monai", "fast_over_plain_forward",
              "fast_over_plain_train_step_hr",
              "fast_over_plain_train_step_lr", "fast_over_im2col_forward",
              "fast_over_im2col_train_step_hr",
              "fast_over_im2col_train_step_lr",
              "paired_jax_over_torch_per_patch",
              "paired_jax_over_torch_train_step_hr",
              "paired_jax_over_torch_train_step_lr",
              "edges_jax_over_numpy")

# Dense peak FLOP/s by device kind (vendor datasheets), first match wins:
# (substring, bf16 tensor core, fp32 non-tensor core, tf32 tensor core).
# XLA may run fp32 convolutions as TF32 on these GPUs (JAX's default
# precision), so the fp32 fraction can exceed 1; both peaks are recorded.
PEAKS = (
    ("H200", 989e12, 67e12, 494e12),
    ("H100 PCIe", 756e12, 51e12, 378e12),
    ("H100", 989e12, 67e12, 494e12),  # SXM
    ("A100", 312e12, 19.5e12, 156e12),
)

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Network widths and geometry of the measured cases (the paper's)."""
  ngf: int = 64
  n_blocks: int = 6
  ndf: int = 64
  d_layers: int = 3
  patch: int = 32
  border: int = 6  # the kept centre is patch - 2 * border = 20
  lr_size: int = 64  # LR output side; its edges are 2 * lr_size


QUICK = Sizes(ngf=8, n_blocks=2, ndf=8, d_layers=2, patch=16, border=3,
              lr_size=16)
DEMO_WIDTHS = {"ngf": 8, "n_blocks": 2}  # configs/demo.py's generator


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def _err(e: BaseException) -> str:
  return " ".join(f"{type(e).__name__}: {e}".split())[:500]


def _import_optional(name: str):
  """The module ``name``, or None where it is not installed (tests replace
  this to simulate a machine without torch)."""
  try:
    return importlib.import_module(name)
  except ImportError:
    return None


def xla_threads() -> int:
  """The size of XLA's CPU thread pool: the CPUs this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


# ---------------------------------------------------------------------------
# PyTorch and MONAI, when installed
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class Torch:
  """The optional comparison libraries, or why each is missing."""
  torch: Any = None
  port: Any = None  # benchmarks.torch_port
  monai_swi: Any = None  # monai.inferers.sliding_window_inference
  device: str = "cpu"
  threads: int | None = None
  error: str | None = NO_TORCH  # why there are no PyTorch rows
  monai_error: str | None = NO_TORCH

  def sync(self) -> None:
    if self.device != "cpu":
      self.torch.cuda.synchronize()

  def autocast(self, dtype: str):
    if dtype == "fp32":
      return contextlib.nullcontext()
    return self.torch.autocast(self.device.split(":")[0],
                               dtype=self.torch.bfloat16)

  def tensor(self, x: np.ndarray):
    """NDHWC numpy -> NCDHW tensor on the comparison device."""
    return self.port.to_torch(np.asarray(x, np.float32)).to(self.device)


def load_torch(threads: int, backend: str) -> Torch:
  """PyTorch (with ``threads`` threads), the port and MONAI, as installed."""
  torch = _import_optional("torch")
  if torch is None:
    return Torch()
  torch.set_num_threads(threads)
  device = "cuda" if backend == "gpu" and torch.cuda.is_available() else "cpu"
  t = Torch(torch=torch, device=device, threads=threads, error=None,
            monai_error=None)
  try:
    t.port = importlib.import_module("benchmarks.torch_port")
  except Exception as e:  # a broken port must not stop the JAX parts
    t.error = f"benchmarks.torch_port unavailable: {_err(e)}"
  if _import_optional("monai") is None:
    t.monai_error = NO_MONAI
  else:
    try:
      from monai.inferers import sliding_window_inference
      t.monai_swi = sliding_window_inference
    except Exception as e:
      t.monai_error = f"monai unusable: {_err(e)}"
  return t


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------
def time_calls(fn: Callable[[], Any], repeats: int,
               block: Callable[[Any], Any]) -> tuple[float, list[float]]:
  """``fn()`` once untimed, then ``repeats`` timed calls.

  Returns:
    ``(first_call_s, [s, ...])``; each time ends after ``block`` of the
    call's result (``jax.block_until_ready``, a device synchronise).
  """
  t0 = time.perf_counter()
  block(fn())
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    block(fn())
    times.append(time.perf_counter() - t0)
  return first, times


def _timed_row(first_s: float, times: Sequence[float],
               patches: int | None = None,
               xla_compile_s: float | None = None) -> dict:
  """The timing fields of a row; per-patch fields where ``patches`` is
  given."""
  med = statistics.median(times)
  row = {"compile_s": _r(first_s + (xla_compile_s or 0.0)),
         "xla_compile_s": _r(xla_compile_s), "median_s": _r(med),
         "times_s": [_r(t) for t in times]}
  if patches:
    row["s_per_patch"] = _r(med / patches)
    row["patches_per_s"] = _r(patches / med) if med > 0 else None
  return row


def _r(x, digits: int = 6):
  return None if x is None else round(float(x), digits)


def _describe(row: dict) -> str:
  """``"hr_forward jax fast fp32 b=4"``: what a row measured."""
  words = [str(row[k]) for k in ("section", "case", "framework", "kind",
                                 "impl", "dtype") if row.get(k)]
  if "size" in row:
    words.append(f"{row['size']}³")
  if "batch" in row:
    words.append(f"b={row['batch']}")
  return " ".join(words)


def _run_case(row: dict, measure: Callable[[], dict]) -> dict:
  """``row`` updated with ``measure()``'s fields, or with its error."""
  t0 = time.perf_counter()
  try:
    row.update(measure())
    row.setdefault("error", None)
  except Exception as e:  # one case must not stop a run of hours
    row.update(error=_err(e), elapsed_s=_r(time.perf_counter() - t0))
  what = _describe(row)
  if row["error"]:
    _log(f"  {what}: error: {row['error']}")
  else:
    key = next(k for k in ("s_per_patch", "s_per_step", "median_s",
                           "total_s", "ratio_median")
               if row.get(k) is not None)
    if key == "ratio_median":
      per = (f"JAX {row['jax_median']:.4g} vs PyTorch "
             f"{row['torch_median']:.4g} {row['unit']}, ratio {row[key]:.3f}")
    else:
      per = f"{row[key]:.4g} " + ("s" if key in ("median_s", "total_s") else
                                  key.replace("_", " "))
    if row.get("compile_s") is not None:
      per += f" (compile {row['compile_s']:.1f} s" + (
          f", set-up {row['setup_s']:.1f} s, input {row['input_s']:.1f} s"
          if row.get("setup_s") is not None else "") + ")"
    _log(f"  {what}: {per}")
  return row


# ---------------------------------------------------------------------------
# hr_forward (and flops)
# ---------------------------------------------------------------------------
def _jnp_dtype(dtype: str):
  import jax.numpy as jnp
  return {"fp32": jnp.float32, "bf16": jnp.bfloat16}[dtype]


def patch_input(batch: int, patch: int, channels: int, seed: int
                ) -> np.ndarray:
  """A deterministic ``[batch, p, p, p, channels]`` float32 input in [-1, 1]."""
  rng = np.random.default_rng([seed, batch, patch, channels])
  return rng.uniform(-1, 1, (batch, patch, patch, patch, channels)).astype(
      np.float32)


def jit_init(init: Callable, key):
  """``init(key)`` compiled as one function with the non-partitionable
  threefry (as ``state.create_state``: the partitionable one compiles ~10x
  slower here)."""
  import jax
  with jax.threefry_partitionable(False):
    return jax.jit(init)(key)


@contextlib.contextmanager
def conv_form(impl: str):
  """Traces ``impl="fast-im2col"`` as the fast form with the tap-matmul,
  Winograd and narrow-input convs off (`layers.TAPS_RATIO`,
  `layers.WINOGRAD_MIN_TILES` infinite, `layers.NARROW_CHANNELS` -1): every
  stride-1 conv but the 7³ output conv as im2col, the fast form before
  those were added; ``impl="fast-skinny"`` as the fast form with the skinny
  convs (the first, on the sketch; the 7³ output conv) as dots on any
  backend (`layers.SKINNY_DOTS`; on the CPU the same as "fast");
  ``impl="fast-blocked"`` with those two as lax convs over blocks
  (`layers.conv3d_blocked`: the 7³ output conv over 4³ blocks, the first
  over 2³; `layers.OUT_CONV_BLOCK`, `NARROW_CONV_BLOCK`; off the CPU only,
  on it the same as "fast"). (Trace a fresh jitted function inside it: a
  cached trace would ignore it.)"""
  from megan_jax.models import layers
  changes = {"fast-im2col": {"TAPS_RATIO": float("inf"),
                             "WINOGRAD_MIN_TILES": float("inf"),
                             "NARROW_CHANNELS": -1},
             "fast-skinny": {"SKINNY_DOTS": True},
             "fast-blocked": {"OUT_CONV_BLOCK": 4,
                              "NARROW_CONV_BLOCK": 2}}.get(impl, {})
  old = {n: getattr(layers, n) for n in changes}
  for n, v in changes.items():
    setattr(layers, n, v)
  try:
    yield
  finally:
    for n, v in old.items():
      setattr(layers, n, v)


@contextlib.contextmanager
def sparse_transfer(on: bool):
  """`edges.JAX_SPARSE_TRANSFER` set to ``on`` inside, set back after."""
  from megan_jax import edges
  old = edges.JAX_SPARSE_TRANSFER
  edges.JAX_SPARSE_TRANSFER = on
  try:
    yield
  finally:
    edges.JAX_SPARSE_TRANSFER = old


def model_impl(impl: str) -> str:
  return "fast" if impl in FAST_VARIANTS else impl


# Impls traced as "fast" with other forms (`conv_form`).
FAST_VARIANTS = ("fast-im2col", "fast-skinny", "fast-blocked")


def hr_generator(sizes: Sizes, impl: str, dtype: str):
  from megan_jax import models
  return models.HRGenerator(ngf=sizes.ngf, n_blocks=sizes.n_blocks,
                            dropout_rate=0.5, dtype=_jnp_dtype(dtype),
                            impl=impl)


def _cost_flops(analysis) -> float | None:
  """FLOPs from a ``cost_analysis()`` (a dict, or a list of them in older
  JAX)."""
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  return float(analysis["flops"])


def peak_flops(device_kind: str) -> dict | None:
  """The datasheet peaks assumed for ``device_kind``, or None."""
  for name, bf16, fp32, tf32 in PEAKS:
    if name.lower() in device_kind.lower():
      return {"match": name, "bf16": bf16, "fp32": fp32, "tf32": tf32}
  return None


def torch_hr_generator(tc: Torch, sizes: Sizes, host_vars):
  """The PyTorch port of the HR generator with our weights, in eval mode."""
  g = tc.port.ResNetGenerator(in_channels=2, ngf=sizes.ngf,
                              n_blocks=sizes.n_blocks, n_pre_down=0,
                              out_channels=1, dropout_rate=0.5)
  tc.port.load_flax_params(g, host_vars)
  return g.to(tc.device).eval()


def bench_hr_forward(args, sizes: Sizes, tc: Torch, info: dict
                     ) -> tuple[list[dict], list[dict] | None]:
  """Rows of ``hr_forward``, and of ``flops`` (None where not measured)."""
  import jax
  p, seed = sizes.patch, args.seed
  model = hr_generator(sizes, "fast", "fp32")
  x1 = patch_input(1, p, 2, seed)
  variables = jit_init(lambda k: model.init(k, x1, train=False),
                       jax.random.key(seed))
  host_vars = jax.tree.map(np.array, variables)  # writable, for torch
  check_batch = min(args.batches)
  reference = {}  # our fast fp32 output at check_batch, for the checks
  compiled = {}  # (impl, dtype, batch) -> (executable, median s)
  rows = []
  base = {"section": "hr_forward", "patch": p, "ngf": sizes.ngf,
          "n_blocks": sizes.n_blocks}

  cases = [("fast", d, b) for d in args.dtypes for b in args.batches]
  cases += [("plain", d, b) for d in args.plain_dtypes
            for b in args.plain_batches]
  cases += [("fast-im2col", "fp32", b) for b in args.im2col_batches]
  for impl, dtype, batch in cases:
    def measure(impl=impl, dtype=dtype, batch=batch):
      g = hr_generator(sizes, model_impl(impl), dtype)
      fwd = jax.jit(lambda v, x: g.apply(v, x, train=False))
      x = jax.device_put(patch_input(batch, p, 2, seed))
      t0 = time.perf_counter()
      with conv_form(impl):
        exe = fwd.lower(variables, x).compile()
      xla_s = time.perf_counter() - t0
      first, times = time_calls(lambda: exe(variables, x), args.repeats,
                                jax.block_until_ready)
      row = _timed_row(first, times, batch, xla_compile_s=xla_s)
      compiled[(impl, dtype, batch)] = (exe, statistics.median(times))
      if dtype == "fp32" and batch == check_batch:
        out = np.asarray(exe(variables, x), np.float32)
        if impl == "fast":
          reference["out"] = out
          row["output_std"] = _r(out.std())
        elif "out" in reference:
          row["max_abs_diff_vs_fast"] = _r(
              np.abs(out - reference["out"]).max(), 9)
      return row
    rows.append(_run_case(dict(base, framework="jax", impl=impl, dtype=dtype,
                               batch=batch), measure))

  for dtype in args.dtypes:
    for batch in args.batches:
      row = dict(base, framework="torch", impl="torch_port", dtype=dtype,
                 batch=batch, device=tc.device)
      if tc.error:
        rows.append(dict(row, error=tc.error))
        continue

      def measure(dtype=dtype, batch=batch):
        torch = tc.torch
        g = torch_hr_generator(tc, sizes, host_vars)
        x = tc.tensor(patch_input(batch, p, 2, seed))

        def run():
          with torch.no_grad(), tc.autocast(dtype):
            return g(x)
        first, times = time_calls(run, args.repeats, lambda _: tc.sync())
        out = _timed_row(first, times, batch)
        if dtype == "fp32" and batch == check_batch:
          if "out" not in reference:
            out["max_abs_diff"] = None
            out["agrees"] = None
          else:
            y = _ndhwc(tc.port.to_numpy(run().float().cpu()),
                       reference["out"].shape)
            diff = float(np.abs(y - reference["out"]).max())
            out["max_abs_diff"] = _r(diff, 9)
            out["agrees"] = diff < AGREE_TOL
        return out
      rows.append(_run_case(row, measure))

  flops = None
  if info["backend"] == "gpu" or args.flops:
    flops = bench_flops(args, sizes, variables, compiled, info)
  return rows, flops


def _ndhwc(a: np.ndarray, shape) -> np.ndarray:
  """``a`` as ``[B, D, H, W, C]``: ``to_numpy`` may give NCDHW back."""
  a = np.asarray(a, np.float32)
  if a.shape != tuple(shape) and a.ndim == 5:
    a = np.moveaxis(a, 1, -1)
  return a


def hr_forward_flops(ngf: int, n_blocks: int, patch: int,
                     in_channels: int = 2) -> int:
  """Nominal FLOPs (2 per multiply-add) of one HR generator forward on a
  ``patch³`` input: every tap of every kernel, the zero padding included;
  a 4³ stride-2 transposed conv does 2³ taps per output voxel. Biases, norms
  and activations left out. 36.3 GFLOP at the paper's sizes."""
  def conv(taps, c_in, c_out, side):
    return 2 * taps * c_in * c_out * side**3
  g, p = ngf, patch
  total = conv(27, in_channels, g, p)  # conv_in
  total += conv(64, g, 2 * g, p // 2) + conv(64, 2 * g, 4 * g, p // 4)
  total += 2 * n_blocks * conv(27, 4 * g, 4 * g, p // 4)
  total += conv(8, 4 * g, 2 * g, p // 2) + conv(8, 2 * g, g, p)
  total += conv(343, g, 1, p)  # conv_out
  return total


def bench_flops(args, sizes: Sizes, variables, compiled: dict, info: dict
                ) -> list[dict]:
  """Achieved FLOP/s of our fast forward at its fastest batch, per dtype.

  ``flops_per_patch``: the nominal count (`hr_forward_flops`), which
  ``achieved_flops`` and ``fraction_of_peak`` use. XLA's own counts
  (``cost_analysis``) are recorded beside it: ``xla_flops_per_patch`` of the
  compiled program that ran (the fast forms' rearranged convolutions) and
  ``xla_flops_per_patch_plain`` of the lowered straight program (XLA leaves
  the taps that fall on the zero padding out), with ``achieved_xla_flops``
  and ``fraction_of_peak_xla`` from the former. On a GPU XLA's count leaves
  out the convolutions it hands to cuDNN (custom calls): session 15's H200
  run counted 65 MFLOP of the 36.3 GFLOP per patch, so there only the
  nominal count means anything.
  """
  import jax
  peaks = peak_flops(info["device_kind"])
  nominal = hr_forward_flops(sizes.ngf, sizes.n_blocks, sizes.patch)
  rows = []
  for dtype in args.dtypes:
    row = {"section": "flops", "framework": "jax", "impl": "fast",
           "dtype": dtype, "patch": sizes.patch,
           "device_kind": info["device_kind"]}
    done = {b: v for (i, d, b), v in compiled.items()
            if i == "fast" and d == dtype}
    if not done:
      rows.append(dict(row, error="no fast forward measured at this dtype"))
      continue
    batch = min(done, key=lambda b: done[b][1] / b)

    def measure(dtype=dtype, batch=batch):
      exe, med = done[batch]
      x = jax.ShapeDtypeStruct((batch,) + (sizes.patch,) * 3 + (2,),
                               np.float32)
      g = hr_generator(sizes, "plain", dtype)
      plain = _cost_flops(jax.jit(lambda v, x: g.apply(
          v, x, train=False)).lower(variables, x).cost_analysis())
      ran = _cost_flops(exe.cost_analysis())
      s_per_patch = med / batch
      achieved = nominal / s_per_patch
      achieved_xla = None if ran is None else ran / med
      peak = None if peaks is None else peaks[dtype]
      frac = lambda f: None if not peak or f is None else _r(f / peak, 4)
      return {
          "batch": batch, "s_per_patch": _r(s_per_patch),
          "flops_per_patch": nominal,
          "xla_flops_per_patch": None if ran is None else ran / batch,
          "xla_flops_per_patch_plain": (None if plain is None
                                        else plain / batch),
          "achieved_flops": achieved, "achieved_xla_flops": achieved_xla,
          "peak_flops": peak,
          "peak_tf32_flops": (None if peaks is None or dtype != "fp32"
                              else peaks["tf32"]),
          "peak_assumed": (None if peaks is None else
                           f"{peaks['match']} datasheet, dense"),
          "fraction_of_peak": frac(achieved),
          "fraction_of_peak_xla": frac(achieved_xla),
          "error": None}
    rows.append(_run_case(row, measure))
  return rows


# ---------------------------------------------------------------------------
# train_step
# ---------------------------------------------------------------------------
def train_config(sizes: Sizes, kind: str, impl: str, batch: int):
  """The default config at ``sizes``, set up for one training-step case."""
  from megan_jax import configs
  c = configs.get_config("default")
  c.unlock()
  c.model.lr_generator = "resnet"  # the public code's, as torch_port
  c.model.d_norm = "instance"  # both sides
  c.model.d_output = "code"  # the port's (the public code's) D outputs
  c.model.impl = impl
  c.model.dtype = "float32"
  c.model.ngf, c.model.n_blocks = sizes.ngf, sizes.n_blocks
  c.model.ndf, c.model.d_layers = sizes.ndf, sizes.d_layers
  c.patch_size, c.border, c.lr_size = sizes.patch, sizes.border, sizes.lr_size
  c.train.hr_batch_size = batch
  c.train.lr_batch_size = batch
  c.lock()
  return c


def train_batch(config, kind: str, batch: int, seed: int) -> dict:
  """A random batch of numpy arrays (NDHWC): targets and conditioning in
  [-1, 1], sparse binary edges."""
  from megan_jax import state as state_lib
  rng = np.random.default_rng([seed, batch, 7])
  out = {}
  for key, shape in state_lib.input_shapes(config, kind, batch).items():
    if key == "edges":
      out[key] = (rng.random(shape) < 0.1).astype(np.float32)
    else:
      out[key] = rng.uniform(-1, 1, shape).astype(np.float32)
  return out


def torch_gan(port, config, kind: str, g_variables=None, d_variables=None):
  """The PyTorch generator and discriminator of ``config``'s scale ``kind``,
  with Flax variables copied in where given."""
  m = config.model
  g = port.ResNetGenerator(in_channels=2 if kind == "hr" else 1, ngf=m.ngf,
                           n_blocks=m.n_blocks,
                           n_pre_down=0 if kind == "hr" else 1,
                           out_channels=1, dropout_rate=m.dropout)
  # HR: D sees (edges, prev, image); LR: the sketch (1) plus the image (1).
  d = port.PatchDiscriminator(kind=kind, in_channels=3 if kind == "hr" else 2,
                              ndf=m.ndf, n_layers=m.d_layers, norm=m.d_norm)
  if g_variables is not None:
    port.load_flax_params(g, g_variables)
  if d_variables is not None:
    port.load_flax_params(d, d_variables)
  return g, d


class JaxStep:
  """One compiled JAX training step of a benchmark case, ready to call.

  ``impl`` may be ``"fast-im2col"`` (see `conv_form`); the step is a fresh
  jitted function (``make_train_step`` caches one per config, whose trace
  would not see `conv_form`) and donates its state.
  """

  def __init__(self, sizes: Sizes, kind: str, impl: str, batch: int,
               seed: int):
    import jax
    from megan_jax import state as state_lib
    from megan_jax import train
    self.config = train_config(sizes, kind, model_impl(impl), batch)
    self.key = jax.random.key(seed)
    state = state_lib.create_state(self.key, self.config, kind)
    self.host_params = (jax.tree.map(np.array, state.g_params),
                        jax.tree.map(np.array, state.d_params))
    self.counts = {"g_params": state_lib.count_params(state.g_params),
                   "d_params": state_lib.count_params(state.d_params)}
    self.data = jax.device_put(train_batch(self.config, kind, batch, seed))
    step = train._train_step_cached.__wrapped__(self.config.to_json(), kind,
                                                 True)
    t0 = time.perf_counter()
    with conv_form(impl):
      self.exe = step.lower(state, self.data, self.key).compile()
    self.xla_compile_s = time.perf_counter() - t0
    self.state = state

  def __call__(self):
    self.state, metrics = self.exe(self.state, self.data, self.key)
    return self.state, metrics


def torch_step(tc: Torch, sizes: Sizes, kind: str, batch: int, seed: int,
               host_params=None):
  """``(step, g, d)``: a PyTorch training step of the same case on its own
  data (``step()`` runs it), with our initial weights where given."""
  config = train_config(sizes, kind, "fast", batch)
  g, d = torch_gan(tc.port, config, kind, *(host_params or (None, None)))
  g, d = g.to(tc.device).train(), d.to(tc.device).train()
  step = tc.port.make_train_step(g, d, kind=kind,
                                 l1_weight=config.loss.l1_weight)
  data = {k: tc.tensor(v)
          for k, v in train_batch(config, kind, batch, seed).items()}
  return (lambda: step(data)), g, d


def bench_train_step(args, sizes: Sizes, tc: Torch) -> list[dict]:
  import jax
  cases = [("hr", "fast", b) for b in args.train_batches]
  cases += [("hr", "plain", b) for b in args.plain_train_batches]
  if "lr" in args.train_kinds:
    cases += [("lr", "fast", b) for b in args.lr_train_batches]
    cases += [("lr", "plain", 1)] if args.lr_plain else []
  cases += [(k, "fast-im2col", 1) for k in args.im2col_train_kinds]
  cases = [c for c in cases if c[0] in args.train_kinds]
  rows = []
  initial = {}  # kind -> host copy of the first state's params (for torch)
  for kind, impl, batch in cases:
    def measure(kind=kind, impl=impl, batch=batch):
      step = JaxStep(sizes, kind, impl, batch, args.seed)
      initial.setdefault(kind, step.host_params)
      repeats = args.repeats
      if impl == "plain" and args.plain_repeats:
        repeats = args.plain_repeats
      first, times = time_calls(step, repeats, jax.block_until_ready)
      return dict(_timed_row(first, times, xla_compile_s=step.xla_compile_s),
                  s_per_step=_r(statistics.median(times)), **step.counts)
    rows.append(_run_case(
        {"section": "train_step", "framework": "jax", "kind": kind,
         "impl": impl, "dtype": "fp32", "batch": batch,
         "includes": "augmentation, D-skip rule"}, measure))

  torch_cases = [(k, b) for k, batches in (("hr", args.train_batches),
                                           ("lr", args.lr_train_batches))
                 if k in args.train_kinds for b in batches]
  for kind, batch in torch_cases:
    row = {"section": "train_step", "framework": "torch",
           "kind": kind, "impl": "torch_port", "dtype": "fp32",
           "batch": batch, "device": tc.device, "includes": "no augmentation, "
           "no D-skip rule"}
    if tc.error:
      rows.append(dict(row, error=tc.error))
      continue

    def measure(kind=kind, batch=batch):
      step, g, d = torch_step(tc, sizes, kind, batch, args.seed,
                              initial.get(kind))
      first, times = time_calls(step, args.repeats, lambda _: tc.sync())
      return dict(_timed_row(first, times),
                  s_per_step=_r(statistics.median(times)),
                  g_params=int(tc.port.count_params(g)),
                  d_params=int(tc.port.count_params(d)))
    rows.append(_run_case(row, measure))
  return rows


# ---------------------------------------------------------------------------
# paired
# ---------------------------------------------------------------------------
def bench_paired(args, sizes: Sizes, tc: Torch) -> list[dict]:
  """JAX and PyTorch called alternately, one call each per round.

  The other sections time all JAX cases, then all PyTorch ones; on a
  machine whose speed drifts by tens of per cent within minutes (shared
  cloud CPUs do) that biases their ratios. Here every round times one JAX
  call and then one PyTorch call of the same work, and the ratio is the
  median of the per-round ratios (``ratio_median``), so a drift slower than
  a round cancels. Cases: the HR forward at ``--paired-batch`` (our fast
  form and the port, same weights), the HR and the LR training step at
  batch 1 (as ``train_step``).
  """
  import jax
  p, seed = sizes.patch, args.seed
  rows = []
  for case in args.paired_cases:
    row = {"section": "paired", "case": case, "framework": "jax/torch",
           "device": tc.device}
    if tc.error:
      rows.append(dict(row, error=tc.error))
      continue

    def measure(case=case):
      torch = tc.torch
      if case == "hr_forward":
        per = args.paired_batch
        g = hr_generator(sizes, "fast", "fp32")
        x = jax.device_put(patch_input(per, p, 2, seed))
        variables = jit_init(lambda k: g.init(k, x[:1], train=False),
                             jax.random.key(seed))
        exe = jax.jit(lambda v, x: g.apply(v, x, train=False)).lower(
            variables, x).compile()
        tg = torch_hr_generator(tc, sizes, jax.tree.map(np.array, variables))
        xt = tc.tensor(patch_input(per, p, 2, seed))

        def jax_call():
          jax.block_until_ready(exe(variables, x))

        def torch_call():
          with torch.no_grad():
            tg(xt)
          tc.sync()
      else:
        per, kind = 1, case[-2:]
        step = JaxStep(sizes, kind, "fast", 1, seed)
        tstep, _, _ = torch_step(tc, sizes, kind, 1, seed, step.host_params)

        def jax_call():
          jax.block_until_ready(step())

        def torch_call():
          tstep()
          tc.sync()
      timed = time_alternating({"jax": jax_call, "torch": torch_call},
                               args.paired_rounds)
      for got in timed.values():
        if isinstance(got, Exception):
          raise got
      tj, tt = timed["jax"][1], timed["torch"][1]
      return {"batch": per, "unit": "s/patch" if case == "hr_forward"
              else "s/step", "rounds": args.paired_rounds,
              "jax_times_s": [_r(t) for t in tj],
              "torch_times_s": [_r(t) for t in tt],
              "jax_median": _r(statistics.median(tj) / per),
              "torch_median": _r(statistics.median(tt) / per),
              "ratio_median": _r(statistics.median(
                  a / b for a, b in zip(tj, tt)), 4),
              "ratio_min": _r(min(a / b for a, b in zip(tj, tt)), 4),
              "ratio_max": _r(max(a / b for a, b in zip(tj, tt)), 4)}
    rows.append(_run_case(row, measure))
  return rows


# ---------------------------------------------------------------------------
# stitch
# ---------------------------------------------------------------------------
def tile_round_trip(volume: np.ndarray, patch: int, border: int,
                    batch: int, network=lambda x: x,
                    threads: int | None = None) -> np.ndarray:
  """Ours: `tiling.map_patches` (plan, cut ``batch`` patches at a time into
  reused staging buffers, ``network``, stitch the centres into a new
  volume; batches spread over ``threads`` workers, default
  `tiling.HOST_THREADS`)."""
  from megan_jax import tiling
  plan = tiling.make_plan(volume.shape, patch, border)
  return tiling.map_patches(network, volume, plan, batch_size=batch,
                            threads=threads)


def monai_windows(size: int, patch: int, step: int) -> int:
  """Windows MONAI's ``dense_patch_slices`` lays on a side-``size`` cube."""
  n = math.ceil(size / step)
  return len({min(i * step, size - patch) for i in range(n)}) ** 3


def time_alternating(calls: dict[str, Callable[[], Any]], repeats: int
                     ) -> dict[str, tuple[float, list[float]] | Exception]:
  """Each call once untimed, then ``repeats`` rounds of one timed call each
  in turn. Returns per name ``(first_call_s, [s, ...])``, or the exception
  its first call raised (that one then sits out the rounds)."""
  got: dict[str, Any] = {}
  for name, fn in calls.items():
    t0 = time.perf_counter()
    try:
      fn()
      got[name] = (time.perf_counter() - t0, [])
    except Exception as e:  # reported in the row, the others go on
      got[name] = e
  for _ in range(repeats):
    for name, fn in calls.items():
      if isinstance(got[name], tuple):
        t0 = time.perf_counter()
        fn()
        got[name][1].append(time.perf_counter() - t0)
  return got


def bench_stitch(args, sizes: Sizes, tc: Torch) -> list[dict]:
  from megan_jax import tiling
  p, b = sizes.patch, sizes.border
  rows = []
  for size in args.stitch_sizes:
    vol = np.random.default_rng([args.seed, size]).standard_normal(
        (size,) * 3, np.float32)
    plan = tiling.make_plan(vol.shape, p, b)
    base = {"section": "stitch", "size": size, "patch": p, "border": b,
            "sw_batch": args.stitch_batch}
    calls = {"ours": lambda vol=vol: tile_round_trip(
        vol, p, b, args.stitch_batch, threads=tc.threads)}
    monai_row = dict(base, framework="monai", impl="sliding_window_inference",
                     overlap=2 * b / p)
    if tc.monai_error or tc.monai_swi is None:
      monai_row["error"] = tc.monai_error or NO_MONAI
    else:
      torch = tc.torch
      x = torch.from_numpy(vol)[None, None]

      def run_monai(x=x):
        with torch.no_grad():
          return tc.monai_swi(x, roi_size=(p,) * 3,
                              sw_batch_size=args.stitch_batch,
                              predictor=lambda t: t, overlap=2 * b / p,
                              mode="constant")
      calls["monai"] = run_monai
    timed = time_alternating(calls, args.repeats)

    def measure(name, result, patches):
      got = timed[name]
      if isinstance(got, Exception):
        raise got
      out = result()
      return dict(_timed_row(*got), patches=patches,
                  alternated=len(calls) > 1,
                  exact=bool(np.array_equal(out, vol)),
                  max_abs_diff=_r(np.abs(out - vol).max(), 9))

    rows.append(_run_case(
        dict(base, framework="ours", impl="numpy"),
        lambda: measure("ours", calls["ours"], plan.num_patches)))
    if "monai" in calls:
      rows.append(_run_case(monai_row, lambda: measure(
          "monai", lambda: calls["monai"]()[0, 0].numpy(),
          monai_windows(size, p, p - 2 * b))))
    else:
      rows.append(monai_row)
  return rows


# ---------------------------------------------------------------------------
# cascade
# ---------------------------------------------------------------------------
def blobs(size: int, seed: int, count: int = 6) -> np.ndarray:
  """A smooth ``size³`` float32 volume in [-1, 1]: Gaussian blobs on a -1
  background (edges where they fall off). Built from separable outer
  products, slab by slab through one reused buffer: a 1024³ volume needs one
  volume of memory (a whole-volume temporary per blob took 29 s at 1024³
  on 2 cores, 17 s now), and the same float32 products and sums in the
  same order as before, so the same volume to the bit."""
  rng = np.random.default_rng([seed, size])
  ax = np.arange(size, dtype=np.float32)
  factors = []
  for _ in range(count):
    centre = rng.uniform(0.25, 0.75, 3) * size
    sigma = rng.uniform(0.08, 0.2) * size
    g = [np.exp(-0.5 * ((ax - c) / sigma) ** 2).astype(np.float32)
         for c in centre]
    g[0] *= np.float32(rng.uniform(0.4, 1.0))  # the blob's height
    factors.append((np.multiply.outer(g[0], g[1]), g[2]))  # (g0 g1) g2
  vol = np.empty((size,) * 3, np.float32)
  slab = max(1, min(size, 2**20 // max(1, size * size)))  # planes, ~4 MiB
  tmp = np.empty((slab, size, size), np.float32)
  for lo in range(0, size, slab):  # a slab's blobs added while in cache
    out, t = vol[lo:lo + slab], tmp[:min(slab, size - lo)]
    out.fill(0.0)
    for g01, g2 in factors:  # in the blobs' order: the same sums
      np.multiply(g01[lo:lo + len(t), :, None], g2, out=t)
      out += t
  np.clip(vol, 0.0, 1.0, out=vol)
  vol *= 2.0
  vol -= 1.0
  return vol


def cascade_config(args, size: int):
  """The cascade's config at output side ``size``: the default (``--quick``:
  the demo's geometry), with the chosen widths and the HR scales it needs."""
  from benchmarks.memory import num_hr_scales_for
  from megan_jax import configs
  c = configs.get_config("demo" if args.quick else "default")
  c.unlock()
  if args.cascade_widths == "demo":
    c.model.ngf, c.model.n_blocks = DEMO_WIDTHS["ngf"], DEMO_WIDTHS["n_blocks"]
  c.num_hr_scales = num_hr_scales_for(size, c.lr_size)
  if isinstance(args.cascade_batch, int):
    c.infer.batch_size = args.cascade_batch
  c.lock()
  return c


# Random generator parameters by what they depend on (see random_generators).
_GENERATORS: dict = {}


def random_generators(config, seed: int) -> dict:
  """Random generator parameters for every scale of ``config``.

  Kept per scale name, kind, widths and the generator input's shape (its
  channels follow ``config.hr_condition``; every impl creates the same
  parameters), so the cascade's cases reuse them: a 512³ case
  after the 1024³ one, and each variant of a size, skip the initialisers'
  compiles (set-up time that counted against the GPU step's limit)."""
  import json
  import jax
  import jax.numpy as jnp
  from megan_jax import state as state_lib
  params = {}
  for i, name in enumerate(state_lib.scale_names(config)):
    kind = "lr" if name == "lr" else "hr"
    dummy = {k: jnp.zeros(s, jnp.float32)
             for k, s in state_lib.input_shapes(config, kind).items()}
    x = state_lib.generator_input(dummy, config, kind)  # its channels too
    key = (name, kind, seed, json.dumps(config.model.to_dict(),
                                        sort_keys=True, default=str),
           x.shape, str(x.dtype))
    if key not in _GENERATORS:
      g = state_lib.build_generator(config, kind)
      rng = jax.random.fold_in(jax.random.key(seed), i)
      _GENERATORS[key] = jit_init(lambda k, g=g, x=x: g.init(
          {"params": k, "dropout": k}, x, train=False), rng)
    params[name] = _GENERATORS[key]
  return params


def bench_cascade(args, on_row: Callable[[list], None] = lambda rows: None
                  ) -> list[dict]:
  """One row per ``--cascade-sizes``; ``on_row(rows)`` after each (the
  caller saves, so a run cut short keeps the sizes it finished)."""
  from megan_jax import infer
  rows = []
  repeats = args.cascade_repeats or args.repeats
  from megan_jax import edges as edges_lib
  cases = [(size, impl, sparse) for size in args.cascade_sizes
           for impl, sparse in [("fast", False)]
           + ([("fast-skinny", False)]
              if size in args.cascade_skinny_sizes else [])
           + ([("fast-blocked", False)]
              if size in args.cascade_blocked_sizes else [])
           + ([("fast", True)]
              if size in args.cascade_sparse_edges_sizes else [])]
  for size, impl, sparse in cases:
    def measure(size=size, impl=impl, sparse=sparse):
      # Traced (in plan, or later) with its forms.
      with conv_form(impl), sparse_transfer(sparse):
        return measure_cascade(size)

    def measure_cascade(size):
      t_setup = time.perf_counter()
      c = cascade_config(args, size)
      t = infer.Translator(c, random_generators(c, args.seed),
                           batch_size=("auto" if args.cascade_batch == "auto"
                                       else None),
                           dtype={"fp32": "float32",
                                  "bf16": "bfloat16"}[args.cascade_dtype])
      t0 = time.perf_counter()
      # Weights (random, or reused from an earlier case) and the batch
      # pick (compiles at two batch sizes and the pick's, for "auto").
      setup_s = t0 - t_setup
      reports = t.plan((size,) * 3)  # compiles every scale, reused below
      compile_s = time.perf_counter() - t0
      t0 = time.perf_counter()
      vol = blobs(size, args.seed)
      input_s = time.perf_counter() - t0
      walls, stages = [], []
      for _ in range(repeats):
        t0 = time.perf_counter()
        out = t.translate_normalised(vol, progress=sys.stderr.isatty())
        walls.append(time.perf_counter() - t0)
        stages.append(dict(t.timings))
        if out.shape != vol.shape:
          raise RuntimeError(f"output {out.shape} != input {vol.shape}")
        if args.cascade_budget_s and sum(walls) >= args.cascade_budget_s:
          break  # times_s says how many ran
      del out
      names = list(stages[0])
      per_stage = {n: _r(statistics.median(s[n] for s in stages))
                   for n in names}
      patches = {r.scale: r.num_patches for r in reports}
      return {"num_hr_scales": c.num_hr_scales, "lr_size": c.lr_size,
              "patch": c.patch_size, "border": c.border,
              "ngf": c.model.ngf, "n_blocks": c.model.n_blocks,
              "lr_generator": c.model.lr_generator, "batch": t.batch_size,
              "batch_source": t.batch_info["source"],
              "devices": int(t.mesh.devices.size),
              "patches": patches,
              "scale_shapes": {r.scale: list(r.shape) for r in reports},
              "device_bytes": {r.scale: r.device_bytes for r in reports},
              "stages_s": per_stage,
              "hr_patches_per_s": {
                  n: _r(patches[n] / per_stage[n]) for n in names
                  if n.startswith("hr") and per_stage[n]},
              "total_s": _r(statistics.median(walls)),
              "times_s": [_r(w) for w in walls],
              "compile_s": _r(compile_s),
              # Time a case takes beyond its runs and compiles (a GPU
              # step's limit counts it too).
              "setup_s": _r(setup_s), "input_s": _r(input_s)}
    rows.append(_run_case({"section": "cascade", "framework": "jax",
                           "size": size, "widths": args.cascade_widths,
                           "dtype": args.cascade_dtype, "impl": impl,
                           "edges": ("jax-sparse" if sparse
                                     and edges_lib.ENGINE == "jax"
                                     else edges_lib.ENGINE)},
                          measure))
    on_row(rows)
  return rows


# ---------------------------------------------------------------------------
# edges
# ---------------------------------------------------------------------------
def bench_edges(args, on_row: Callable[[list], None] = lambda rows: None
                ) -> list[dict]:
  """Rows per ``--edge-sizes`` and engine; ``on_row(rows)`` after each
  size (as `bench_cascade`)."""
  from megan_jax import edges
  rows = []
  for size in args.edge_sizes:
    vol = blobs(size, args.seed)
    base = {"section": "edges", "size": size, "sigma": 1.0}
    t0 = time.perf_counter()
    try:
      edges.compile_canny(vol.shape, sigma=1.0)
    except Exception:  # the jax engine's first call raises it again: its row
      pass
    compile_s = time.perf_counter() - t0
    outs = {}

    def call(engine, vol=vol):
      outs[engine] = edges.canny_3d(vol, sigma=1.0, engine=engine)

    calls = {e: (lambda e=e: call(e)) for e in ("numpy", "jax")}
    timed = time_alternating(calls, args.repeats)

    def measure(engine):
      got = timed[engine]
      if isinstance(got, Exception):
        raise got
      row = dict(_timed_row(*got), alternated=True,
                 edge_voxels=int((outs[engine] > 0).sum()))
      if engine == "jax":
        row["compile_s"] = _r(compile_s)
        row["device"] = str(_first_device())
        if "numpy" in outs:
          row["differ_voxels"] = int(((outs["jax"] > 0)
                                      != (outs["numpy"] > 0)).sum())
      else:
        row["threads"] = edges.EDGE_THREADS
      return row

    for engine in ("numpy", "jax"):
      rows.append(_run_case(dict(base, impl=engine),
                            lambda engine=engine: measure(engine)))
    on_row(rows)
  return rows


def _first_device():
  import jax
  return jax.local_devices()[0]


# ---------------------------------------------------------------------------
# Ratios and output
# ---------------------------------------------------------------------------
def _ok(rows, **match):
  return [r for r in rows or [] if r.get("error") is None
          and all(r.get(k) == v for k, v in match.items())]


def _im2col_batch(rows):
  """The first batch the ``fast-im2col`` forward ran at: both sides of
  ``fast_over_im2col_forward`` are taken there (the im2col side was the
  best of all its batches, against ``fast`` at this one)."""
  got = _ok(rows, framework="jax", impl="fast-im2col")
  return got[0]["batch"] if got else None


def merge_cascade(rows: list[dict], old_rows: list[dict]) -> list[dict]:
  """The cascade rows of a ``--merge``: this run's, then the earlier
  file's not run again. A case that ran before without error and failed
  now (out of memory, a time limit) keeps its earlier row, this run's
  error noted on it (``rerun_error``): a failed rerun never loses a
  measured case."""
  good = {cascade_key(r): r for r in old_rows if r.get("error") is None}
  out = [dict(good[cascade_key(r)], rerun_error=r["error"])
         if r.get("error") is not None and cascade_key(r) in good else r
         for r in rows]
  ran = {cascade_key(r) for r in rows}
  return out + [r for r in old_rows if cascade_key(r) not in ran]


def compute_ratios(results: dict) -> tuple[dict, dict]:
  """``(ratios, why_missing)``: every key of `RATIO_KEYS`, None where a side
  was not measured (its reason in ``why_missing``)."""
  ratios, missing = {}, {}
  fwd, step = results.get("hr_forward"), results.get("train_step")

  def reason(rows, section, **match):
    if rows is None:
      return f"section {section} not run"
    bad = [r for r in rows if all(r.get(k) == v for k, v in match.items())
           and r.get("error")]
    what = " ".join(f"{k}={v}" for k, v in match.items())
    return f"{section} {what}: " + (bad[0]["error"] if bad else "not measured")

  def best(rows, section, key, **match):
    got = [r[key] for r in _ok(rows, **match) if r.get(key) is not None]
    return (min(got), None) if got else (None, reason(rows, section, **match))

  def ratio(name, num, den):
    (a, why_a), (b, why_b) = num, den
    if a is None or b is None or not b:
      ratios[name] = None
      missing[name] = why_a or why_b or "zero time"
    else:
      ratios[name] = _r(a / b, 4)

  for dtype, name in (("fp32", "jax_over_torch_per_patch"),
                      ("bf16", "jax_over_torch_per_patch_bf16")):
    ratio(name, best(fwd, "hr_forward", "s_per_patch", framework="jax",
                     impl="fast", dtype=dtype),
          best(fwd, "hr_forward", "s_per_patch", framework="torch",
               dtype=dtype))
  for kind in ("hr", "lr"):
    ratio(f"jax_over_torch_train_step_{kind}",
          best(step, "train_step", "s_per_step", framework="jax",
               impl="fast", kind=kind, batch=1),
          best(step, "train_step", "s_per_step", framework="torch",
               kind=kind, batch=1))
  stitch = results.get("stitch")
  done = _ok(stitch, framework="ours")
  if done:
    size = max(r["size"] for r in done)
    ratio("stitch_speedup_vs_monai",
          best(stitch, "stitch", "median_s", framework="monai", size=size),
          best(stitch, "stitch", "median_s", framework="ours", size=size))
  else:
    ratio("stitch_speedup_vs_monai",
          best(stitch, "stitch", "median_s", framework="ours"), (None, None))
  ratio("fast_over_im2col_forward",
        best(fwd, "hr_forward", "s_per_patch", framework="jax", impl="fast",
             dtype="fp32", batch=_im2col_batch(fwd)),
        best(fwd, "hr_forward", "s_per_patch", framework="jax",
             impl="fast-im2col", dtype="fp32", batch=_im2col_batch(fwd)))
  def fast_over(before, name):  # JAX training steps, batch 1
    for kind in ("hr", "lr"):
      ratio(f"{name}_{kind}", *(
          best(step, "train_step", "s_per_step", framework="jax", impl=impl,
               kind=kind, batch=1) for impl in ("fast", before)))
  fast_over("fast-im2col", "fast_over_im2col_train_step")
  edge_rows = _ok(results.get("edges"), impl="jax")
  size = max((r["size"] for r in edge_rows), default=None)
  ratio("edges_jax_over_numpy",
        best(results.get("edges"), "edges", "median_s", impl="jax",
             **({"size": size} if size else {})),
        best(results.get("edges"), "edges", "median_s", impl="numpy",
             **({"size": size} if size else {})))
  paired = results.get("paired")
  for case, name in (("hr_forward", "paired_jax_over_torch_per_patch"),
                     ("train_step_hr", "paired_jax_over_torch_train_step_hr"),
                     ("train_step_lr", "paired_jax_over_torch_train_step_lr")):
    got = _ok(paired, case=case)
    ratios[name] = got[0]["ratio_median"] if got else None
    if not got:
      missing[name] = reason(paired, "paired", case=case)
  ratio("fast_over_plain_forward",
        best(fwd, "hr_forward", "s_per_patch", framework="jax", impl="fast",
             dtype="fp32", batch=1),
        best(fwd, "hr_forward", "s_per_patch", framework="jax", impl="plain",
             dtype="fp32", batch=1))
  fast_over("plain", "fast_over_plain_train_step")
  return ratios, missing


def _fmt(x, spec=".3g"):
  return "–" if x is None else format(x, spec)


def markdown(data: dict) -> str:
  """The results as markdown tables (for the README)."""
  meta, res, ratios = data["meta"], data["results"], data["ratios"]
  parts = [f"Throughput on {meta['backend']} ({meta['device_kind']}; "
           f"{meta['threads']} threads; jax {meta['jax_version']}, torch "
           f"{meta.get('torch_version') or '–'}, monai "
           f"{meta.get('monai_version') or '–'}; `{meta['command']}`). "
           f"Median of {meta['repeats']} timed run(s) after an untimed "
           "one; compile times apart."]
  merged = {k: c for k, c in (meta.get("sections") or {}).items()
            if c != meta["command"]}
  if merged:
    dates = meta.get("section_dates") or {}
    parts += ["", "Sections kept from earlier runs: " + "; ".join(
        f"{k}" + (f" ({dates[k][:10]})" if dates.get(k) else "") + f": `{c}`"
        for k, c in merged.items()) + "."]
  fwd = [r for r in res.get("hr_forward") or [] if not r.get("error")]
  if fwd:
    parts += ["", f"**HR generator forward** ({fwd[0]['patch']}³ patches, "
              f"ngf {fwd[0]['ngf']}, {fwd[0]['n_blocks']} blocks):", "",
              "| framework | impl | dtype | batch | s/patch | patches/s | "
              "compile s |", "|---|---|---|---|---|---|---|"]
    parts += [f"| {r['framework']} | {r['impl']} | {r['dtype']} | "
              f"{r['batch']} | {_fmt(r['s_per_patch'])} | "
              f"{_fmt(r['patches_per_s'])} | {_fmt(r['compile_s'])} |"
              for r in fwd]
  step = [r for r in res.get("train_step") or [] if not r.get("error")]
  if step:
    parts += ["", "**Training step** (G and D forward, backward, Adam; the "
              "JAX step also augments and applies the D-skip rule):", "",
              "| kind | framework | impl | batch | s/step | compile s |",
              "|---|---|---|---|---|---|"]
    parts += [f"| {r['kind']} | {r['framework']} | {r['impl']} | "
              f"{r['batch']} | {_fmt(r['s_per_step'])} | "
              f"{_fmt(r['compile_s'])} |" for r in step]
  pairs = [r for r in res.get("paired") or [] if not r.get("error")]
  if pairs:
    parts += ["", "**Paired** (one JAX call, then one PyTorch call, per "
              "round; the ratio is the median of the rounds' ratios):", "",
              "| case | batch | unit | JAX | PyTorch | JAX / PyTorch "
              "(min–max) | rounds |", "|---|---|---|---|---|---|---|"]
    parts += [f"| {r['case']} | {r['batch']} | {r['unit']} | "
              f"{_fmt(r['jax_median'])} | {_fmt(r['torch_median'])} | "
              f"{_fmt(r['ratio_median'], '.3f')} ({_fmt(r['ratio_min'], '.2f')}"
              f"–{_fmt(r['ratio_max'], '.2f')}) | {r['rounds']} |"
              for r in pairs]
  stitch = [r for r in res.get("stitch") or [] if not r.get("error")]
  if stitch:
    how = ("identity network; ours and MONAI called alternately"
           if any(r.get("alternated") for r in stitch) else "identity network")
    parts += ["", f"**Tiling and stitching** ({how}):", "",
              "| volume | framework | patches | s | exact |",
              "|---|---|---|---|---|"]
    parts += [f"| {r['size']}³ | {r['framework']} | {r['patches']} | "
              f"{_fmt(r['median_s'])} | {r['exact']} |" for r in stitch]
  casc = [r for r in res.get("cascade") or [] if not r.get("error")]
  if casc:
    names = []  # edges_lr is part of edges: the stages sum to the total
    for r in casc:
      names += [n for n in r["stages_s"]
                if n not in names and n != "edges_lr"]
    impls = any(r.get("impl", "fast") != "fast" for r in casc)
    engines = any(r.get("edges", "jax") != "jax" for r in casc)
    parts += ["", "**Whole cascade** (seconds per stage):", "",
              "| output | widths | dtype | " + ("impl | " if impls else "")
              + ("edges engine | " if engines else "")
              + "patches | " + " | ".join(names)
              + " | total | runs | compile |",
              "|---|---|---|---|" + "---|" * (len(names) + impls + engines)
              + "---|---|---|"]
    for r in casc:
      pats = ", ".join(f"{k} {v}" for k, v in r["patches"].items()
                       if k != "lr")
      parts.append(
          f"| {r['size']}³ | {r['widths']} | {r.get('dtype', 'fp32')} | "
          + (f"{r.get('impl', 'fast')} | " if impls else "")
          + (f"{r.get('edges', 'jax')} | " if engines else "") +
          f"{pats or '–'} | "
          + " | ".join(_fmt(r["stages_s"].get(n)) for n in names)
          + f" | {_fmt(r['total_s'])} | {len(r.get('times_s') or [])} | "
          f"{_fmt(r['compile_s'])} |")
    kept = [r for r in casc if r.get("kept_from")]
    if kept:
      parts += ["", "Cascade rows kept from earlier runs (`--merge`): "
                + "; ".join(
                    f"{r['size']}³ {r.get('impl', 'fast')} "
                    f"{r.get('edges', 'jax')}"
                    + (f" ({r['kept_from']['date'][:10]})"
                       if r["kept_from"].get("date") else "")
                    + f": `{r['kept_from']['command']}`"
                    + (f" (its rerun failed: {r['rerun_error']})"
                       if r.get("rerun_error") else "") for r in kept)
                + "."]
  edge_rows = [r for r in res.get("edges") or [] if not r.get("error")]
  if edge_rows:
    parts += ["", "**Edge sketch** (`edges.canny_3d`, its engines called "
              "alternately):", "",
              "| volume | engine | s | compile | edge voxels | differ |",
              "|---|---|---|---|---|---|"]
    parts += [f"| {r['size']}³ | {r['impl']} | {_fmt(r['median_s'])} | "
              f"{_fmt(r['compile_s']) if r['impl'] == 'jax' else '–'} | "
              f"{r['edge_voxels']} | {r.get('differ_voxels', '–')} |"
              for r in edge_rows]
  flops = [r for r in res.get("flops") or [] if not r.get("error")]
  if flops:
    parts += ["", "**Achieved FLOP/s** (HR forward, fast):", "",
              "| dtype | batch | TFLOP/s | peak assumed | fraction "
              "| fraction of TF32 peak |",
              "|---|---|---|---|---|---|"]
    # fp32 convolutions may run as TF32 on the tensor cores (JAX's default
    # precision on these GPUs): then the TF32 peak is the one to hold to.
    tf32 = lambda r: (r["achieved_flops"] / r["peak_tf32_flops"]
                      if r.get("peak_tf32_flops") else None)
    parts += [f"| {r['dtype']} | {r['batch']} | "
              f"{_fmt(r['achieved_flops'] / 1e12)} | "
              f"{_fmt(r['peak_flops'] and r['peak_flops'] / 1e12)} "
              f"({r['peak_assumed'] or 'unknown device'}) | "
              f"{_fmt(r['fraction_of_peak'])} | {_fmt(tf32(r))} |"
              for r in flops]
  parts += ["", "**Ratios** (times: < 1 where the first is faster):", ""]
  parts += [f"- {k}: {_fmt(v, '.3f')}"
            + (f" ({meta['ratio_missing'][k]})" if v is None else "")
            for k, v in ratios.items()]
  failed = [r for rows in res.values() for r in rows or [] if r.get("error")]
  if failed:
    parts += ["", "Not measured:", ""]
    parts += [f"- {_describe(r)}: {r['error']}" for r in failed]
  return "\n".join(parts) + "\n"


def write_results(out: str, meta: dict, results: dict) -> dict:
  """Writes ``throughput-<backend>.json`` and ``.md``; returns the data."""
  ratios, missing = compute_ratios(results)
  meta = dict(meta, ratio_missing=missing)
  data = {"meta": meta, "results": {k: results.get(k) for k in
                                    SECTIONS + ("flops",)},
          "ratios": ratios}
  os.makedirs(out, exist_ok=True)
  stem = os.path.join(out, f"throughput-{meta['backend']}")
  from megan_jax import io
  io.write_text(stem + ".json", json.dumps(data, indent=1) + "\n")
  io.write_text(stem + ".md", markdown(data))
  return data


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def make_meta(args, argv, tc: Torch, threads: int) -> dict:
  import jax
  import jaxlib
  dev = jax.devices()[0]
  psutil = _import_optional("psutil")
  monai = _import_optional("monai") if tc.torch is not None else None
  return {
      "jax_version": jax.__version__,
      "jaxlib_version": jaxlib.__version__,
      "backend": jax.default_backend(),
      "device_kind": dev.device_kind,
      "device_count": jax.device_count(),
      "torch_version": getattr(tc.torch, "__version__", None),
      "monai_version": getattr(monai, "__version__", None),
      "torch_device": tc.device if tc.torch is not None else None,
      "threads": threads,
      "xla_threads": xla_threads(),
      "torch_threads": tc.threads,
      "cpu": _cpu_name(),
      "cpu_count": os.cpu_count(),
      "cpu_physical_cores": psutil.cpu_count(logical=False) if psutil else None,
      "memory_bytes": psutil.virtual_memory().total if psutil else None,
      "load_average_at_start": (list(os.getloadavg())
                                if hasattr(os, "getloadavg") else None),
      "xla_flags": os.environ.get("XLA_FLAGS"),
      "python": platform.python_version(),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "command": "python -m benchmarks.throughput " + " ".join(argv),
      "quick": args.quick,
      "repeats": args.repeats,
      "options": {k: v for k, v in vars(args).items()},
      "sizes": dataclasses.asdict(QUICK if args.quick else Sizes()),
      "notes": {
          "timing": "median of the timed runs (times_s); each case first "
                    "runs once untimed. compile_s: JAX lowering + XLA "
                    "compile + that first call (xla_compile_s: the compile "
                    "alone); PyTorch, MONAI and ours-numpy: the first call.",
          "threads": "torch.set_num_threads = XLA's CPU thread pool size "
                     "(the CPUs this process may run on)",
          "fp32_agreement": "hr_forward torch fp32 vs our fast fp32 at the "
                            "smallest batch, the same weights and input; "
                            "on GPUs both sides may run fp32 convolutions "
                            "as TF32 by default, so the difference there "
                            "can exceed the CPU's tolerance",
          "train_step": "JAX: megan_jax.train.make_train_step (includes the "
                        "conditioning augmentation and the D-skip rule, both "
                        "computed every step); PyTorch: "
                        "benchmarks.torch_port.make_train_step (neither). "
                        "Both model.d_norm='instance', the public code's "
                        "D outputs (model.d_output='code'), Adam, fp32.",
          "stitch": "ours: tiling.map_patches (make_plan, batches of "
                    "sw_batch patches cut into reused buffers and stitched "
                    "back on host threads, as in inference); MONAI: "
                    "sliding_window_inference on a CPU tensor. Identity "
                    "network on both sides; one call of each in turn per "
                    "repeat.",
          "cascade": "Translator.plan compiles every scale first "
                     "(compile_s); no warm-up run; stages from "
                     "Translator.timings: edges = the pyramid and the "
                     "sketches' time on the critical path (the finer "
                     "scales' sketches are made on a second thread while "
                     "the coarser scales run, infer.overlap_edges, and "
                     "only the wait for them counts); edges_lr (in the "
                     "JSON, not a column) = its part before the LR scale: "
                     "the pyramid and the LR input's sketch. Rows of "
                     "session 15 and before: every sketch came first, "
                     "all in edges.",
          "edges": "canny_3d's engines called alternately on the same "
                   "volume; the jax engine's kernel compiled first "
                   "(edges.compile_canny, compile_s).",
          "ratios": "x_over_y = x seconds / y seconds (< 1: x faster), "
                    "per patch at each side's best batch for the forward, "
                    "batch 1 for the training steps and fast/plain; "
                    "stitch_speedup_vs_monai = MONAI s / ours s at the "
                    "largest stitch size.",
      },
  }


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------
def _cascade_batch(text: str):
  """``--cascade-batch``: a positive int or ``auto``."""
  if text == "auto":
    return text
  try:
    return int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"{text!r}: a number of patches or 'auto'") from None


def parse_args(argv, backend: str | None = None):
  """Parses ``argv``; defaults that depend on ``--quick`` or the backend are
  filled in (``backend`` None: found from JAX when needed)."""
  p = argparse.ArgumentParser(
      prog="python -m benchmarks.throughput",
      description="Speed of MEGAN in JAX against PyTorch and MONAI.")
  p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                 help="sections to run (default: all)")
  p.add_argument("--quick", action="store_true",
                 help="tiny sizes for tests: ngf 8, 2 blocks, 16³ patches, "
                 "batches 1 2, stitch 48³, cascade 64³ (demo), 1 repeat")
  p.add_argument("--repeats", type=int, default=None,
                 help="timed runs per case (default 3; --quick 1)")
  p.add_argument("--batches", type=int, nargs="+", default=None,
                 help="hr_forward batches (default 1 4 8 16 32)")
  p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
  p.add_argument("--plain-batches", type=int, nargs="*", default=None,
                 help="hr_forward batches of the plain impl; none: no plain "
                 "(default: 1 on the CPU, --batches elsewhere)")
  p.add_argument("--plain-dtypes", nargs="*", choices=DTYPES, default=None,
                 help="dtypes of the plain impl (default: fp32 on the CPU, "
                 "--dtypes elsewhere)")
  p.add_argument("--im2col-batches", type=int, nargs="*", default=None,
                 help="hr_forward batches of impl 'fast-im2col' (the fast "
                 "form with every stride-1 conv as im2col, the form before "
                 "the tap matmuls; default: 32 on the CPU, none elsewhere)")
  p.add_argument("--im2col-train-kinds", nargs="*", choices=("hr", "lr"),
                 default=None, help="training steps (batch 1) also run as "
                 "'fast-im2col' (default: hr lr on the CPU, none elsewhere)")
  p.add_argument("--flops", action="store_true",
                 help="also measure achieved FLOP/s off the GPU")
  p.add_argument("--train-batches", type=int, nargs="+", default=None,
                 help="HR training-step batches (default 1 4; --quick 1)")
  p.add_argument("--plain-train-batches", type=int, nargs="*", default=[1],
                 help="HR batches of the plain training step (none: no plain)")
  p.add_argument("--train-kinds", nargs="+", choices=("hr", "lr"),
                 default=["hr", "lr"])
  p.add_argument("--lr-train-batches", type=int, nargs="+", default=None,
                 help="LR training-step batches (default 1 2; --quick 1)")
  p.add_argument("--plain-repeats", type=int, default=None,
                 help="timed runs of the plain training steps (default: "
                 "--repeats; the plain LR step takes minutes on a CPU)")
  p.add_argument("--lr-plain", action="store_true",
                 help="also the plain LR training step at batch 1 (very "
                 "slow on CPU)")
  p.add_argument("--paired-cases", nargs="+", choices=PAIRED_CASES,
                 default=list(PAIRED_CASES),
                 help="cases of the paired section (JAX and PyTorch "
                 "alternately)")
  p.add_argument("--paired-batch", type=int, default=None,
                 help="HR forward batch of the paired section (default 8; "
                 "--quick 2)")
  p.add_argument("--paired-rounds", type=int, default=None,
                 help="rounds of one JAX and one PyTorch call (default 5; "
                 "--quick 1)")
  p.add_argument("--stitch-sizes", type=int, nargs="+", default=None,
                 help="stitch volume sides (default 128 256; --quick 48)")
  p.add_argument("--stitch-batch", type=int, default=32,
                 help="patches per batch, ours and MONAI's sw_batch_size")
  p.add_argument("--cascade-sizes", type=int, nargs="+", default=None,
                 help="cascade output sides (default 128 256, plus 512 1024 "
                 "on a GPU; --quick 64)")
  p.add_argument("--cascade-widths", choices=("paper", "demo"), default=None,
                 help="paper: ngf 64, 6 blocks; demo: ngf 8, 2 blocks "
                 "(default paper; --quick demo)")
  p.add_argument("--cascade-batch", type=_cascade_batch, default=None,
                 help="patches per cascade batch, or 'auto' (the largest "
                 "that fits the device's memory, as `megan translate "
                 "--batch-size auto`; default: auto on a GPU, the "
                 "config's, 8, elsewhere)")
  p.add_argument("--cascade-repeats", type=int, default=None,
                 help="timed cascade runs (default: --repeats)")
  p.add_argument("--cascade-budget-s", type=float, default=None,
                 help="no further timed cascade run of a size once its runs "
                 "took this long (at least one runs; for the 1024³ cascade "
                 "under a time limit)")
  p.add_argument("--cascade-skinny-sizes", type=int, nargs="*", default=[],
                 help="cascade sizes also run with impl fast-skinny (the "
                 "skinny convs as dots on any backend; see conv_form)")
  p.add_argument("--cascade-blocked-sizes", type=int, nargs="*", default=[],
                 help="cascade sizes also run with impl fast-blocked (the "
                 "skinny convs as convs over blocks off the CPU; see "
                 "conv_form)")
  p.add_argument("--cascade-sparse-edges-sizes", type=int, nargs="*",
                 default=[],
                 help="cascade sizes also run with the JAX edge engine "
                 "sending back only its candidates "
                 "(edges.JAX_SPARSE_TRANSFER)")
  p.add_argument("--cascade-dtype", choices=DTYPES, default=None,
                 help="cascade compute dtype (default: bf16 on a GPU, as "
                 "the 512³ goal, fp32 elsewhere)")
  p.add_argument("--edge-sizes", type=int, nargs="+", default=None,
                 help="edges section volume sides (default 128 256 512; "
                 "--quick 48)")
  p.add_argument("--torch-threads", type=int, default=None,
                 help="PyTorch threads (default: XLA's thread count)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=os.path.join(_ROOT, "benchmarks", "results"))
  p.add_argument("--merge", action="store_true",
                 help="keep the sections not run now from the existing "
                 "results file (each section records the command that "
                 "measured it), and the cascade rows not run again (by "
                 "size, widths, dtype, impl, edges engine; kept_from); "
                 "another device's file is refused")
  a = p.parse_args(argv)

  q = a.quick
  # `is None`, not `or`: a 0 given is refused below, not read as the default.
  if a.repeats is None:
    a.repeats = 1 if q else 3
  if a.paired_batch is None:
    a.paired_batch = 2 if q else 8
  if a.paired_rounds is None:
    a.paired_rounds = 1 if q else 5
  a.batches = a.batches or ([1, 2] if q else list(DEFAULT_BATCHES))
  a.train_batches = a.train_batches or ([1] if q else
                                        list(DEFAULT_TRAIN_BATCHES))
  a.lr_train_batches = a.lr_train_batches or ([1] if q else [1, 2])
  a.stitch_sizes = a.stitch_sizes or ([48] if q else
                                      list(DEFAULT_STITCH_SIZES))
  a.cascade_widths = a.cascade_widths or ("demo" if q else "paper")
  a.edge_sizes = a.edge_sizes or ([48] if q else list(DEFAULT_EDGE_SIZES))
  needs_backend = (a.plain_batches is None or a.plain_dtypes is None
                   or a.cascade_sizes is None or a.im2col_batches is None
                   or a.im2col_train_kinds is None or a.cascade_dtype is None
                   or a.cascade_batch is None)
  if needs_backend and backend is None:
    import jax
    backend = jax.default_backend()
  gpu = backend == "gpu"
  if a.plain_batches is None:
    a.plain_batches = list(a.batches) if gpu else [1]
  if a.plain_dtypes is None:
    a.plain_dtypes = list(a.dtypes) if gpu else ["fp32"]
  if a.im2col_batches is None:
    a.im2col_batches = [] if gpu or q else [max(a.batches)]
  if a.im2col_train_kinds is None:
    a.im2col_train_kinds = [] if gpu or q else ["hr", "lr"]
  a.im2col_train_kinds = [k for k in a.im2col_train_kinds
                          if k in a.train_kinds]
  if a.cascade_dtype is None:
    a.cascade_dtype = "bf16" if gpu else "fp32"
  if a.cascade_batch is None and gpu:  # batch 8 would leave a GPU idle
    a.cascade_batch = "auto"
  if a.cascade_sizes is None:
    a.cascade_sizes = [64] if q else (
        list(DEFAULT_CASCADE_SIZES) + (list(GPU_CASCADE_SIZES) if gpu else []))
  counts = {"--repeats": [a.repeats], "--batches": a.batches,
            "--plain-batches": a.plain_batches,
            "--im2col-batches": a.im2col_batches,
            "--train-batches": a.train_batches,
            "--plain-train-batches": a.plain_train_batches,
            "--lr-train-batches": a.lr_train_batches,
            "--plain-repeats": [1 if a.plain_repeats is None
                                else a.plain_repeats],
            "--paired-batch": [a.paired_batch],
            "--paired-rounds": [a.paired_rounds],
            "--stitch-sizes": a.stitch_sizes, "--stitch-batch":
            [a.stitch_batch], "--cascade-sizes": a.cascade_sizes,
            "--cascade-batch": [a.cascade_batch
                                if isinstance(a.cascade_batch, int) else 1],
            "--cascade-repeats": [1 if a.cascade_repeats is None
                                  else a.cascade_repeats],
            "--edge-sizes": a.edge_sizes,
            "--torch-threads": [1 if a.torch_threads is None
                                else a.torch_threads]}
  for flag, values in counts.items():
    if any(v < 1 for v in values):
      p.error(f"{flag} {values}: must be >= 1")
  if any(v < 2 for v in a.edge_sizes):
    p.error(f"--edge-sizes {a.edge_sizes}: must be >= 2")
  if a.seed < 0:
    p.error(f"--seed {a.seed}: must be >= 0")
  if a.cascade_budget_s is not None and not a.cascade_budget_s > 0:
    p.error(f"--cascade-budget-s {a.cascade_budget_s:g}: must be > 0")
  for flag, sizes in (("--cascade-skinny-sizes", a.cascade_skinny_sizes),
                      ("--cascade-blocked-sizes", a.cascade_blocked_sizes),
                      ("--cascade-sparse-edges-sizes",
                       a.cascade_sparse_edges_sizes)):
    if "cascade" in a.only and set(sizes) - set(a.cascade_sizes):
      p.error(f"{flag} {sorted(set(sizes) - set(a.cascade_sizes))}: not in "
              f"--cascade-sizes {a.cascade_sizes} (they add runs of those "
              "sizes)")
  return a


def cascade_key(row: dict) -> tuple:
  """What a cascade row measured: a later run's row of the same key
  replaces it under ``--merge``; the others are kept (``kept_from``)."""
  return (row.get("size"), row.get("widths"), row.get("dtype", "fp32"),
          row.get("impl", "fast"), row.get("edges", "jax"))


def load_for_merge(path: str, device_kind: str | None = None
                   ) -> dict | None:
  """An earlier results file (``{"meta": {...}, "results": {...}}``) for
  ``--merge``: None where there is none. Raises ValueError, a message naming
  the file, where it is not such a file, or (given ``device_kind``) another
  kind of device measured it: times of two devices under one meta would
  read as one's, and dropping them would overwrite another card's committed
  results (the file is left as it is)."""
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      old = json.load(f)
    if not (isinstance(old, dict) and isinstance(old.get("meta"), dict)
            and isinstance(old.get("results"), dict)):
      raise ValueError("no meta and results objects")
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: not a results file ({' '.join(str(e).split())}"
                     "); move it away or drop --merge") from None
  if device_kind is not None and old["meta"].get("device_kind") != device_kind:
    raise ValueError(f"{path} was measured on {old['meta'].get('device_kind')}"
                     f", not {device_kind}; use another --out (or drop "
                     "--merge)")
  return old


def main(argv: Sequence[str] | None = None) -> int:
  argv = [str(x) for x in (sys.argv[1:] if argv is None else argv)]
  # JAX must not take 75 % of a GPU before PyTorch gets any.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  import jax
  backend = jax.default_backend()
  args = parse_args(argv, backend)
  from megan_jax import io as megan_io
  from megan_jax.errors import InputError
  try:  # an unusable --out: now, not after the first section's minutes
    megan_io.make_folder(args.out, "--out")
  except InputError as e:
    print(f"throughput: {e}", file=sys.stderr)
    return 2
  start = time.perf_counter()
  threads = args.torch_threads or xla_threads()
  tc = load_torch(threads, backend)
  meta = make_meta(args, argv, tc, threads)
  info = {"backend": backend, "device_kind": meta["device_kind"]}
  sizes = QUICK if args.quick else Sizes()
  _log(f"throughput: {backend} ({meta['device_kind']}), {threads} threads, "
       f"torch: {tc.error or tc.device}, monai: {tc.monai_error or 'yes'}")

  results: dict[str, list | None] = {k: None for k in SECTIONS + ("flops",)}
  if "hr_forward" not in args.only:
    flops_why = "needs the hr_forward section"
  elif backend != "gpu" and not args.flops:
    flops_why = f"GPU only (backend {backend}; --flops forces it)"
  else:
    flops_why = None
  if flops_why:
    results["flops"] = [{"section": "flops", "error": flops_why}]

  # Which command measured each section, and when (differs for merged
  # sections).
  meta["sections"] = {k: meta["command"] for k in args.only}
  meta["section_dates"] = {}
  old_cascade: list[dict] = []
  if args.merge:
    path = os.path.join(args.out, f"throughput-{backend}.json")
    try:
      old = load_for_merge(path, meta["device_kind"])
    except ValueError as e:
      print(f"throughput: --merge: {e}", file=sys.stderr)
      return 2
    if old is not None:
      old_cmds = old["meta"].get("sections") or {
          k: old["meta"]["command"] for k in SECTIONS + ("flops",)}
      if "cascade" in args.only:  # its rows are kept until run again
        since = {"command": old_cmds.get("cascade", old["meta"]["command"]),
                 "date": (old["meta"].get("section_dates") or {}).get(
                     "cascade")}
        old_cascade = [dict(r, kept_from=r.get("kept_from") or since)
                       for r in old["results"].get("cascade") or []]
      for k in SECTIONS + ("flops",):
        if k in args.only or (k == "flops" and "hr_forward" in args.only):
          continue
        if old["results"].get(k):
          results[k] = old["results"][k]
          meta["sections"][k] = old_cmds.get(k, old["meta"]["command"])
          date = (old["meta"].get("section_dates") or {}).get(k)
          if date:
            meta["section_dates"][k] = date

  def save():
    meta["total_s"] = _r(time.perf_counter() - start, 1)
    return write_results(args.out, meta, results)

  def keep(section):  # saves a section's rows as they come
    def on_row(rows):
      results[section] = (merge_cascade(rows, old_cascade)
                          if section == "cascade" else list(rows))
      save()
    return on_row

  for section in SECTIONS:
    if section not in args.only:
      continue
    _log(f"{section}:")
    meta["section_dates"][section] = datetime.datetime.now(
        datetime.timezone.utc).isoformat(timespec="seconds")
    if section == "hr_forward":
      results["hr_forward"], flops = bench_hr_forward(args, sizes, tc, info)
      if flops is not None:
        results["flops"] = flops
    elif section == "train_step":
      results["train_step"] = bench_train_step(args, sizes, tc)
    elif section == "stitch":
      results["stitch"] = bench_stitch(args, sizes, tc)
    elif section == "paired":
      results["paired"] = bench_paired(args, sizes, tc)
    elif section == "edges":
      results["edges"] = bench_edges(args, keep("edges"))
    else:
      keep("cascade")(bench_cascade(args, keep("cascade")))
    data = save()
  data = save()
  print(markdown(data), end="")
  stem = os.path.join(args.out, f"throughput-{backend}")
  _log(f"wrote {stem}.json and .md in {meta['total_s']:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
