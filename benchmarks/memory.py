r"""Device memory of one GAN training step against the volume side (Fig. 4).

    python -m benchmarks.memory [--sizes 32 64 128 256] [--measure compiled]
        [--models ...] [--out benchmarks/results]

Models (all batch 1, float32 unless an option says otherwise):

- ``megan_lr_step``: MEGAN's LR training step (64³ from 128³ edges at the
  paper's sizes). Independent of the volume: constant by construction.
- ``megan_hr_step``: the training step of one HR scale on a batch of
  ``--hr-batch`` patches of 32³ (default 1, the paper's lower bound; the
  public code trains on 20 per step, ``config.train.hr_batch_size``). The
  same program at every scale and size; recorded at every size (also below
  128³, where the cascade has no HR scale).
- ``megan_cascade``: inference of the whole cascade producing a side-N
  volume: the largest compiled generator of its scales, from
  ``megan_jax.infer.Translator.plan`` (exactly what ``megan translate
  --plan`` reports), with ``--cascade-batch`` patches per batch (default 1).
  A side N needs the fewest HR scales n with ``ceil(N / 2^n) <= lr_size``
  (n = 0 for N <= 64: MEGAN's smallest output is the LR 64³ step, the volume
  padded into it; 1024³ takes 4 HR scales). The translator gets zero-valued
  parameters of the right shapes (values do not change memory).
- ``dcgan``, ``pix2pix``, ``pggan``: 3D baselines (``benchmarks.baselines``;
  channel counts in their module docstrings), one training step each.

Measures:

- ``compiled``: ``jax.jit(step).lower(*abstract).compile()`` and XLA's
  memory analysis, arguments + outputs + temporaries - aliased (the training
  state is donated, as in training). The arguments are
  ``jax.ShapeDtypeStruct``\ s: nothing is allocated, the number is
  deterministic and covers sizes no machine here could run.
- ``peak``: the step run once on random inputs in a fresh process; on a GPU
  the device's ``peak_bytes_in_use``; on the CPU (no device memory stats) the
  process's peak resident memory (``ru_maxrss``, which also holds the Python
  and JAX runtime and the compiler: ``meta.cpu_idle_rss_bytes`` is that of a
  process that only compiled and ran a trivial function). On the CPU a case
  whose compiled estimate exceeds ``--cpu-peak-limit-gib`` is skipped.

Convolutions use ``impl="plain"`` (``lax`` convolutions) by default. The
library's ``"fast"`` forms are written for XLA's CPU backend with im2col,
which multiplies activation memory by k³ on the CPU only (the LR step
compiles to 9.6 GiB instead of 2.2 GiB), so they would measure the CPU
rewrite instead of the networks; on GPUs they use plain stride-1
convolutions. ``--impl fast`` measures them anyway.

On a GPU, XLA autotunes while compiling: it runs candidate kernels of
each convolution on buffers of its full size, taken from the allocator whose
peak is measured. ``--no-autotune`` turns that off in each case's process
(``Options.autotune``): the large baselines' compiles should then be
quicker, and a measured peak holds only the step; such rows say ``"autotune": false``
(marked † in the tables). A GPU peak row also records
``compile_peak_bytes``, the high-water mark after compiling, before the
step ran: the peak is the step's own where it is larger.

Every case runs in its own subprocess with a timeout (``--timeout-s``): a
case that fails, crashes or times out is recorded with ``"bytes": null`` and
the reason in ``"error"``, never dropped. Writes ``memory-<backend>.json``
(schema in `write_json`), ``memory-<backend>.png`` (log-log, one line per
model, 12 and 80 GiB marks) and ``memory-<backend>.md`` (the table, with each
baseline's ratio to the cascade at 256³ and 512³), each atomically.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import glob
import json
import math
import os
import resource
import subprocess
import sys
import threading
import time
from typing import Sequence

MODELS = ("megan_cascade", "megan_lr_step", "megan_hr_step", "dcgan",
          "pix2pix", "pggan")
BASELINES = ("dcgan", "pix2pix", "pggan")
MEASURES = ("compiled", "peak")
DEFAULT_SIZES = (32, 64, 128, 256)
# Per-case limits (--timeout-s): a peak case compiles and runs.
TIMEOUT_S = {"compiled": 180.0, "peak": 900.0}
GPU_MARKS_GB = (12, 80)  # cards are sold in GB (1e9 bytes); drawn in GiB
RATIO_SIZES = (256, 512)
GIB = 2**30

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RESULT = "MEMORY-BENCHMARK-RESULT "  # marks the child's answer on stdout


@dataclasses.dataclass(frozen=True)
class Options:
  """How the cases are built (shared by the parent and every child).

  Attributes:
    config: the MEGAN config (``megan_jax.configs.get_config`` name).
    width_scale: multiplies every channel count (MEGAN's ngf/ndf and the
      baselines'); 1 is the papers' widths.
    impl: ``"plain"`` or ``"fast"`` convolutions (module docstring).
    hr_batch: patches per HR training step.
    cascade_batch: patches per inference batch of the cascade.
    cpu_peak_limit_gib: on a backend without memory stats, ``peak`` cases
      whose compiled estimate is larger are skipped.
    fast_compile: compile the training steps with XLA's backend (LLVM)
      optimisation level 0: about twice as fast to compile, the same buffer
      assignment and so the same bytes (checked on MEGAN's HR step, Pix2Pix
      and PGGAN); the code it generates is slower, so not for ``peak``.
    autotune: XLA's GPU autotuning (on: XLA's default). Off
      (``--no-autotune``) each case's process runs with
      ``--xla_gpu_autotune_level=0``: convolutions take cuDNN's default
      algorithm instead of the fastest of candidates run on full-size
      buffers during the compile. On a GPU that should let the large
      baselines compile in time (their 256³ cases, autotuned, did not
      compile and run in 45 s on an H100; not yet measured off) and keeps the candidates' buffers, allocated by the same
      allocator, out of a measured peak; the algorithms' workspaces may
      differ. No effect on a CPU. Rows measured so carry ``"autotune":
      false``.
  """
  config: str = "default"
  width_scale: float = 1.0
  impl: str = "plain"
  hr_batch: int = 1
  cascade_batch: int = 1
  cpu_peak_limit_gib: float = 4.0
  fast_compile: bool = False
  autotune: bool = True


NO_AUTOTUNE_FLAG = "--xla_gpu_autotune_level=0"
UNTUNED_MARK = "†"  # in the tables: a case measured with autotuning off


def _compile(lowered, options: Options):
  if options.fast_compile:
    return lowered.compile(
        compiler_options={"xla_backend_optimization_level": 0})
  return lowered.compile()


# ---------------------------------------------------------------------------
# Building the cases
# ---------------------------------------------------------------------------
def num_hr_scales_for(size: int, lr_size: int) -> int:
  """The fewest HR scales n with ``ceil(size / 2^n) <= lr_size``."""
  n = 0
  while -(-size // 2**n) > lr_size:
    n += 1
  return n


def megan_config(options: Options, size: int):
  """The MEGAN config of ``options`` set up for side-``size`` outputs (its
  number of HR scales, widths, impl and batch sizes)."""
  from megan_jax import configs
  c = configs.get_config(options.config)
  c.unlock()
  c.model.impl = options.impl
  c.model.ngf = max(1, int(round(c.model.ngf * options.width_scale)))
  c.model.ndf = max(1, int(round(c.model.ndf * options.width_scale)))
  c.num_hr_scales = num_hr_scales_for(size, c.lr_size)
  c.train.hr_batch_size = options.hr_batch
  c.infer.batch_size = options.cascade_batch
  c.lock()
  return c


def _abstract_key():
  import jax
  return jax.eval_shape(lambda: jax.random.key(0))


def step_program(model: str, size: int, options: Options):
  """``(jitted_step, abstract_args)`` of a training-step model."""
  import jax
  import jax.numpy as jnp
  if model in BASELINES:
    from benchmarks import baselines
    b = baselines.build(model, size, width_scale=options.width_scale,
                        impl=options.impl)
    return baselines.make_train_step(b), (
        baselines.abstract_state(b), baselines.abstract_batch(b),
        _abstract_key())
  if model in ("megan_lr_step", "megan_hr_step"):
    from megan_jax import state as state_lib
    from megan_jax import train
    kind = "lr" if model == "megan_lr_step" else "hr"
    c = megan_config(options, size)
    bs = c.train.lr_batch_size if kind == "lr" else c.train.hr_batch_size
    batch = {k: jax.ShapeDtypeStruct(s, jnp.float32)
             for k, s in state_lib.input_shapes(c, kind, bs).items()}
    return train.make_train_step(c, kind), (
        state_lib.abstract_state(c, kind), batch, _abstract_key())
  raise ValueError(f"model {model!r}: not a training step")


def cascade_translator(options: Options, size: int):
  """A single-device ``Translator`` for side-``size`` outputs, with zero
  parameters of the right shapes."""
  import jax
  import numpy as np
  from megan_jax import infer
  from megan_jax import state as state_lib
  c = megan_config(options, size)
  # On the host (numpy): device zeros, freed once the Translator has its
  # host copies, would still raise a GPU's peak (a high-water mark) by
  # every scale's weights, ~100 MiB more per HR scale at the paper's widths.
  zeros = lambda tree: jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                                    tree)
  params = {"lr": zeros(state_lib.abstract_state(c, "lr").g_params)}
  if c.num_hr_scales:
    hr = state_lib.abstract_state(c, "hr").g_params
    # One array per scale, as trained weights would be (a measured peak
    # holds every scale's parameters).
    params.update({f"hr{k}": zeros(hr)
                   for k in range(1, c.num_hr_scales + 1)})
  # One device: the numbers are per device anyway, and a test session's
  # several host devices would round the batch up.
  return infer.Translator(c, params, devices=jax.devices()[:1],
                          batch_size=options.cascade_batch)


# ---------------------------------------------------------------------------
# Measuring one case (in the current process)
# ---------------------------------------------------------------------------
def measure_compiled(model: str, size: int, options: Options) -> dict:
  """Compiled bytes of one case: ``{"bytes", "compile_s", "error"}``.

  For ``megan_cascade`` the largest scale's; ``"scales"`` lists every
  scale's ``[name, bytes]``.
  """
  from megan_jax.infer import compiled_bytes
  if model == "megan_cascade":
    t = cascade_translator(options, size)
    t0 = time.perf_counter()
    reports = t.plan((size,) * 3)
    seconds = time.perf_counter() - t0
    per_scale = [[r.scale, r.device_bytes] for r in reports]
    known = [b for _, b in per_scale if b is not None]
    return {"bytes": max(known) if known else None, "compile_s": seconds,
            "error": None if known else "no memory analysis on this backend",
            "scales": per_scale}
  fn, args = step_program(model, size, options)
  t0 = time.perf_counter()
  compiled = _compile(fn.lower(*args), options)
  seconds = time.perf_counter() - t0
  nbytes = compiled_bytes(compiled)
  return {"bytes": nbytes, "compile_s": seconds,
          "error": None if nbytes is not None else
          "no memory analysis on this backend"}


def _materialise(tree, seed: int = 0):
  """Real arrays for ShapeDtypeStructs: small random floats (from numpy, so
  no device temporaries raise the peak), zeros otherwise."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  rng = np.random.default_rng(seed)

  def make(s):
    if jnp.issubdtype(s.dtype, jax.dtypes.prng_key):
      return jax.random.key(seed)
    if jnp.issubdtype(s.dtype, jnp.floating):
      x = rng.standard_normal(s.shape, np.float32) * np.float32(0.02)
      return jax.device_put(x.astype(s.dtype))
    return jax.device_put(np.zeros(s.shape, s.dtype))
  return jax.tree.map(make, tree)


