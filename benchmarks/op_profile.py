r"""Where the time goes: the HR generator forward and the edge sketch under
the JAX profiler.

    python -m benchmarks.op_profile [--only hr_forward edges]
        [--dtypes fp32 bf16] [--batch 8] [--impl fast ...] [--repeats 3]
        [--edge-size 256] [--quick] [--out benchmarks/results]

Sections (``--only`` picks some):

- ``hr_forward``: the HR generator forward (``models.HRGenerator`` at the
  paper's widths, 32³ patches, ``train=False``, as ``benchmarks.throughput``
  times it) at ``--batch`` in each of ``--dtypes`` and ``--impl`` (conv
  forms: ``benchmarks.throughput.conv_form``), run ``--repeats`` times
  inside ``jax.profiler.trace``. Every XLA op the trace records (on a GPU
  the kernels on the device, elsewhere the CPU thunks) is put down to the
  Flax module it came from, by the ``op_name`` metadata of the compiled
  HLO: ``conv_in``, ``down_0``, ``block_*/conv_0`` (the six ResNet blocks
  summed), ``up_norm_1``, ... (``groups``; the ReLUs after the norms and
  the final tanh are the generator's own, ``(HRGenerator)``), and to a kind
  of op: convolution or matmul, reduction, elementwise, data movement (a
  fusion of copies, transposes, pads, slices, concatenations, converts
  only), other (``kinds``); ``unattributed_share``: the op time put down to
  no module or to kind "other" (near 0 where the attribution works).
  Events of ops that only run others (while, call) are left out: their
  ops are counted. Per group the nominal FLOPs of its convolutions (every tap,
  zero padding included, as ``throughput.hr_forward_flops``) and so its
  achieved FLOP/s. ``device_busy_s``: the time some op of the program ran
  (overlaps merged) per call, against the untraced wall time per call
  (``wall_s``, median of ``--repeats`` after an untimed call):
  ``busy_fraction`` well under 1 means the device waits on the host
  (launches, transfers), not on arithmetic. ``traced_wall_s``: the call
  while traced. On a GPU, XLA's command buffers (CUDA graphs) are turned
  off (``--xla_gpu_enable_command_buffer=`` added to ``XLA_FLAGS``, in
  ``meta.xla_flags``) unless ``--command-buffers``: a command buffer is one
  trace event for many kernels, with no op to put it down to (session 18,
  H100: 11 % of the bf16 forward's op time, 59 % with fast-skinny); without
  them every kernel is launched on its own, which can only add launch time
  to ``wall_s``.
- ``edges``: ``edges.canny_3d`` on the cascade's blob volume of
  ``--edge-size``³, each engine (and the jax engine with
  ``edges.JAX_SPARSE_TRANSFER``: ``jax-sparse``): wall time and its
  phases, timed by wrapping the module's step functions (``_steps_jax``,
  ``_candidates_jax_sparse`` or ``_smooth_and_differentiate`` and
  ``_suppress``; ``_keep_above``, ``_hysteresis``, input checks
  ``_as_volume`` + ``_well_scaled``; the rest: maxima, thresholds, the weak
  voxels' indices, writing the sketch); for the jax engine also the device
  time of its slab kernels from the trace.

Writes ``profile-<backend>.json`` (``{"meta": {...}, "results":
{"hr_forward": [row, ...], "edges": [row, ...]}}``; a case that fails is
a row with its ``error``) and ``profile-<backend>.md``; ``--merge`` keeps
the sections not run now from an existing file of the same device kind.
``--quick``: ngf 8, 2 blocks, 16³ patches, batch 2, edges 48³, 1 repeat.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import functools
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import numpy as np

from benchmarks import throughput as tp

SECTIONS = ("hr_forward", "edges")
KINDS = ("conv/matmul", "reduction", "elementwise", "data movement",
         "other")
# canny_3d's step functions, timed by wrapping them (in call order; none
# calls another).
EDGE_PHASES = ("_as_volume", "_well_scaled", "_steps_jax",
               "_candidates_jax_sparse", "_smooth_and_differentiate",
               "_suppress", "_keep_above", "_hysteresis")
# The edges section's rows: (label, engine, edges.JAX_SPARSE_TRANSFER).
EDGE_VARIANTS = (("jax", "jax", False), ("jax-sparse", "jax", True),
                 ("numpy", "numpy", False))
NO_SOURCE = "(no source op)"  # ops XLA made with no source op near
TOP_OPS = 12


# ---------------------------------------------------------------------------
# Reading a trace
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class OpEvent:
  """One run of one XLA op in a trace."""
  module: str  # ``hlo_module``: the compiled program's name
  op: str  # ``hlo_op``: the instruction's name in it
  start_ns: float
  duration_ns: float
  on_device: bool  # a device plane's event (a GPU kernel), not a host one


def read_trace(folder: str) -> list[OpEvent]:
  """The XLA op events of the ``.xplane.pb`` under ``folder``.

  A GPU's kernels come from its device planes (``/device:...``; on their
  ``Stream`` lines where there are such, so derived lines that repeat the
  same kernels are not counted twice); where no device plane has op events
  (the CPU backend), the host threads' thunk events. Events without an
  ``hlo_op`` (the profiler's own, Python's) are left out.
  """
  from jax import profiler
  files = sorted(
      os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs
      if f.endswith(".xplane.pb"))
  if not files:
    raise RuntimeError(f"no .xplane.pb written under {folder}")
  device, host = [], []
  for path in files:
    data = profiler.ProfileData.from_file(path)
    for plane in data.planes:
      on_device = plane.name.startswith("/device:")
      lines = [(line.name, [(e, s) for e in line.events
                            if "hlo_op" in (s := dict(e.stats))])
               for line in plane.lines]
      lines = [(n, evs) for n, evs in lines if evs]
      if on_device and any(n.startswith("Stream") for n, _ in lines):
        lines = [(n, evs) for n, evs in lines if n.startswith("Stream")]
      for _, evs in lines:
        for e, s in evs:
          (device if on_device else host).append(OpEvent(
              str(s.get("hlo_module", "")), str(s["hlo_op"]),
              float(e.start_ns), float(e.duration_ns), on_device))
  return device or host


def busy_ns(events: Sequence[OpEvent]) -> float:
  """Time covered by some of ``events`` (overlapping ones merged)."""
  spans = sorted((e.start_ns, e.start_ns + e.duration_ns) for e in events)
  total, lo, hi = 0.0, None, None
  for s, t in spans:
    if hi is None or s > hi:
      if hi is not None:
        total += hi - lo
      lo, hi = s, t
    else:
      hi = max(hi, t)
  return total + (hi - lo if hi is not None else 0.0)


# ---------------------------------------------------------------------------
# Reading the compiled HLO
# ---------------------------------------------------------------------------
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[^\s=]+)\s*=\s*(?P<rest>.*)$")
_OPCODE = re.compile(r"\s([a-z][a-z0-9\-]*)\(")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?(?P<name>[^\s(]+)\s*\(.*\{\s*$")


@dataclasses.dataclass(frozen=True)
class HloOp:
  opcode: str  # e.g. "fusion", "convolution", "custom-call", "copy"
  detail: str  # fusion kind ("kLoop") or custom-call target; may be ""
  op_name: str  # the JAX source op (metadata), "" where none was found
  has_contraction: bool  # a convolution or dot in it (fusions: in its body)
  has_reduce: bool
  moves_only: bool  # only data movement (copies, pads, slices, converts)


# Opcodes that only move, reshape or retype data.
_MOVES = frozenset((
    "copy", "transpose", "bitcast", "reshape", "slice", "dynamic-slice",
    "dynamic-update-slice", "pad", "concatenate", "broadcast", "convert",
    "reverse", "parameter", "constant", "tuple", "get-tuple-element",
    "copy-start", "copy-done", "iota"))
# Ops whose trace events enclose those of the ops they run (counted there).
CONTAINERS = frozenset(("while", "call", "conditional"))


@dataclasses.dataclass
class _Instr:
  name: str
  opcode: str
  op_name: str
  operands: list[str]
  calls: list[str]
  rest: str
  root: bool


def _split_top(text: str) -> list[str]:
  """``text`` split at the commas outside brackets."""
  parts, depth, start = [], 0, 0
  for i, ch in enumerate(text):
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  parts.append(text[start:])
  return [p.strip() for p in parts if p.strip()]


def _parse_instr(line: str) -> _Instr | None:
  m = _INSTR.match(line)
  if not m:
    return None
  rest = m.group("rest")
  op = _OPCODE.search(" " + rest)
  opcode = op.group(1) if op else ""
  operands = []
  if op:
    i = op.end() - 1  # the "(" of the operand list, in " " + rest
    depth, j = 0, i
    text = " " + rest
    for j in range(i, len(text)):
      depth += {"(": 1, ")": -1}.get(text[j], 0)
      if depth == 0:
        break
    # "f32[2]{0} %a" -> "a": an operand's name is its last word.
    operands = [p.split()[-1].lstrip("%") for p in _split_top(text[i + 1:j])]
  name = re.search(r'op_name="([^"]*)"', rest)
  return _Instr(m.group("name"), opcode, name.group(1) if name else "",
                operands, re.findall(r"calls=%?([\w.\-]+)", rest), rest,
                line.lstrip().startswith("ROOT "))


def module_name(hlo_text: str) -> str:
  """``HloModule NAME, ...`` of a compiled program's text."""
  m = re.match(r"\s*HloModule\s+([^\s,]+)", hlo_text)
  return m.group(1) if m else ""


def _nearest_source(instrs: dict[str, _Instr], start: Sequence[str],
                    names: dict[str, str]) -> str:
  """The first source op (an op_name with a scope) met walking back from
  ``start`` through operands, breadth first; ``names`` gives each
  instruction's op_name."""
  queue, seen = list(start), set()
  while queue:
    n = queue.pop(0)
    if n in seen or n not in instrs:
      continue
    seen.add(n)
    if "/" in names.get(n, ""):
      return names[n]
    queue += instrs[n].operands
  return ""


def hlo_ops(hlo_text: str) -> dict[str, HloOp]:
  """Every instruction of a compiled program's text (``as_text()``) by name.

  An instruction's ``op_name`` is, for a fusion with a convolution or dot
  inside, that op's (the one that costs); else its own (XLA gives a fusion
  its root's); else, where XLA made the root (a pad, a convert), the source
  op nearest the root of its body; else the one nearest it among its
  operands. ``has_contraction``, ``has_reduce`` and ``moves_only`` look
  inside fusions.
  """
  comps: dict[str, dict[str, _Instr]] = {}
  current = None
  for line in hlo_text.splitlines():
    m = _COMP.match(line)
    if m and " = " not in line:
      current = comps.setdefault(m.group("name"), {})
      continue
    ins = _parse_instr(line) if current is not None else None
    if ins is not None:
      current[ins.name] = ins

  def inside(comp, seen=()):  # every instruction of a body and its calls
    out = []
    for ins in comps.get(comp, {}).values():
      out.append(ins)
      for called in ins.calls:
        if called not in seen:
          out += inside(called, seen + (comp,))
    return out

  def body_source(comp):  # the source op nearest a body's root
    instrs = comps.get(comp, {})
    roots = [n for n, i in instrs.items() if i.root] or list(instrs)[-1:]
    return _nearest_source(instrs, roots,
                           {n: i.op_name for n, i in instrs.items()})

  ops = {}
  for instrs in comps.values():
    names = {}
    for name, ins in instrs.items():
      op_name, detail = ins.op_name, ""
      contraction = ins.opcode in ("convolution", "dot")
      reduce = ins.opcode in ("reduce", "reduce-window")
      moves = ins.opcode in _MOVES
      if ins.opcode == "fusion":
        kind = re.search(r"kind=(k\w+)", ins.rest)
        detail = kind.group(1) if kind else ""
        body = [b for c in ins.calls for b in inside(c)]
        costly = [b.op_name for b in body
                  if b.opcode in ("convolution", "dot") and b.op_name]
        contraction = bool(costly) or any(
            b.opcode in ("convolution", "dot") for b in body)
        reduce = any(b.opcode in ("reduce", "reduce-window") for b in body)
        moves = bool(body) and all(b.opcode in _MOVES for b in body)
        if costly:
          op_name = costly[0]
        elif "/" not in op_name:
          op_name = next((n for n in map(body_source, ins.calls) if n), "")
      elif ins.opcode == "custom-call":
        target = re.search(r'custom_call_target="([^"]*)"', ins.rest)
        detail = target.group(1) if target else ""
        low = detail.lower()
        contraction = any(w in low for w in ("conv", "gemm", "matmul",
                                             "dot", "cublas"))
      names[name] = op_name
      ops[name] = (ins.opcode, detail, contraction, reduce, moves)
    for name, ins in instrs.items():  # none found: the operands' source
      if "/" not in names[name]:
        names[name] = _nearest_source(instrs, ins.operands, names)
    for name in instrs:
      opcode, detail, contraction, reduce, moves = ops[name]
      ops[name] = HloOp(opcode, detail, names[name], contraction, reduce,
                        moves and not contraction and not reduce)
  return ops