def _device_peak():
  import jax
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # the CPU client may not implement it
    stats = {}
  return stats.get("peak_bytes_in_use")


def _max_rss_bytes() -> int:
  # Linux reports kilobytes, macOS bytes.
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(rss if sys.platform == "darwin" else rss * 1024)


def measure_peak(model: str, size: int, options: Options) -> dict:
  """Measured peak memory of one case run once (run it in a fresh process).

  Returns ``{"bytes", "compile_s", "error"}``: the device's
  ``peak_bytes_in_use``, or where the device has no memory stats the
  process's peak RSS (``error`` says when the case was skipped instead);
  with device stats also ``compile_peak_bytes``, the device's high-water
  mark once compiled, before the step's arrays went onto it.
  """
  import jax
  import numpy as np
  from megan_jax.infer import compiled_bytes
  has_stats = _device_peak() is not None
  limit = options.cpu_peak_limit_gib * GIB
  t0 = time.perf_counter()
  if model == "megan_cascade":
    t = cascade_translator(options, size)
    reports = t.plan((size,) * 3)
    estimate = max((r.device_bytes or 0) for r in reports)
  else:
    fn, args = step_program(model, size, options)
    compiled = fn.lower(*args).compile()
    estimate = compiled_bytes(compiled) or 0
  seconds = time.perf_counter() - t0
  # The high-water mark before anything of the step is on the device: what
  # compiling took (autotuning runs candidate kernels on buffers from the
  # same allocator). The final peak is only the step's where it is larger.
  compile_peak = _device_peak()
  if not has_stats and estimate > limit:
    return {"bytes": None, "compile_s": seconds,
            "error": (f"skipped: too large for CPU run (compiled "
                      f"{estimate / GIB:.1f} GiB > "
                      f"{options.cpu_peak_limit_gib:g} GiB)")}
  if model == "megan_cascade":
    # The per-scale executables ``plan`` compiled, each run on one batch of
    # its fixed shape (device memory does not depend on the volume).
    c = t.config
    n, p, b = 2 * c.lr_size, c.patch_size, t.batch_size
    lr_in = np.zeros((1, n, n, n, 1), np.float32)
    # Each scale's weights go onto the device as the cascade puts them
    # there (`Translator.scale_params`: one scale's at a time).
    jax.block_until_ready(t._compiled["lr"](t.scale_params("lr"), lr_in))
    for k in range(1, c.num_hr_scales + 1):
      x = np.zeros((b, p, p, p, 1), np.float32)
      jax.block_until_ready(
          t._compiled[f"hr{k}"](t.scale_params(f"hr{k}"), x, x))
  else:
    jax.block_until_ready(compiled(*_materialise(args)))
  peak = _device_peak()
  if peak is None:
    return {"bytes": _max_rss_bytes(), "compile_s": seconds, "error": None}
  return {"bytes": int(peak), "compile_s": seconds, "error": None,
          "compile_peak_bytes": int(compile_peak)}