_ELEMENTWISE = frozenset((
    "add", "multiply", "subtract", "divide", "maximum", "minimum", "tanh",
    "rsqrt", "sqrt", "exponential", "log", "negate", "abs", "select",
    "compare", "clamp", "power", "and", "or", "not"))


def op_kind(op: HloOp | None) -> str:
  """One of `KINDS` for an instruction (None: not in the program's text)."""
  if op is None:
    return "other"
  if op.has_contraction:
    return "conv/matmul"
  if op.has_reduce:
    return "reduction"
  if op.moves_only:
    return "data movement"
  if op.opcode == "fusion" or op.opcode in _ELEMENTWISE:
    return "elementwise"
  return "other"


def layer_of(op_name: str, top: str) -> str:
  """The Flax module an op came from, under the model's class ``top``:
  ``"jit(f)/HRGenerator/block_3/norm_0/norm_0._normalise/sub"`` ->
  ``"block_*/norm_0"`` (the ResNet blocks summed); ops of the model's own
  body (the ReLUs, the final tanh) -> ``"(HRGenerator)"``; no source op ->
  `NO_SOURCE`."""
  if not op_name:
    return NO_SOURCE
  parts = op_name.split("/")
  if top not in parts:
    return f"({parts[-1] if parts else op_name})"
  parts = parts[parts.index(top) + 1:-1]  # the modules; the op itself last
  mods = []
  for p in parts:
    if "(" in p or "." in p:  # jit(relu), norm_0._normalise: not modules
      break
    mods.append(p)
  if not mods:
    return f"({top})"
  mods = [re.sub(r"^block_\d+$", "block_*", m) for m in mods[:2]]
  return "/".join(mods if mods[0] == "block_*" else mods[:1])