def probe() -> dict:
  """The backend's description, and the peak RSS of a process that only
  compiled and ran a trivial function."""
  import jax
  import jax.numpy as jnp
  import jaxlib
  jax.block_until_ready(jax.jit(lambda x: x * 2)(jnp.ones(4)))
  dev = jax.devices()[0]
  return {"jax_version": jax.__version__,
          "jaxlib_version": jaxlib.__version__,
          "backend": jax.default_backend(),
          "device_kind": dev.device_kind,
          "device_count": jax.device_count(),
          "has_memory_stats": _device_peak() is not None,
          "idle_rss_bytes": _max_rss_bytes()}


def run_case(case: dict) -> dict:
  """Measures one case in this process; never raises (errors are recorded)."""
  options = Options(**case["options"])
  t0 = time.perf_counter()
  try:
    if case["model"] == "probe":
      return probe()
    fn = measure_compiled if case["measure"] == "compiled" else measure_peak
    return fn(case["model"], case["size"], options)
  except Exception as e:  # recorded, not raised: one case must not stop a run
    msg = " ".join(f"{type(e).__name__}: {e}".split())
    return {"bytes": None, "compile_s": time.perf_counter() - t0,
            "error": msg[:500]}


def run_isolated(case: dict, timeout_s: float) -> dict:
  """`run_case` in a fresh Python process, killed after ``timeout_s``."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  # A GPU child should not grab 75 % of the device up front; the allocator's
  # peak counts what is in use either way.
  env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  if not case.get("options", {}).get("autotune", True):
    env["XLA_FLAGS"] = " ".join(
        [env.get("XLA_FLAGS", ""), NO_AUTOTUNE_FLAG]).strip()
  cmd = [sys.executable, "-m", "benchmarks.memory", "--case",
         json.dumps(case)]
  t0 = time.perf_counter()
  try:
    p = subprocess.run(cmd, cwd=_ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return {"bytes": None, "compile_s": time.perf_counter() - t0,
            "error": f"timeout: no result within {timeout_s:g} s"}
  for line in reversed(p.stdout.splitlines()):
    if line.startswith(_RESULT):
      return json.loads(line[len(_RESULT):])
  if p.returncode < 0:
    why = f"killed by signal {-p.returncode}"
    if -p.returncode == 9:
      why += " (out of memory?)"
  else:
    last = [s for s in p.stderr.splitlines() if s.strip()]
    why = f"exit code {p.returncode}: {last[-1] if last else 'no output'}"
  return {"bytes": None, "compile_s": time.perf_counter() - t0,
          "error": why[:500]}


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------
ROW_KEYS = ("model", "size", "measure", "bytes", "compile_s", "error")
# Written where a row has them: ``autotune`` (false where the case ran with
# XLA's GPU autotuning off) and ``compile_peak_bytes`` (a GPU peak case:
# the device's high-water mark after compiling, before the step ran).
OPTIONAL_ROW_KEYS = ("autotune", "compile_peak_bytes", "rerun_error")


def _atomic_write(path: str, write) -> None:
  from megan_jax import io
  with io.atomic_path(path) as tmp:
    write(tmp)


def write_json(path: str, meta: dict, results: Sequence[dict]) -> None:
  """Writes ``{"meta": {...}, "results": [{model, size, measure, bytes,
  compile_s, error}, ...]}`` atomically (with ``OPTIONAL_ROW_KEYS`` where
  a row has them)."""
  rows = [{k: r[k] for k in ROW_KEYS + OPTIONAL_ROW_KEYS if k in r}
          for r in results]

  def write(tmp):
    with open(tmp, "w") as f:
      json.dump({"meta": meta, "results": rows}, f, indent=1)
      f.write("\n")
  _atomic_write(path, write)


def _series(results, model, measure):
  pts = sorted((r["size"], r["bytes"]) for r in results
               if r["model"] == model and r["measure"] == measure
               and r["bytes"] is not None)
  return [s for s, _ in pts], [b / GIB for _, b in pts]


LABELS = {"megan_cascade": "MEGAN cascade (inference)",
          "megan_lr_step": "MEGAN LR {lr}³ step",
          "megan_hr_step": "MEGAN HR {patch}³ step",
          "dcgan": "3D DCGAN", "pix2pix": "3D Pix2Pix", "pggan": "3D PGGAN"}


def geometry(config_name: str) -> dict:
  """The LR grid and patch side of a MEGAN config (for labels)."""
  from megan_jax import configs
  c = configs.get_config(config_name)
  return {"lr": int(c.lr_size), "patch": int(c.patch_size)}


def write_plot(path: str, results: Sequence[dict], title: str,
               geom: dict | None = None) -> None:
  """Log-log bytes against side length, one line per model (solid:
  compiled, dashed: measured peak), with the 12 and 80 GiB marks.
  ``geom``: MEGAN's LR and patch sides for the labels (``geometry``;
  default the paper's 64 and 32)."""
  geom = geom or {"lr": 64, "patch": 32}
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(9, 5), dpi=120)
  colours = dict(zip(MODELS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
  sizes = sorted({r["size"] for r in results})
  for model in MODELS:
    for measure, style in (("compiled", "-o"), ("peak", "--s")):
      xs, ys = _series(results, model, measure)
      if xs:
        label = LABELS[model].format(**geom) + (
            "" if measure == "compiled" else " (peak)")
        ax.plot(xs, ys, style, color=colours[model], label=label,
                linewidth=2.5 if model.startswith("megan") else 1.5,
                markerfacecolor="none" if measure == "peak" else None)
  for gb in GPU_MARKS_GB:
    gib = gb * 1e9 / GIB
    ax.axhline(gib, color="grey", linestyle=":", linewidth=1)
    ax.text(sizes[0] if sizes else 1, gib * 1.08,
            f"{gb} GB GPU ({gib:.1f} GiB)", color="grey", fontsize=8)
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  if sizes:
    ax.set_xticks(sizes)
    ax.set_xticklabels([f"{s}³" for s in sizes])
  ax.set_xlabel("volume side length (voxels)")
  ax.set_ylabel("device memory (GiB)")
  ax.set_title(title, fontsize=9)
  ax.grid(True, which="major", alpha=0.3)
  ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  fig.tight_layout()
  _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
  plt.close(fig)


def plot_title(meta: dict) -> str:
  o = meta.get("options") or {}
  how = "".join(
      [f", config {o['config']}" if o.get("config", "default") != "default"
       else "",
       f", widths ×{o['width_scale']:g}" if o.get("width_scale", 1) != 1
       else ""])
  return (f"One training step, batch 1, fp32{how} (MEGAN cascade: "
          f"inference)\n"
          f"solid: XLA compiled memory; dashed: "
          f"{meta.get('peak_bytes', 'measured peak')}; "
          f"{meta['backend']} ({meta['device_kind']}), jax "
          f"{meta['jax_version']}")


def _gib(b):
  if b is None:
    return "–"
  v = b / GIB
  return f"{v:,.2f}" if v >= 0.1 or v == 0 else f"{v:.2g}"  # tiny widths


def _megan_training(value, size):
  """MEGAN's larger training step at ``size`` (LR or HR), or None."""
  steps = [value.get((m, size)) for m in ("megan_lr_step", "megan_hr_step")]
  return max(steps) if all(steps) else None


def markdown_table(results: Sequence[dict], measure: str = "compiled") -> str:
  """GiB per model and size, and each baseline's ratio to MEGAN at 256³ and
  512³ (where both are known): to its cascade (inference) and to its larger
  training step (the like-for-like figure: a baseline's is a training
  step). ``UNTUNED_MARK`` marks bytes measured with autotuning off."""
  rows = [r for r in results if r["measure"] == measure]
  if not rows:
    return ""
  sizes = sorted({r["size"] for r in rows})
  value = {(r["model"], r["size"]): r["bytes"] for r in rows}
  untuned = {(r["model"], r["size"]) for r in rows
             if r.get("autotune") is False and r["bytes"] is not None}
  ratio_sizes = [s for s in RATIO_SIZES if s in sizes]
  head = (["model"] + [f"{s}³" for s in sizes]
          + [f"× cascade at {s}³" for s in ratio_sizes]
          + [f"× MEGAN training at {s}³" for s in ratio_sizes])
  lines = ["| " + " | ".join(head) + " |",
           "|" + "---|" * len(head)]
  for model in MODELS:
    if not any(m == model for m, _ in value):
      continue
    cells = [model] + [_gib(value.get((model, s))) + (
        UNTUNED_MARK if (model, s) in untuned else "") for s in sizes]
    for den_of in (lambda s: value.get(("megan_cascade", s)),
                   lambda s: _megan_training(value, s)):
      for s in ratio_sizes:
        num, den = value.get((model, s)), den_of(s)
        cells.append(f"{num / den:,.1f}×" if model in BASELINES and num
                     and den else "")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_markdown(path: str, results: Sequence[dict], meta: dict) -> str:
  batch = meta.get("batch", {})
  parts = [f"Memory of one training step (GiB, batch 1, fp32; "
           f"{meta.get('backend')}, {meta.get('device_kind')}, jax "
           f"{meta.get('jax_version')}; `{meta.get('command')}`). "
           f"megan_cascade: inference of the whole cascade, its largest "
           f"per-scale program ({batch.get('megan_cascade', '?')} patch(es) "
           f"per batch); megan_hr_step: {batch.get('megan_hr_step', '?')} "
           f"patch(es) of {meta.get('geometry', {}).get('patch', 32)}³ per "
           "step."]
  for measure, what in (("compiled", "XLA's compiled memory analysis"),
                        ("peak", f"measured: {meta.get('peak_bytes')}")):
    table = markdown_table(results, measure)
    if table:
      parts += ["", f"**{measure}** ({what}):", "", table]
  if any(r.get("autotune") is False and r["bytes"] is not None
         for r in results):
    parts += ["", f"{UNTUNED_MARK} measured with XLA's GPU autotuning off "
              f"(`--no-autotune`, {NO_AUTOTUNE_FLAG}): cuDNN's default "
              "convolution algorithms, no candidate kernels run during the "
              "compile."]
  failed = [f"- {r['model']} {r['size']}³ {r['measure']}: {r['error']}"
            for r in results if r["bytes"] is None]
  # A table's empty cells with no row at all: say so, not a bare "–". The
  # sizes a model is expected at: those of its kind (the cascade, or the
  # training steps) in any measure, so 1024³ is asked of the cascade only.
  # Training steps: every size of the table up to their largest (a 256³
  # column made by the cascade's rows is asked of them too).
  sizes_of = {is_cascade: sorted({r["size"] for r in results
                                  if (r["model"] == "megan_cascade")
                                  == is_cascade})
              for is_cascade in (True, False)}
  if sizes_of[False]:
    sizes_of[False] = sorted({r["size"] for r in results
                              if r["size"] <= sizes_of[False][-1]})
  for measure in MEASURES:
    have = {(r["model"], r["size"]) for r in results
            if r["measure"] == measure}
    for model in MODELS:
      if any(m == model for m, _ in have):
        failed += [f"- {model} {s}³ {measure}: not run (no such case in "
                   "the runs merged here)"
                   for s in sizes_of[model == "megan_cascade"]
                   if (model, s) not in have]
  if failed:
    parts += ["", "Not measured:", ""] + failed
  text = "\n".join(parts) + "\n"

  def write(tmp):
    with open(tmp, "w") as f:
      f.write(text)
  _atomic_write(path, write)
  return text


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------
def parse_args(argv):
  p = argparse.ArgumentParser(
      prog="python -m benchmarks.memory",
      description="Memory of one GAN training step against the volume side "
      "(MEGAN's Fig. 4).")
  p.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES),
                 help="volume side lengths (default: %(default)s)")
  p.add_argument("--cascade-sizes", type=int, nargs="+", default=None,
                 help="sides for megan_cascade (default: --sizes)")
  p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
  p.add_argument("--order", choices=("model", "size"), default="model",
                 help="run the cases model by model, or every model's "
                 "smallest size first (for a run under a time limit)")
  p.add_argument("--measure", default="compiled",
                 choices=("compiled", "peak", "both"))
  p.add_argument("--out", default=os.path.join(_ROOT, "benchmarks", "results"))
  p.add_argument("--config", default="default",
                 help="MEGAN config (default: the paper's sizes)")
  p.add_argument("--width-scale", type=float, default=1.0,
                 help="multiply every channel count (tiny runs: 0.0625)")
  p.add_argument("--impl", default="plain", choices=("plain", "fast"))
  p.add_argument("--hr-batch", type=int, default=1,
                 help="patches per HR training step (the code uses 20)")
  p.add_argument("--cascade-batch", type=int, default=1,
                 help="patches per cascade inference batch")
  p.add_argument("--timeout-s", type=float, default=None,
                 help="per-case limit in seconds (compiling, and running for "
                 f"peak; default {TIMEOUT_S['compiled']:g} for a compiled "
                 f"case, {TIMEOUT_S['peak']:g} for a peak one)")
  p.add_argument("--cpu-peak-limit-gib", type=float, default=4.0,
                 help="on a CPU, skip peak cases whose compiled memory is "
                 "above this (default %(default)s)")
  p.add_argument("--fast-compile", action="store_true",
                 help="XLA backend optimisation level 0 for the compiled "
                 "measure (same bytes, ~2x faster compiles)")
  p.add_argument("--no-autotune", dest="autotune", action="store_false",
                 help="XLA's GPU autotuning off in each case's process "
                 f"({NO_AUTOTUNE_FLAG}): no candidate kernels run on "
                 "full-size buffers while compiling (time, and a peak's "
                 "bytes); rows say autotune false (no effect on a CPU)")
  p.add_argument("--jobs", type=int, default=1,
                 help="compiled cases run this many at a time")
  p.add_argument("--in-process", action="store_true",
                 help="no subprocesses or timeouts (peak needs isolation)")
  p.add_argument("--merge", action="store_true",
                 help="keep the existing JSON's other rows")
  p.add_argument("--only-missing", action="store_true",
                 help="with --merge: run only the cases the existing JSON "
                 "has no bytes for (never run, failed or timed out), so "
                 "runs under a time limit add up")
  p.add_argument("--replot", action="store_true",
                 help="only redraw the PNG and MD from the JSON in --out")
  p.add_argument("--case", help=argparse.SUPPRESS)  # a child's one case
  args = p.parse_args(argv)
  if any(s < 1 for s in args.sizes + (args.cascade_sizes or [])):
    p.error("--sizes: must be positive")
  if not 0 < args.width_scale < math.inf:  # nan too
    p.error(f"--width-scale {args.width_scale}: must be a number > 0")
  if args.timeout_s is not None and not args.timeout_s > 0:
    p.error(f"--timeout-s {args.timeout_s:g}: must be > 0")
  if not args.cpu_peak_limit_gib > 0:
    p.error(f"--cpu-peak-limit-gib {args.cpu_peak_limit_gib:g}: must be > 0")
  if args.jobs < 1:
    p.error(f"--jobs {args.jobs}: must be >= 1")
  if not args.case and not args.replot:  # a bad config: now, not per case
    from megan_jax import configs
    from megan_jax.errors import InputError
    try:
      configs.get_config(args.config)
    except InputError as e:
      p.error(f"--config: {e}")
    name, colon, arg = args.config.partition(":")
    if name not in configs.BUILTIN:  # a file: the cases run from the root
      args.config = os.path.abspath(name) + colon + arg
  if not args.case and not args.replot:  # the baselines' own size rules
    from benchmarks import baselines
    for model in (m for m in args.models if m in BASELINES):
      for size in sorted(set(args.sizes)):
        try:
          baselines.build(model, size, width_scale=args.width_scale)
        except ValueError as e:
          p.error(f"--sizes {size}: {e} (or leave {model} out with "
                  "--models)")
  if args.hr_batch < 1 or args.cascade_batch < 1:
    p.error("--hr-batch and --cascade-batch must be >= 1")
  if args.fast_compile and args.measure != "compiled":
    p.error("--fast-compile: only with --measure compiled")
  if args.only_missing and not args.merge:
    p.error("--only-missing: only with --merge")
  if args.in_process and not args.autotune:
    p.error("--no-autotune: not with --in-process (XLA reads its flags "
            "when a process starts JAX; each case needs its own)")
  if args.in_process and args.measure != "compiled":
    p.error("--in-process: only --measure compiled (a peak needs a fresh "
            "process)")
  return args