# ---------------------------------------------------------------------------
# FLOPs per module
# ---------------------------------------------------------------------------
def module_flops(model, variables, x) -> dict[str, float]:
  """Nominal FLOPs of each convolution module of ``model`` on input ``x``
  (shapes only, nothing computed), by `layer_of` group: 2 per multiply-add,
  every tap, the zero padding included; a stride-2 transposed conv does
  k³/8 taps per output voxel."""
  import flax.linen as nn
  import jax
  seen = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    mod = context.module
    if context.method_name == "__call__" and "kernel" in (
        mod.variables.get("params") or {}):
      seen.append(("/".join(mod.path), args[0].shape, out.shape,
                   mod.variables["params"]["kernel"].shape))
    return out

  def run(v, x):
    with nn.intercept_methods(record):
      return model.apply(v, x, train=False)

  jax.eval_shape(run, variables, x)
  flops = collections.Counter()
  top = type(model).__name__
  for path, shape_in, shape_out, kernel in seen:
    k3 = int(np.prod(kernel[:3]))
    vox_in, vox_out = np.prod(shape_in[1:4]), np.prod(shape_out[1:4])
    taps = k3 * min(1.0, vox_in / vox_out)  # transposed: fewer per output
    f = 2 * shape_out[0] * vox_out * taps * kernel[3] * kernel[4]
    flops[layer_of(f"jit(f)/{top}/{path}/op", top)] += float(f)
  return dict(flops)


# ---------------------------------------------------------------------------
# hr_forward
# ---------------------------------------------------------------------------
def _options():
  """Profiler options with the Python tracer off (its frames would slow the
  host); None (the defaults) where this JAX has no such option."""
  from jax import profiler
  try:
    opts = profiler.ProfileOptions()
    opts.python_tracer_level = 0
  except (AttributeError, TypeError):
    return None
  return opts


def traced(fn: Callable[[], Any], repeats: int
           ) -> tuple[list[OpEvent], list[float]]:
  """``fn()`` (blocked on) ``repeats`` times under the JAX profiler: the op
  events, and each call's wall time while traced (on a GPU XLA runs its
  command buffers, CUDA graphs, op by op while a profiler is active)."""
  import jax
  from jax import profiler
  times = []
  with tempfile.TemporaryDirectory(prefix="megan-profile-") as d:
    with profiler.trace(d, profiler_options=_options()):
      for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return read_trace(d), times


def program_events(events: Sequence[OpEvent], module: str,
                   ops: dict[str, HloOp]) -> tuple[list[OpEvent], bool]:
  """The events of program ``module`` (every event where none has that
  name: names differ in some versions), without those of `CONTAINERS`
  (their ops' own events are there); and whether the name matched."""
  mine = [e for e in events if e.module == module]
  matched = bool(mine)
  mine = [e for e in (mine if matched else events)
          if e.op not in ops or ops[e.op].opcode not in CONTAINERS]
  return mine, matched