def plan_cases(args) -> list[dict]:
  """The cases in run order: per measure, model by model (``--order
  model``), or every model's smallest size first (``--order size``: a run
  cut short by a time limit then has each model's small sizes)."""
  measures = MEASURES if args.measure == "both" else (args.measure,)
  cases = []
  for measure in measures:
    group = []
    for model in args.models:
      sizes = (args.cascade_sizes or args.sizes
               if model == "megan_cascade" else args.sizes)
      group += [{"model": model, "size": s, "measure": measure}
                for s in sorted(set(sizes))]
    if args.order == "size":
      group.sort(key=lambda c: c["size"])  # stable: models keep their order
    cases += group
  return cases


def _channels(args, options: Options) -> dict:
  """Each baseline's channel counts at each size run (from its docstring's
  rule), so the JSON says what was measured."""
  from benchmarks import baselines
  out = {}
  for model in args.models:
    if model in BASELINES:
      out[model] = {}
      for s in sorted(set(args.sizes)):
        try:
          out[model][str(s)] = baselines.build(
              model, s, width_scale=options.width_scale).channels
        except ValueError as e:
          out[model][str(s)] = str(e)
  return out


def _load_earlier(path: str) -> dict | None:
  """The results file a ``--merge`` run adds to, read once before the run
  writes its own (partial) results there; None if there is none."""
  try:
    with open(path) as f:
      old = json.load(f)
  except (OSError, ValueError):
    return None
  if (not isinstance(old, dict) or not isinstance(old.get("results"), list)
      or not isinstance(old.get("meta"), dict)):
    return None
  return old


# Options that change what a case measures; the others (how fast it
# compiles, which peak cases a CPU skips) leave its bytes alone.
MERGE_KEYS = ("config", "width_scale", "impl", "hr_batch", "cascade_batch")


def _options_clash(old: dict | None, opts: dict) -> str | None:
  """How the earlier results' options differ from ``opts`` in a way that
  changes the bytes (``MERGE_KEYS``), or None."""
  if old is None:
    return None
  before = old["meta"].get("options") or {}
  diffs = [f"{k}={before.get(k)!r} (now {opts[k]!r})" for k in MERGE_KEYS
           if k in before and before[k] != opts[k]]
  return ", ".join(diffs) or None


def _merge(old: dict | None, results: list[dict], meta: dict) -> list[dict]:
  """The rows of the earlier results ``old`` that ``results`` does not
  replace, plus ``results``; notes the earlier run's command in ``meta``.
  A new row without bytes never replaces an old one with bytes."""
  if old is None:
    return results
  old_rows, old_meta = old["results"], old["meta"]
  key = lambda r: (r["model"], r["size"], r["measure"])
  # A case measured before and failed now (a timeout, say) keeps its
  # bytes, the failure noted on it (``rerun_error``), rather than losing a
  # measured point to a failed rerun.
  measured = {key(r): r for r in old_rows if r.get("bytes") is not None}
  results = [dict(measured[key(r)], rerun_error=r.get("error") or "no bytes")
             if r.get("bytes") is None and key(r) in measured else r
             for r in results]
  new = {key(r) for r in results}
  keep = [r for r in old_rows if key(r) not in new]
  fields = ("command", "date", "total_s") + tuple(
      k for k in ("device_kind", "jax_version") if k in old_meta)
  meta["merged_with"] = old_meta.get("merged_with", []) + [
      {k: old_meta.get(k) for k in fields}]
  for model, per_size in old_meta.get("channels", {}).items():
    meta.setdefault("channels", {}).setdefault(model, {})
    for size, text in per_size.items():
      meta["channels"][model].setdefault(size, text)
  return keep + results


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else list(argv))
  if args.replot:  # redraw the PNG and MD of every JSON in --out
    paths = sorted(glob.glob(os.path.join(args.out, "memory-*.json")))
    for path in paths:
      data = _load_earlier(path)  # None if damaged or not a results file
      if data is None:
        print(f"memory: --replot: {path}: not a results file (JSON with "
              "meta and results)", file=sys.stderr)
        return 2
      stem = path[:-len(".json")]
      write_plot(stem + ".png", data["results"], plot_title(data["meta"]),
                 data["meta"].get("geometry"))
      print(write_markdown(stem + ".md", data["results"], data["meta"]),
            end="")
    if not paths:
      print(f"memory: no memory-*.json in {args.out}", file=sys.stderr)
    return 0 if paths else 1
  if args.case:  # a child: one case, the answer on one marked line
    result = run_case(json.loads(args.case))
    print(_RESULT + json.dumps(result), flush=True)
    return 0

  options = Options(config=args.config, width_scale=args.width_scale,
                    impl=args.impl, hr_batch=args.hr_batch,
                    cascade_batch=args.cascade_batch,
                    cpu_peak_limit_gib=args.cpu_peak_limit_gib,
                    fast_compile=args.fast_compile, autotune=args.autotune)
  opts = dataclasses.asdict(options)
  from megan_jax import io as megan_io
  from megan_jax.errors import InputError
  try:  # an unusable --out: now, not after the whole run
    megan_io.make_folder(args.out, "--out")
  except InputError as e:
    print(f"memory: {e}", file=sys.stderr)
    return 2
  run = ((lambda case: run_case(case)) if args.in_process else
         (lambda case: run_isolated(case, args.timeout_s or TIMEOUT_S[
             case.get("measure", "compiled")])))
  start = time.perf_counter()
  info = run({"model": "probe", "options": opts})
  if "backend" not in info:
    print(f"memory: could not start JAX: {info.get('error')}", file=sys.stderr)
    return 1

  backend = info["backend"]
  stem = os.path.join(args.out, f"memory-{backend}")
  earlier = _load_earlier(stem + ".json") if args.merge else None
  if args.merge and earlier is None and os.path.exists(stem + ".json"):
    print(f"memory: --merge: {stem}.json: not a results file (JSON with "
          "meta and results); move it away or drop --merge", file=sys.stderr)
    return 2
  if earlier is not None and earlier["meta"].get(
      "device_kind", info["device_kind"]) != info["device_kind"]:
    print(f"memory: --merge: {stem}.json was measured on "
          f"{earlier['meta'].get('device_kind')}, not {info['device_kind']}; "
          "its rows would be read as this device's (use another --out)",
          file=sys.stderr)
    return 2
  clash = _options_clash(earlier, opts)
  if clash:
    print(f"memory: --merge: {stem}.json was measured with {clash}; its "
          "rows would be mixed with this run's under one meta (use another "
          "--out, or the same options)", file=sys.stderr)
    return 2
  cases = plan_cases(args)
  if args.only_missing and earlier is not None:
    measured = {(r.get("model"), r.get("size"), r.get("measure"))
                for r in earlier["results"] if r.get("bytes") is not None}
    cases = [c for c in cases
             if (c["model"], c["size"], c["measure"]) not in measured]
    print(f"memory: --only-missing: {len(cases)} case(s) to run",
          flush=True)
    if not cases:  # the file keeps its meta (command, date) and rows
      print(f"memory: {stem}.json already has every case asked for",
            flush=True)
      return 0
  results: list[dict | None] = [None] * len(cases)

  def one(i):
    case = dict(cases[i], options=opts)
    r = run(case)
    row = {**cases[i], "bytes": r.get("bytes"),
           "compile_s": round(float(r.get("compile_s") or 0.0), 2),
           "error": r.get("error")}
    if not options.autotune and backend == "gpu":  # a GPU flag
      row["autotune"] = False
    if r.get("compile_peak_bytes") is not None:
      row["compile_peak_bytes"] = r["compile_peak_bytes"]
    results[i] = row
    extra = ""
    if r.get("scales"):
      extra = "  [" + ", ".join(f"{n} {_gib(b)}" for n, b in r["scales"]) + "]"
    print(f"{row['model']:>14} {row['size']:>5}³ {row['measure']:>8}: "
          f"{_gib(row['bytes']):>10} GiB  compile {row['compile_s']:6.1f} s"
          + (f"  ({row['error']})" if row["error"] else "") + extra,
          flush=True)

  def write_results(final: bool) -> str:
    """Writes what is measured so far (a run cut short by an outer time
    limit keeps its finished cases); the plot only at the end."""
    meta = {
        "jax_version": info["jax_version"],
        "jaxlib_version": info["jaxlib_version"],
        "backend": backend,
        "device_kind": info["device_kind"],
        "device_count": info["device_count"],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
        "command": "python -m benchmarks.memory " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "total_s": round(time.perf_counter() - start, 1),
        "complete": final,
        "options": opts,
        "timeout_s": None if args.in_process else args.timeout_s,
        "batch": {"megan_lr_step": 1, "megan_hr_step": args.hr_batch,
                  "megan_cascade": args.cascade_batch, "baselines": 1},
        "compiled_bytes": "argument + output + temp - alias (XLA memory "
                          "analysis; the state is donated)",
        "peak_bytes": ("device peak_bytes_in_use" if info["has_memory_stats"]
                       else "process peak RSS (ru_maxrss)"),
        "cpu_idle_rss_bytes": (None if info["has_memory_stats"]
                               else info["idle_rss_bytes"]),
        "units": "bytes",
        "channels": _channels(args, options),
        "geometry": geometry(args.config),
    }
    os.makedirs(args.out, exist_ok=True)
    rows = [r for r in results if r is not None]
    if args.merge:
      rows = _merge(earlier, rows, meta)
    rows.sort(key=lambda r: (MEASURES.index(r["measure"]),
                             MODELS.index(r["model"]), r["size"]))
    write_json(stem + ".json", meta, rows)
    text = write_markdown(stem + ".md", rows, meta)
    if final:
      write_plot(stem + ".png", rows, plot_title(meta), meta["geometry"])
    return text

  compiled = [i for i, c in enumerate(cases) if c["measure"] == "compiled"]
  peak = [i for i, c in enumerate(cases) if c["measure"] == "peak"]
  jobs = 1 if args.in_process else max(1, args.jobs)
  lock = threading.Lock()

  def one_saved(i):  # saved as each finishes: an outer limit keeps them
    one(i)
    with lock:
      write_results(final=False)

  with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
    list(pool.map(one_saved, compiled))
  limit = args.cpu_peak_limit_gib * GIB
  # Compiled figures of this run, and of the file merged with (same
  # options: `_options_clash`; --only-missing does not compile them again).
  known = {(r["model"], r["size"]): r["bytes"]
           for r in (earlier or {}).get("results", []) + results
           if r is not None and r.get("measure", "compiled") == "compiled"
           and r.get("bytes") is not None}
  for i in peak:  # one at a time: they share the device
    estimate = known.get((cases[i]["model"], cases[i]["size"]))
    if not info["has_memory_stats"] and estimate and estimate > limit:
      # Known too large from this run's compiled measure: no need to
      # compile it again to find out.
      results[i] = {**cases[i], "bytes": None, "compile_s": 0.0, "error": (
          f"skipped: too large for CPU run (compiled {estimate / GIB:.1f} "
          f"GiB > {args.cpu_peak_limit_gib:g} GiB)")}
      continue
    one(i)
    write_results(final=False)

  text = write_results(final=True)
  print()
  print(text, end="")
  print(f"\nwrote {stem}.json, .png, .md in "
        f"{time.perf_counter() - start:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