def summarise(events: Sequence[OpEvent], ops: dict[str, HloOp], top: str,
              calls: int, flops: dict[str, float] | None = None,
              peak: float | None = None) -> dict:
  """Per-call times by group, by kind, and the top ops."""
  total = sum(e.duration_ns for e in events) or 1.0
  groups = collections.defaultdict(lambda: [0.0, set()])
  kinds = collections.defaultdict(lambda: [0.0, set()])
  per_op = collections.defaultdict(float)
  group_kinds = collections.defaultdict(collections.Counter)
  unattributed = 0.0
  for e in events:
    op = ops.get(e.op)
    g, kind = layer_of(op.op_name if op else "", top), op_kind(op)
    if g == NO_SOURCE or kind == "other":
      unattributed += e.duration_ns
    groups[g][0] += e.duration_ns
    groups[g][1].add(e.op)
    group_kinds[g][kind] += e.duration_ns
    kinds[kind][0] += e.duration_ns
    kinds[kind][1].add(e.op)
    per_op[e.op] += e.duration_ns
  flops = flops or {}

  def row(name, ns, names, key):
    s = ns / 1e9 / calls
    r = {key: name, "s_per_call": tp._r(s, 9), "share": tp._r(ns / total, 4),
         "ops": len(names)}
    if key == "group":  # its time by kind of op, and its FLOP/s
      r["kinds"] = {k: tp._r(v / ns, 4) for k, v in
                    group_kinds[name].most_common()}
      f = flops.get(name)
      r["flops"] = f
      r["achieved_flops"] = f / s if f and s > 0 else None
      r["fraction_of_peak"] = (tp._r(f / s / peak, 4)
                               if f and s > 0 and peak else None)
    return r

  out = {
      "groups": sorted((row(g, ns, n, "group") for g, (ns, n) in
                        groups.items()), key=lambda r: -r["s_per_call"]),
      "kinds": sorted((row(k, ns, n, "kind") for k, (ns, n) in
                       kinds.items()), key=lambda r: -r["s_per_call"]),
      "top_ops": [],
      "unattributed_share": tp._r(unattributed / total, 4),
  }
  for name, ns in sorted(per_op.items(), key=lambda kv: -kv[1])[:TOP_OPS]:
    op = ops.get(name)
    out["top_ops"].append({
        "op": name, "opcode": op.opcode if op else None,
        "detail": op.detail if op else None,
        "group": layer_of(op.op_name if op else "", top),
        "kind": op_kind(op), "s_per_call": tp._r(ns / 1e9 / calls, 9),
        "share": tp._r(ns / total, 4)})
  return out


def profile_hr_forward(args, sizes, info: dict) -> list[dict]:
  import jax
  p, seed, batch = sizes.patch, args.seed, args.batch
  init_model = tp.hr_generator(sizes, "fast", "fp32")
  variables = tp.jit_init(
      lambda k: init_model.init(k, tp.patch_input(1, p, 2, seed),
                                train=False), jax.random.key(seed))
  peaks = tp.peak_flops(info["device_kind"])
  rows = []
  for impl, dtype in [(i, d) for i in args.impl for d in args.dtypes]:
    row = {"section": "hr_forward", "model": "HRGenerator",
           "impl": impl, "dtype": dtype, "batch": batch, "patch": p,
           "ngf": sizes.ngf, "n_blocks": sizes.n_blocks}

    def measure(impl=impl, dtype=dtype):
      g = tp.hr_generator(sizes, tp.model_impl(impl), dtype)
      x = jax.device_put(tp.patch_input(batch, p, 2, seed))
      t0 = time.perf_counter()
      with tp.conv_form(impl):
        exe = jax.jit(lambda v, x: g.apply(v, x, train=False)).lower(
            variables, x).compile()
      compile_s = time.perf_counter() - t0
      first, times = tp.time_calls(lambda: exe(variables, x), args.repeats,
                                   jax.block_until_ready)
      text = exe.as_text()
      name, ops = module_name(text), hlo_ops(text)
      events, traced_times = traced(lambda: exe(variables, x), args.repeats)
      mine, matched = program_events(events, name, ops)
      if not mine:
        raise RuntimeError("the trace recorded no XLA op events")
      if info["backend"] != "cpu" and not mine[0].on_device:
        # Host events there time the launches, not the kernels.
        raise RuntimeError(
            f"the trace has no {info['backend']} device events (the "
            "profiler's device tracer, e.g. CUPTI, missing?)")
      flops = module_flops(g, variables, x)
      peak = None
      if peaks and info["backend"] == "gpu":
        peak = peaks["bf16" if dtype == "bf16" else "tf32"]
      wall = statistics.median(times)
      busy = busy_ns(mine) / 1e9 / args.repeats
      out = {"compile_s": tp._r(compile_s), "first_call_s": tp._r(first),
             "wall_s": tp._r(wall), "times_s": [tp._r(t) for t in times],
             "device_busy_s": tp._r(busy, 9),
             "op_time_s": tp._r(sum(e.duration_ns for e in mine) / 1e9
                                / args.repeats, 9),
             "busy_fraction": tp._r(busy / wall, 4) if wall > 0 else None,
             "traced_wall_s": tp._r(statistics.median(traced_times)),
             "events_from": ("device" if mine[0].on_device else "host"),
             "module": name, "module_matched": matched,
             "flops": sum(flops.values()),
             "achieved_flops": sum(flops.values()) / wall if wall else None,
             "peak_flops": peak,
             "peak_assumed": (None if peak is None else
                              f"{peaks['match']} datasheet, dense, "
                              f"{'bf16' if dtype == 'bf16' else 'TF32'}"),
             "s_per_patch": tp._r(wall / batch)}
      out.update(summarise(mine, ops, "HRGenerator", args.repeats, flops,
                           peak))
      return out
    rows.append(tp._run_case(row, measure))
  return rows


# ---------------------------------------------------------------------------
# edges
# ---------------------------------------------------------------------------
@contextlib.contextmanager
def timed_phases(module, names: Sequence[str]):
  """Wraps ``module``'s functions ``names`` to add their wall time (s) to
  the yielded dict while the context is open."""
  spent = collections.Counter()
  saved = {n: getattr(module, n) for n in names if hasattr(module, n)}

  def wrap(name, fn):
    @functools.wraps(fn)
    def timed(*a, **k):
      t0 = time.perf_counter()
      try:
        return fn(*a, **k)
      finally:
        spent[name] += time.perf_counter() - t0
    return timed

  for n, fn in saved.items():
    setattr(module, n, wrap(n, fn))
  try:
    yield spent
  finally:
    for n, fn in saved.items():
      setattr(module, n, fn)


def profile_edges(args, info: dict) -> list[dict]:
  from megan_jax import edges as edges_lib
  n = args.edge_size
  vol = tp.blobs(n, args.seed)
  rows = []
  dense = {}  # the dense jax engine's sketch, which jax-sparse must equal
  # (row label, engine, edges.JAX_SPARSE_TRANSFER)
  for label, engine, sparse in EDGE_VARIANTS:
    row = {"section": "edges", "engine": label, "size": n}

    def measure(label=label, engine=engine, sparse=sparse):
      with tp.sparse_transfer(sparse):
        return measure_engine(label, engine)

    def measure_engine(label, engine):
      if engine == "jax":
        t0 = time.perf_counter()
        edges_lib.compile_canny(vol.shape)
        compile_s = time.perf_counter() - t0
      else:
        compile_s = None
      call = lambda: edges_lib.canny_3d(vol, engine=engine)
      t0 = time.perf_counter()
      sketch = call()  # untimed: first-touch of pages, thread pools
      first = time.perf_counter() - t0
      if label == "jax":
        dense["sketch"] = sketch
      walls, phases = [], collections.Counter()
      for _ in range(args.repeats):
        with timed_phases(edges_lib, EDGE_PHASES) as spent:
          t0 = time.perf_counter()
          call()
          walls.append(time.perf_counter() - t0)
        phases.update(spent)
      out = {"compile_s": tp._r(compile_s), "first_call_s": tp._r(first),
             "edge_voxels": int(np.count_nonzero(sketch)),
             # voxels where the sketch differs from the dense jax one's
             "differ_voxels": (int(np.count_nonzero(sketch != dense["sketch"]))
                               if engine == "jax" and "sketch" in dense
                               else None),
             "median_s": tp._r(statistics.median(walls)),
             "times_s": [tp._r(t) for t in walls],
             "threads": edges_lib.EDGE_THREADS}
      mean = {k: v / args.repeats for k, v in phases.items()}
      mean["rest"] = max(0.0, sum(walls) / args.repeats - sum(mean.values()))
      out["phases_s"] = {k: tp._r(v) for k, v in mean.items()}
      if engine == "jax":  # (the first call compiled the sparse kernels)
        events, _ = traced(call, 1)
        on_device = [e for e in events if e.on_device]
        # Off the CPU, host events time the launches, not the kernels.
        use = on_device or (events if info["backend"] == "cpu" else [])
        out["kernel_busy_s"] = tp._r(busy_ns(use) / 1e9, 6) if use else None
        out["kernel_events_from"] = (("device" if on_device else "host")
                                     if use else "none: no op events traced")
      return out
    rows.append(tp._run_case(row, measure))
  return rows


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------
def conv_share(group: dict) -> float | None:
  """The share of a group's time in convolutions or dots (None where its
  row has no split by kind: results of the first version)."""
  kinds = group.get("kinds")
  return None if kinds is None else kinds.get("conv/matmul", 0.0)


def markdown(data: dict) -> str:
  meta, res = data["meta"], data["results"]
  parts = [f"Profile on {meta['backend']} ({meta['device_kind']}; jax "
           f"{meta['jax_version']}; `{meta['command']}`)."]
  for r in res.get("hr_forward") or []:
    if r.get("error"):
      continue
    traced_ms = r.get("traced_wall_s") and r["traced_wall_s"] * 1e3
    parts += [
        "", f"**HR generator forward**, impl {r['impl']}, {r['dtype']}, "
        f"batch {r['batch']} of {r['patch']}³ (ngf {r['ngf']}, "
        f"{r['n_blocks']} blocks): {tp._fmt(r['wall_s'] * 1e3, '.4g')} ms per "
        f"call, ops busy {tp._fmt(r['device_busy_s'] * 1e3, '.4g')} ms "
        f"({tp._fmt(r['busy_fraction'], '.0%')} of the call; op events from "
        f"the {r['events_from']}; {tp._fmt(traced_ms, '.4g')} ms per call "
        "while traced); "
        f"{tp._fmt(r['achieved_flops'] and r['achieved_flops'] / 1e12)} "
        "TFLOP/s nominal over the call"
        + (f", {tp._fmt(r['achieved_flops'] / r['peak_flops'], '.0%')} of "
           f"the {r['peak_assumed']} peak" if r.get("peak_flops") else "")
        + f"; op time put down to no layer or kind: "
        f"{tp._fmt(r.get('unattributed_share'), '.1%')}.", "",
        "| layer | ms per call | share of op time | of it in convs or "
        "dots | ops | GFLOP | TFLOP/s | of peak |",
        "|---|---|---|---|---|---|---|---|"]
    for g in r["groups"]:
      parts.append(
          f"| {g['group']} | {tp._fmt(g['s_per_call'] * 1e3)} | "
          f"{tp._fmt(g['share'], '.1%')} | "
          f"{tp._fmt(conv_share(g), '.0%')} | "
          f"{g['ops']} | "
          f"{tp._fmt(g['flops'] and g['flops'] / 1e9)} | "
          f"{tp._fmt(g['achieved_flops'] and g['achieved_flops'] / 1e12)} | "
          f"{tp._fmt(g['fraction_of_peak'], '.0%')} |")
    parts += ["", "| kind of op | ms per call | share | ops |",
              "|---|---|---|---|"]
    parts += [f"| {k['kind']} | {tp._fmt(k['s_per_call'] * 1e3)} | "
              f"{tp._fmt(k['share'], '.1%')} | {k['ops']} |" for k in r["kinds"]]
  edge_rows = [r for r in res.get("edges") or [] if not r.get("error")]
  if edge_rows:
    found = {k for r in edge_rows for k, v in r["phases_s"].items()
             if v is not None}
    names = [k for k in EDGE_PHASES + ("rest",) if k in found]
    parts += ["", "**Edge sketch** (`edges.canny_3d`, seconds per call by "
              "phase; the jax engine's slab kernels also as the trace's "
              "op time):", "",
              "| volume | engine | threads | total | " + " | ".join(
                  n.strip("_") for n in names) + " | kernel ops | edge "
              "voxels | differ from jax |",
              "|---|---|---|---|" + "---|" * len(names) + "---|---|---|"]
    for r in edge_rows:
      parts.append(
          f"| {r['size']}³ | {r['engine']} | {r['threads']} | "
          f"{tp._fmt(r['median_s'])} | " + " | ".join(
              tp._fmt(r["phases_s"].get(n)) for n in names)
          + f" | {tp._fmt(r.get('kernel_busy_s'))} | "
          f"{r.get('edge_voxels', '–')} | "
          f"{tp._fmt(r.get('differ_voxels'), 'd')} |")
  failed = [r for rows in res.values() for r in rows or [] if r.get("error")]
  if failed:
    parts += ["", "Not measured:", ""]
    parts += [f"- {tp._describe(r)}: {r['error']}" for r in failed]
  return "\n".join(parts) + "\n"


def make_meta(args, argv) -> dict:
  import jax
  dev = jax.devices()[0]
  return {
      "jax_version": jax.__version__,
      "backend": jax.default_backend(),
      "device_kind": dev.device_kind,
      "device_count": jax.device_count(),
      "xla_threads": tp.xla_threads(),
      "cpu": tp._cpu_name(),
      "cpu_count": os.cpu_count(),
      "python": platform.python_version(),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "command": "python -m benchmarks.op_profile " + " ".join(argv),
      "xla_flags": os.environ.get("XLA_FLAGS"),
      "quick": args.quick,
      "repeats": args.repeats,
      "options": dict(vars(args)),
      "notes": {
          "hr_forward": "op times from jax.profiler.trace of --repeats "
                        "calls (Python tracer off); groups from the "
                        "compiled HLO's op_name metadata (a fusion goes "
                        "to the convolution or dot inside it); FLOPs "
                        "nominal (every tap), per group and call; wall_s "
                        "untraced.",
          "edges": "phases timed by wrapping edges' step functions; rest "
                   "= the call minus them (maxima, thresholds, the "
                   "sketch's writing); kernel_busy_s: the jax engine's "
                   "op time in one traced call.",
      },
  }


def write_results(out: str, data: dict) -> None:
  from megan_jax import io
  stem = os.path.join(out, f"profile-{data['meta']['backend']}")
  io.write_text(stem + ".json", json.dumps(data, indent=1) + "\n")
  io.write_text(stem + ".md", markdown(data))


def parse_args(argv):
  p = argparse.ArgumentParser(
      prog="python -m benchmarks.op_profile",
      description="Where the time goes: the HR generator forward's ops by "
      "layer and kind, and the edge sketch's phases (JAX profiler).")
  p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
  p.add_argument("--dtypes", nargs="+", choices=tp.DTYPES, default=None,
                 help="hr_forward dtypes (default fp32 bf16; --quick fp32)")
  p.add_argument("--batch", type=int, default=None,
                 help="patches per forward (default 8; --quick 2)")
  p.add_argument("--impl", nargs="+", default=["fast"],
                 choices=("fast", "plain") + tp.FAST_VARIANTS,
                 help="the forward's conv forms, one profile each (default "
                 "fast; fast-skinny: the skinny convs as dots on any "
                 "backend; fast-blocked: as convs over blocks off the CPU; "
                 "see benchmarks.throughput.conv_form)")
  p.add_argument("--repeats", type=int, default=None,
                 help="timed (and traced) calls (default 3; --quick 1)")
  p.add_argument("--command-buffers", action="store_true",
                 help="keep XLA's GPU command buffers (CUDA graphs; by "
                 "default off here: one trace event for many kernels, put "
                 "down to no op)")
  p.add_argument("--edge-size", type=int, default=None,
                 help="edges volume side (default 256; --quick 48)")
  p.add_argument("--quick", action="store_true",
                 help="tiny sizes for tests")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=os.path.join(tp._ROOT, "benchmarks",
                                               "results"))
  p.add_argument("--merge", action="store_true",
                 help="keep the sections not run now from the existing "
                 "file (same device kind)")
  a = p.parse_args(argv)
  q = a.quick
  a.dtypes = a.dtypes or (["fp32"] if q else list(tp.DTYPES))
  a.batch = (2 if q else 8) if a.batch is None else a.batch
  a.repeats = (1 if q else 3) if a.repeats is None else a.repeats
  a.edge_size = (48 if q else 256) if a.edge_size is None else a.edge_size
  for flag, v in (("--batch", a.batch), ("--repeats", a.repeats)):
    if v < 1:
      p.error(f"{flag} {v}: must be >= 1")
  if a.edge_size < 2:
    p.error(f"--edge-size {a.edge_size}: must be >= 2")
  if a.seed < 0:
    p.error(f"--seed {a.seed}: must be >= 0")
  return a


def _no_command_buffers() -> None:
  """Adds ``--xla_gpu_enable_command_buffer=`` to ``XLA_FLAGS`` where no
  backend has started yet (XLA reads the flags then; a process that runs
  jax already, as the tests, keeps its flags)."""
  try:
    from jax._src import xla_bridge
    started = xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):  # a jax without it: leave the flags
    return
  flags = os.environ.get("XLA_FLAGS", "")
  if not started and "xla_gpu_enable_command_buffer" not in flags:
    os.environ["XLA_FLAGS"] = (
        f"{flags} --xla_gpu_enable_command_buffer=".strip())


def main(argv: Sequence[str] | None = None) -> int:
  argv = [str(x) for x in (sys.argv[1:] if argv is None else argv)]
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  args = parse_args(argv)
  if not args.command_buffers:
    _no_command_buffers()
  from megan_jax import io as megan_io
  from megan_jax.errors import InputError
  try:
    megan_io.make_folder(args.out, "--out")
  except InputError as e:
    print(f"op_profile: {e}", file=sys.stderr)
    return 2
  meta = make_meta(args, argv)
  results: dict[str, list | None] = {k: None for k in SECTIONS}
  meta["sections"] = {k: meta["command"] for k in args.only}
  if args.merge:
    path = os.path.join(args.out, f"profile-{meta['backend']}.json")
    try:
      old = tp.load_for_merge(path, meta["device_kind"])
    except ValueError as e:
      print(f"op_profile: --merge: {e}", file=sys.stderr)
      return 2
    for k in SECTIONS if old is not None else ():
      if k not in args.only and old["results"].get(k):
        results[k] = old["results"][k]
        meta["sections"][k] = (old["meta"].get("sections") or {}).get(
            k, old["meta"].get("command"))
  info = {"backend": meta["backend"], "device_kind": meta["device_kind"]}
  sizes = tp.QUICK if args.quick else tp.Sizes()
  data = {"meta": meta, "results": results}
  start = time.perf_counter()
  for section in SECTIONS:
    if section not in args.only:
      continue
    tp._log(f"{section}:")
    results[section] = (profile_hr_forward(args, sizes, info)
                        if section == "hr_forward"
                        else profile_edges(args, info))
    meta["total_s"] = tp._r(time.perf_counter() - start, 1)
    write_results(args.out, data)
  print(markdown(data), end="")
  tp._log(f"wrote {os.path.join(args.out, 'profile-' + meta['backend'])}"
          f".json and .md in {time.perf_counter() - start:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
