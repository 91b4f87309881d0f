"""Full-resolution inference: the cascade, patch-parallel over every device.

``Translator.translate`` runs: edges of the source at every scale → the LR
generator on the whole (padded) sketch → for each HR scale: the patch grid
(``tiling.make_plan``), previous-scale and edge patches gathered on the host,
generated in fixed-size batches split over a 1-D device mesh, the valid
centres stitched into a host array → the next scale. Every batch has one
static shape (the last is padded with repeats and the padding dropped), so
each scale compiles once and device memory does not depend on the volume.

The generator is deterministic at inference (no dropout; instance norm is per
patch), so the output depends neither on the batch size nor on the number of
devices, up to float32 rounding (XLA may pick other kernels for another
batch shape: differences of ~1e-7 of the intensity range).

With a ``workspace`` folder the per-scale outputs are memory-mapped ``.npy``
files there, with a small record of the patches done: a translation that is
killed continues where it stopped when run again with the same arguments.

Several processes (multi-host, after ``sharding.initialize_distributed``):
the mesh spans every process's devices. Each process has the whole source and
runs the same loop; it cuts only the patches of its own devices
(``sharding.global_batch``), and the HR step ends with an all-gather inside
the jitted function (``out_shardings`` replicated), so every process gets
every generated patch and stitches the whole scale itself. Every process
needs the whole scale-k volume anyway (scale k+1's conditioning patches cross
any slab boundary), and gathering inside the step keeps dispatch
asynchronous (the next batch computes while this one is stitched), which a
separate blocking ``process_allgather`` would not. The LR scale (one small
volume) runs replicated. Only process 0 writes: the output file and the
resume workspace; what it finds there on a resumed run is broadcast to the
others. A single-process run takes the original path unchanged.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import time
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from megan_jax import dataset, io, resample, sharding, tiling
from megan_jax import edges as edges_lib
from megan_jax import state as state_lib
from megan_jax.errors import InputError
from megan_jax.normalise import Normaliser, fit_normaliser
from megan_jax.types import as_shape3

RECORD_EVERY_S = 2.0  # how often a resumable run records its progress

DTYPES = state_lib.DTYPES


@dataclasses.dataclass(frozen=True)
class ScaleReport:
  """What one scale of a translation needs (``megan translate --plan``)."""
  scale: str
  shape: tuple[int, int, int]
  num_patches: int  # 1 for the LR scale (the whole volume)
  batch_shape: tuple[int, ...]
  device_bytes: int | None  # XLA's compiled memory analysis, per device
  host_bytes: int  # the scale's output volume on the host

  def line(self) -> str:
    gib = lambda b: "n/a" if b is None else f"{b / 2**20:,.1f} MiB"
    return (f"{self.scale:>4}  shape {'x'.join(map(str, self.shape)):>13}  "
            f"patches {self.num_patches:>7,}  batch {'x'.join(map(str, self.batch_shape)):>16}  "
            f"device {gib(self.device_bytes):>12}  host {gib(self.host_bytes):>12}")


def compiled_bytes(compiled) -> int | None:
  """Arguments + outputs + temporaries of a compiled function (per device)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # some backends do not implement it
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes
             + m.temp_size_in_bytes - m.alias_size_in_bytes)


AUTO_DEVICE_FRACTION = 0.8  # of a device's bytes_limit, for batch="auto"
AUTO_HOST_FRACTION = 0.25  # of free host RAM where the device has no limit
AUTO_MAX_BATCH = {"cpu": 32, "gpu": 512}  # CPU: per-patch time flat beyond


def memory_budget(device) -> tuple[int | None, str]:
  """Bytes one step may use on ``device`` for ``batch_size="auto"``.

  Returns ``(bytes, source)``: ``AUTO_DEVICE_FRACTION`` of the device's
  ``memory_stats()["bytes_limit"]`` (GPUs, TPUs; source ``"device"``), else
  ``AUTO_HOST_FRACTION`` of the host's free RAM (the CPU backend, which
  reports no limit; source ``"host"``), else ``(None, "unknown")``.
  """
  try:
    stats = device.memory_stats() or {}
  except Exception:  # backends without memory stats
    stats = {}
  if stats.get("bytes_limit"):
    return int(AUTO_DEVICE_FRACTION * stats["bytes_limit"]), "device"
  try:
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (AttributeError, ValueError, OSError):
    return None, "unknown"
  return int(AUTO_HOST_FRACTION * free), "host"


def pick_batch_size(bytes_at: Callable[[int], int | None], budget: int | None,
                    step: int = 1, max_batch: int = 512) -> int:
  """The largest batch ``step·2^k <= max_batch`` whose step fits ``budget``.

  ``bytes_at(b)`` is the compiled memory of the step at batch ``b`` (per
  device; XLA's memory analysis, nothing allocated). Device memory is affine
  in the batch (fixed weights plus activations per patch), so two compiles,
  at ``step`` and ``2·step``, predict every batch; the prediction is then
  checked by compiling the pick, halving while it does not fit. Returns
  ``step`` when nothing is known (no budget or no memory analysis) or even
  ``step`` does not fit (the caller's memory check then says so).
  """
  step, max_batch = int(step), max(int(max_batch), int(step))
  if budget is None:
    return step
  b1, b2 = bytes_at(step), bytes_at(2 * step)
  if b1 is None or b2 is None or b1 > budget:
    return step
  per_step = max(b2 - b1, 1)
  fits = lambda b: b1 + per_step * (b // step - 1) <= budget
  b = step
  while 2 * b <= max_batch and fits(2 * b):
    b *= 2
  while b > 2 * step:  # step and 2·step were compiled: no check needed
    got = bytes_at(b)
    if got is not None and got <= budget:
      break
    b //= 2
  return b


class Translator:
  """A trained cascade, ready to translate volumes of any size.

  Args:
    config: the run's config.
    g_params: ``{"lr": params, "hr1": params, ...}`` generator parameters.
    intensity: the target domain's ``(lo, hi)``; outputs are written in it
      (default: [0, 1]).
    devices: devices to spread patches over (default: all).
    batch_size: patches per batch (rounded up to a multiple of the devices),
      or ``"auto"``: the largest power-of-two multiple of the device count
      whose HR step fits `memory_budget` (at most ``AUTO_MAX_BATCH``), from
      XLA's compiled memory analysis (`pick_batch_size`); the choice is in
      ``batch_info``.
    dtype: "float32" or "bfloat16" compute; parameters are cast once.

  The parameters stay on the host (``params``, cast to ``dtype``); a scale's
  generator goes onto the devices when that scale runs and replaces the
  previous scale's (`scale_params`), so the device holds one scale's
  weights at a time, whatever the number of scales: what XLA's memory
  analysis of a scale's step counts (``plan``), and the same for a 64³ and
  a 1024³ output.
  """

  def __init__(self, config, g_params: dict, *, intensity=None, devices=None,
               batch_size: int | str | None = None,
               dtype: str = "float32"):
    self.config = config
    names = state_lib.scale_names(config)
    # ``train.restore``'s states stand for their generators' parameters.
    g_params = {n: getattr(v, "g_params", v) for n, v in g_params.items()}
    missing = [n for n in names if n not in g_params]
    if missing:
      raise InputError(f"checkpoint: no generator for scale(s) "
                       f"{', '.join(missing)}; train them first")
    if not isinstance(dtype, str):  # np.float32, jnp.bfloat16, a dtype
      try:
        dtype = jnp.dtype(dtype).name
      except TypeError:
        pass
    if not isinstance(dtype, str) or dtype not in DTYPES:
      raise InputError(f"dtype {dtype!r}: choose float32 or bfloat16")
    self.dtype = DTYPES[dtype]
    self.mesh = sharding.make_mesh(devices)
    # A mesh over several processes (multi-host): see the module doc.
    self.multiprocess = not sharding.is_local(self.mesh)
    self.is_writer = not self.multiprocess or jax.process_index() == 0
    # This process's devices of the mesh (the only ones it can ask); the
    # sketches' JAX engine runs on the first (it ran on JAX's first local
    # device, in use or not).
    self.mesh_local = [d for d in self.mesh.devices.flat
                       if d.process_index == jax.process_index()]
    self.edge_device = self.mesh_local[0]
    n_dev = self.mesh.devices.size
    auto = batch_size == "auto"
    if batch_size is None or auto:
      bs = n_dev if auto else int(config.infer.batch_size)
    elif (isinstance(batch_size, (int, np.integer))
          and not isinstance(batch_size, (bool, np.bool_))):
      bs = int(batch_size)
    else:
      raise InputError(f"batch size {batch_size!r}: an integer or 'auto'")
    if bs < 1:
      raise InputError(f"batch size {bs}: must be >= 1")
    self.batch_size = -(-bs // n_dev) * n_dev
    self.intensity = Normaliser(*(intensity or (0.0, 1.0)))
    if self.multiprocess:  # node-local copies out of step: one line, all
      sharding.assert_same_parts({
          "the run's config": json.dumps(json.loads(config.to_json()),
                                         sort_keys=True),
          "the intensity range": self.intensity.to_dict(),
          "the batch size": "auto" if auto else self.batch_size,
          "the dtype": np.dtype(self.dtype).name}, "translation")
    cast = lambda tree: jax.tree.map(
        lambda x: np.asarray(x).astype(self.dtype), tree)
    for n in names:
      if not isinstance(g_params[n], Mapping) or "params" not in g_params[n]:
        raise InputError(f"generator of scale {n}: expected its flax "
                         "variables ({'params': ...}) or a GanState, got "
                         f"{type(g_params[n]).__name__}")
    self.params = {n: cast(g_params[n]) for n in names}  # host copies
    rep_ = sharding.replicated(self.mesh)
    self._abstract_params = {
        n: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=rep_), t)
        for n, t in self.params.items()}
    self._resident = (None, None)  # (scale, its parameters on the devices)
    lr_g = state_lib.build_generator(config, "lr", dtype=self.dtype)
    hr_g = state_lib.build_generator(config, "hr", dtype=self.dtype)

    def lr_fn(params, edges):
      return lr_g.apply(params, edges.astype(self.dtype),
                        train=False).astype(jnp.float32)

    def hr_fn(params, prev, edges):
      # The batch stays float32: with model.hr_residual the previous patch
      # is also the output's base, kept unrounded (generator_output).
      batch = {"prev": prev.astype(jnp.float32),
               "edges": edges.astype(jnp.float32)}
      x = state_lib.generator_input(batch, config, "hr").astype(self.dtype)
      out = hr_g.apply(params, x, train=False)
      return state_lib.generator_output(out, batch, config,
                                        "hr").astype(jnp.float32)

    rep = sharding.replicated(self.mesh)
    bat = sharding.batch_sharded(self.mesh)
    # Identifies the weights for resuming (``load`` sets checkpoint steps).
    sums = [float(jnp.sum(jnp.abs(x))) for x in jax.tree.leaves(g_params)]
    self.fingerprint = _fingerprint(sums)
    if self.multiprocess:
      sharding.assert_same_on_all(np.array(sums, np.float32), "checkpoints")
    self._lr_fn = jax.jit(lr_fn)
    # Several processes: the output is gathered onto every device inside the
    # step, so each process can read all patches (see the module doc).
    self._hr_fn = jax.jit(hr_fn, in_shardings=(rep, bat, bat),
                          out_shardings=rep if self.multiprocess else bat)
    self._compiled = {}  # executables compiled by ``plan``, reused by a run
    self.keep_scales = False  # keep every scale's output (for montages)
    # {scale: checkpoint step} of the generators (set by ``load``).
    self.checkpoint_steps: dict[str, int] = {}
    self.timings, self.scale_outputs = {}, {}
    self.batch_info = {"batch_size": self.batch_size,
                       "source": "auto" if auto else "given"}
    if auto:
      self._auto_batch_size()

  def _auto_batch_size(self) -> None:
    """Sets ``batch_size`` from the device memory (see ``__init__``)."""
    dev = self.mesh_local[0]
    budget, where = memory_budget(dev)
    if budget is not None and where == "host":
      # This process's CPU devices share the host's RAM (as the memory
      # check before a run counts them).
      budget //= len(self.mesh_local)
    n_dev = self.mesh.devices.size
    cap = AUTO_MAX_BATCH["cpu" if dev.platform == "cpu" else "gpu"]
    measured = {}

    def bytes_at(b):
      measured[b] = compiled_bytes(self._hr_abstract("hr1", b).compile())
      return measured[b]

    if "hr1" in self.params:  # else there are no patches to batch
      self.batch_size = pick_batch_size(bytes_at, budget, n_dev, cap)
    self.batch_info = {"batch_size": self.batch_size, "source": "auto",
                       "budget_bytes": budget, "budget_from": where,
                       "max_batch": cap,
                       "compiled_bytes": {str(k): v for k, v in
                                          sorted(measured.items())}}
    if self.multiprocess:
      # Each process sees its own free memory; one global batch for all (the
      # smallest pick), or their programs and collectives would not match.
      picks = sharding.process_values(np.int64(self.batch_size))
      self.batch_size = int(picks.min())
      self.batch_info.update(batch_size=self.batch_size,
                             per_process=[int(b) for b in picks])

  def scale_params(self, name: str):
    """Scale ``name``'s generator parameters on the devices (replicated),
    put there on first use after another scale's, which are let go first:
    the devices hold one scale's weights at a time."""
    if self._resident[0] != name:
      self._resident = (None, None)  # the previous scale's buffers go
      put = (sharding.global_replicate if self.multiprocess
             else sharding.replicate)
      self._resident = (name, put(self.params[name], self.mesh))
    return self._resident[1]

  # -- planning ---------------------------------------------------------------
  def _hr_abstract(self, name, batch: int | None = None):
    p = self.config.patch_size
    x = jax.ShapeDtypeStruct((batch or self.batch_size, p, p, p, 1),
                             jnp.float32)
    return self._hr_fn.lower(self._abstract_params[name], x, x)

  def _lr_abstract(self):
    n = 2 * self.config.lr_size
    x = jax.ShapeDtypeStruct(
        (1, n, n, n, 1), jnp.float32,
        sharding=sharding.replicated(self.mesh) if self.multiprocess else None)
    return self._lr_fn.lower(self._abstract_params["lr"], x)

  def plan(self, shape) -> list[ScaleReport]:
    """Per scale: shape, patches, batch shape, compiled device memory (XLA's
    memory analysis; nothing is allocated) and the output's host memory.
    Compiles every scale's generator step and edge kernel for a run on a
    volume of ``shape`` (the run reuses them)."""
    c = self.config
    from megan_jax import grid
    try:  # what a translation checks: whole sizes, the scales, lr_size
      shape = as_shape3(shape)
      grid.check_size(shape, c)
    except ValueError as e:
      raise InputError(f"plan: shape {shape!r}: {e}") from None
    shapes = resample.scale_shapes(shape, c.num_hr_scales)
    n = c.lr_size
    if "lr" not in self._compiled:  # the steps do not depend on the shape
      self._compiled["lr"] = self._lr_abstract().compile()
    out = [ScaleReport("lr", shapes[0], 1, (1, 2 * n, 2 * n, 2 * n, 1),
                       compiled_bytes(self._compiled["lr"]),
                       4 * int(np.prod(shapes[0])))]
    if edges_lib.ENGINE == "jax":  # the sketches' kernels, one per scale
      for s in shapes:
        edges_lib.compile_canny(s, c.edges.sigma, self.edge_device)
    p = c.patch_size
    for k in range(1, c.num_hr_scales + 1):
      even = tuple(2 * s for s in shapes[k - 1])
      pl = tiling.make_plan(even, p, c.border)
      if f"hr{k}" not in self._compiled:
        self._compiled[f"hr{k}"] = self._hr_abstract(f"hr{k}").compile()
      out.append(ScaleReport(
          f"hr{k}", shapes[k], pl.num_patches, (self.batch_size, p, p, p, 2),
          compiled_bytes(self._compiled[f"hr{k}"]),
          4 * int(np.prod(even))))
    return out

  def check_device_memory(self, reports) -> None:
    """Stops before any work if a step would not fit the device's memory."""
    dev = self.mesh_local[0]  # only this process's devices can be asked
    try:
      stats = dev.memory_stats() or {}
    except Exception:
      stats = {}
    limit = stats.get("bytes_limit")
    per, has = 1, f"{dev.device_kind} has"
    if not limit and dev.platform == "cpu":  # it reports none: the host's RAM
      try:
        limit = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
      except (AttributeError, ValueError, OSError):
        limit = None
      per = len(self.mesh_local)
      has = f"for {per} CPU device(s), the host has in all"
    problem = next((
        f"scale {r.scale}: needs {r.device_bytes / 2**30:.2f} GiB per "
        f"device, {has} {limit / 2**30:.2f} GiB; use a smaller --batch-size"
        for r in reports if limit and r.device_bytes is not None
        and r.device_bytes * per > limit), None)
    if self.multiprocess:  # all stop, or the others would wait for it
      failed = np.flatnonzero(sharding.process_values(np.int32(
          problem is not None)))
      if failed.size and problem is None:
        problem = (f"device memory: a step does not fit the devices of "
                   f"process {', '.join(map(str, failed))} (see its message)")
    if problem is not None:
      raise InputError(problem)

  # -- running ----------------------------------------------------------------
  def translate_normalised(self, image: np.ndarray, label=None, *,
                           progress: bool = True, workspace: str | None = None,
                           workspace_key: str | None = None,
                           on_batch: Callable | None = None) -> np.ndarray:
    """Translates a volume already in [-1, 1]; returns [-1, 1], same shape.

    Args:
      image: ``[D, H, W]`` source volume in [-1, 1].
      label: optional mask written onto every scale's sketch.
      progress: tqdm bars per scale.
      workspace: folder for resumable memory-mapped outputs (see module doc).
        What another translation left there is cleared first.
      workspace_key: what identifies this translation in ``workspace``
        (default: a digest of ``image``, ``label``, the config, dtype,
        weights and edge engine; `translate_file` passes its own, from the
        files).
      on_batch: called as ``on_batch(scale, patches_done)`` after each batch
        (tests use it to interrupt a run).
    """
    c = self.config
    if workspace and self.is_writer:  # never another input's outputs
      claim_workspace(workspace, workspace_key or _fingerprint(
          _array_digest(image, label), c.to_dict(), str(self.dtype),
          self.fingerprint, edges_lib.ENGINE))
    # The finer scales' sketches are made on a second thread while the
    # coarser scales are generated (their jax-engine kernels share the
    # device; the rest of `canny_3d` is host work); "edges" times what the
    # cascade waited for them, the pyramid and first sketches too. One
    # thread: they come in the order they are needed, and after an error
    # only the one under way still runs (the others are cancelled).
    pool = (concurrent.futures.ThreadPoolExecutor(
        1, thread_name_prefix="megan-sketch")
        if c.infer.get("overlap_edges", True) and c.num_hr_scales >= 2
        else None)
    try:
      return self._translate(image, label, pool, progress=progress,
                             workspace=workspace, on_batch=on_batch)
    finally:
      if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)

  def _edges(self, arrays, k):
    """Scale ``k``'s sketch, waiting for it if a thread still makes it."""
    e = arrays[f"edges_{k}"]
    if isinstance(e, concurrent.futures.Future):
      t0 = time.perf_counter()
      e = arrays[f"edges_{k}"] = e.result()
      self.timings["edges"] += time.perf_counter() - t0
    return e

  def _translate(self, image, label, pool, *, progress, workspace,
                 on_batch) -> np.ndarray:
    from tqdm import tqdm
    c = self.config
    t0 = time.perf_counter()
    arrays = dataset.preprocess(image, c, label, foreground=False,
                                sketch_executor=pool,
                                device=self.edge_device)
    # "edges_lr": what the LR scale needs (pyramid, its sketch) and
    # any sketch not left to the threads; "edges": that and every wait.
    self.timings = {"edges": time.perf_counter() - t0}
    self.timings["edges_lr"] = self.timings["edges"]
    # Only the writer (process 0 of several) touches the workspace.
    state = _Workspace(workspace) if workspace and self.is_writer else None
    progress = progress and self.is_writer

    t0 = time.perf_counter()
    y = state.load(0) if state else None
    if self.multiprocess and self._shared_int(y is not None):
      y = sharding.broadcast_from_0(
          y if y is not None else np.empty(arrays["image_0"].shape, np.float32))
    if y is None:
      lr_fn = self._compiled.get("lr", self._lr_fn)
      x = arrays["lr_input"][None, ..., None]
      if self.multiprocess:
        x = sharding.global_replicate(x, self.mesh)
      gen = sharding.local_value(lr_fn(self.scale_params("lr"), x))
      _, crop = resample.lr_pad(arrays["image_0"], c.lr_size)
      y = np.ascontiguousarray(gen[0, ..., 0][crop])
      if state:
        y = state.save(0, y)
    self.timings["lr"] = time.perf_counter() - t0
    if self.keep_scales:
      self.scale_outputs = {"scales": {"lr": np.array(y)}}

    p, B = c.patch_size, self.batch_size
    for k in range(1, c.num_hr_scales + 1):
      t0 = time.perf_counter()
      shape_k = arrays[f"image_{k}"].shape
      even = tuple(2 * s for s in y.shape)
      plan = tiling.make_plan(even, p, c.border)
      done = state.patches_done(k) if state else 0
      out = state.array(k, even) if state else None
      if self.multiprocess:  # the others continue where process 0 stopped
        done = self._shared_int(min(done, plan.num_patches))
        if done:
          got = sharding.broadcast_from_0(
              out if out is not None else np.empty(even, np.float32))
          if out is None:
            out = got
      if out is None:
        out = self._host_array(even)
      elif done >= plan.num_patches:  # this scale finished before
        y = np.asarray(out[tuple(slice(0, s) for s in shape_k)])
        continue
      # Waited for here, after the collectives above (none in `_edges`),
      # and not for a scale that finished before.
      waited = time.perf_counter()
      sketch = self._edges(arrays, k)
      t0 += time.perf_counter() - waited  # the wait counts as "edges"
      # Padded only where the scale is odd-sized: the pad copies the
      # whole sketch (512³: 0.07 s here after a canny_3d, 8x that at 1024³).
      edges = (np.ascontiguousarray(sketch) if sketch.shape == even else
               resample.pad_to(sketch, even, 0.0, low=(0, 0, 0))[0])
      bar = tqdm(total=plan.num_patches, initial=done, unit="patch",
                 desc=f"hr{k} {'x'.join(map(str, shape_k))}",
                 disable=not progress, leave=False, dynamic_ncols=True)
      hr_fn = self._compiled.get(f"hr{k}", self._hr_fn)
      params = None  # the previous scale's weights go before these come
      params = self.scale_params(f"hr{k}")
      batched = sharding.batch_sharded(self.mesh)
      # Host staging buffers, two sets used in turn: a batch's set is cut
      # into again only after that batch's patches came back (`_finish`),
      # so it stays valid even where device_put aliases host memory.
      stages = [(np.empty((B, p, p, p), y.dtype),
                 np.empty((B, p, p, p), edges.dtype)) for _ in range(2)]
      pending = None
      for start in range(done, plan.num_patches, B):
        idx = np.arange(start, min(start + B, plan.num_patches))
        full = np.concatenate([idx, np.full(B - len(idx), idx[-1])])
        if self.multiprocess:  # each process cuts its own devices' patches
          prev_p, edge_p = self._global_batch(y, edges, plan, full)
        else:
          stage = stages[(start // B) % 2]
          prev_p = tiling.previous_patches(y, plan, indices=full,
                                           out=stage[0])[..., None]
          edge_p = tiling.extract_batch(edges, plan, full, pad_value=0.0,
                                        out=stage[1])[..., None]
          prev_p, edge_p = jax.device_put((prev_p, edge_p), batched)
        gen = hr_fn(params, prev_p, edge_p)  # async
        if pending is not None:  # stitch the previous batch meanwhile
          self._finish(out, plan, *pending, state, k, bar, on_batch)
        pending = (gen, idx)
      if pending is not None:
        self._finish(out, plan, *pending, state, k, bar, on_batch)
      bar.close()
      if state:
        state.finish_scale(k, out, plan.num_patches)
      y = np.ascontiguousarray(out[tuple(slice(0, s) for s in shape_k)])
      self.timings[f"hr{k}"] = time.perf_counter() - t0
      if self.keep_scales:
        self.scale_outputs["scales"][f"hr{k}"] = y
    if self.keep_scales:
      self.scale_outputs["edges"] = self._edges(arrays, c.num_hr_scales)
    return y

  def _shared_int(self, value) -> int:
    """Process 0's ``value`` (a small int) on every process."""
    return int(sharding.broadcast_from_0(np.int32(value)))

  def _global_batch(self, y, edges, plan, full):
    p = self.config.patch_size
    shape = (len(full), p, p, p, 1)
    prev = sharding.global_batch(
        shape, self.mesh,
        lambda ids: tiling.previous_patches(y, plan, indices=ids)[..., None],
        full)
    edge = sharding.global_batch(
        shape, self.mesh,
        lambda ids: tiling.extract_batch(edges, plan, ids,
                                         pad_value=0.0)[..., None],
        full)
    return prev, edge

  def _host_array(self, shape) -> np.ndarray:
    """A scale's output on the host: in RAM, or memory-mapped in a temporary
    file when larger than ``config.infer.memmap_bytes`` (so a 1024³ output
    need not be held twice in RAM)."""
    nbytes = 4 * int(np.prod(shape))
    if nbytes <= self.config.infer.memmap_bytes:
      return np.empty(shape, np.float32)
    import tempfile
    fd, path = tempfile.mkstemp(prefix="megan-scale-", suffix=".npy")
    os.close(fd)
    try:
      arr = open_memmap(path, shape)
    finally:
      os.remove(path)  # the mapping keeps the data; nothing is left behind
    return arr

  def _finish(self, out, plan, gen, idx, state, k, bar, on_batch):
    patches = sharding.local_value(gen)[: len(idx), ..., 0]
    tiling.stitch_into(out, patches, plan, idx)
    done = int(idx[-1]) + 1
    if state:
      state.record(k, out, done)
    bar.update(len(idx))
    if on_batch is not None:
      on_batch(k, done)

  def _normalise_source(self, data: np.ndarray, path=None) -> np.ndarray:
    c = self.config
    norm = fit_normaliser(data, percentiles=tuple(c.data.percentiles),
                          window=tuple(c.data.window) or None, path=path)
    return norm.normalise(data)

  def translate_volume(self, vol: io.Volume, label=None, **kwargs
                       ) -> np.ndarray:
    """A ``Volume`` (scanner intensities) → the translated array, on the
    volume's grid, in the target domain's intensities."""
    if not isinstance(vol, io.Volume):
      raise InputError(f"translate_volume: expected an io.Volume (from "
                       f"io.load_nifti), got {type(vol).__name__}; an array "
                       "goes to translate()")
    work, image = self._prepare(vol, label)
    return self._to_input(work, self.translate_normalised(
        image, work.label, **kwargs))

  def _agree(self, error: BaseException | None, what: str) -> None:
    """Raises ``error``; with several processes, on all if any met one
    (``sharding.agree``: else the others would wait in a collective)."""
    if self.multiprocess:
      sharding.agree(error, what)
    elif error is not None:
      raise error

  def _settle(self, write: Callable[[], object], what: str) -> None:
    """Runs ``write`` on the writing process, then `_agree`s on how it
    went (which also waits for the writer): no process goes on alone into
    a collective or returns before the file exists."""
    error = None
    if self.is_writer:
      try:
        write()
      except (InputError, OSError, ValueError) as e:
        error = e
    self._agree(error, what)

  def _prepare(self, vol: io.Volume, label=None):
    """``(working grid, its image in [-1, 1])``: what `translate_volume`
    checks of an input before any work on the devices (a constant image, a
    grid too small, ...)."""
    from megan_jax import grid
    work = grid.to_working(vol, self.config, label)
    return work, self._normalise_source(work.volume.data, vol.path)

  def _to_input(self, work, y: np.ndarray) -> np.ndarray:
    """The cascade's output on the working grid → the input's grid, in the
    target domain's intensities."""
    return self.intensity.denormalise(np.clip(work.restore(y), -1.0, 1.0))

  def translate(self, x, mask=None, *, out: str | None = None,
                progress: bool = False):
    """Translates a path, a nibabel image or a numpy array.

    Returns the same kind: an array for an array (scanner intensities in,
    the target domain's out; an array is taken to be in RAS voxel order at
    the run's voxel spacing), a nibabel image with the input's affine and
    header for an image or a path. With ``out`` the result is written there
    instead (atomically; for a path, resumably) and ``out`` returned.
    ``mask`` (a path, nibabel image or array on the input's grid) is written
    onto the sketches.
    """
    import nibabel as nib
    mask_path = (os.fspath(mask) if isinstance(mask, (str, os.PathLike))
                 else None)
    label = None  # an array, or a Volume whose grid is checked
    if isinstance(mask, nib.spatialimages.SpatialImage):
      label = io.from_image(mask, what="mask")
    elif mask is not None and mask_path is None:
      label = _drop_unit_axes(np.asarray(mask))
    if isinstance(x, (str, os.PathLike)) and out is not None:
      return translate_file(self, os.fspath(x), out, mask_path, label=label,
                            progress=progress)  # it reads a mask path itself
    if mask_path is not None:
      label = io.load_nifti(mask_path, what="mask")
    if isinstance(x, jax.Array):  # a JAX user's volume: to the host
      x = np.asarray(x)
    shape_in = getattr(x, "shape", None)
    if isinstance(x, np.ndarray):
      x = _drop_unit_axes(x)
      if x.ndim != 3:
        raise InputError(f"array: expected 3D (or [D, H, W, 1]), got shape "
                         f"{x.shape}")
      if x.dtype.kind not in "biuf":  # complex, strings, objects
        raise InputError(f"array: expected real numbers, got dtype "
                         f"{x.dtype}" + (" (e.g. the magnitude image)"
                                         if x.dtype.kind == "c" else ""))
      # An array has no geometry: it is taken to be at the run's spacing.
      spacing = self.config.data.spacing or 1.0
      vol = io.Volume(np.asarray(x, np.float32),
                      np.diag([spacing, spacing, spacing, 1.0]))
      io.check_finite(vol.data, None, what="array")
      io.check_not_constant(vol.data, None, what="array")
    elif isinstance(x, (str, os.PathLike)):
      vol = io.load_nifti(x, allow_constant=False)
    elif isinstance(x, nib.spatialimages.SpatialImage):
      vol = io.from_image(x, allow_constant=False)
    else:
      raise InputError(f"translate: expected a path, a nibabel image or a "
                       f"numpy array, got {type(x).__name__}")
    if label is not None:  # an array has no grid to compare a mask's with
      label = mask_on(vol, label, grid=not isinstance(x, np.ndarray))
    if out is not None:  # with several processes: all fail, or none
      self._settle(lambda: io.check_output_path(out, [vol.path, mask_path]),
                   f"output {out}")
    try:
      y = self.translate_volume(vol, label, progress=progress)
    except InputError as e:  # say which volume, as a file's error does
      name = (f"array {'x'.join(map(str, shape_in))}"
              if isinstance(x, np.ndarray) else
              f"input {vol.path}" if vol.path else "image")
      if str(e).startswith(name.split()[0]):
        raise
      raise InputError(f"{name}: {e}") from None
    if out is not None:  # several processes: none returns before the file
      self._settle(lambda: io.save_nifti(out, y, like=vol,
                                         inputs=[mask_path]),
                   f"output {out}")
      return out
    if isinstance(x, np.ndarray):
      return y.reshape(shape_in)  # [D, H, W, 1] in, [D, H, W, 1] out
    return io.output_image(y, vol.affine, vol.header)  # as saved


class _Workspace:
  """Resumable state of one translation in a folder beside its output."""
  PROGRESS = "progress.json"  # written with the first batch recorded

  def __init__(self, folder: str):
    self.folder = folder
    os.makedirs(folder, exist_ok=True)
    self._progress_path = os.path.join(folder, self.PROGRESS)
    self.progress = {}
    if os.path.exists(self._progress_path):
      with open(self._progress_path) as f:
        self.progress = json.load(f)
    # A scale recorded but whose file is gone (a folder half removed, by
    # hand or by a process killed while removing it) is done again: its
    # record alone would pass zeros on as the finished scale.
    self.progress = {k: v for k, v in self.progress.items()
                     if os.path.exists(self._path(k))}
    self._last_flush = time.monotonic()

  def _path(self, k):
    return os.path.join(self.folder, f"scale_{k}.npy")

  def load(self, k):
    if self.progress.get(str(k)) == "done":
      return np.load(self._path(k), mmap_mode="r")
    return None

  def save(self, k, y):
    with io.atomic_path(self._path(k), ".npy") as tmp:
      np.save(tmp, y)
    self._write(k, "done")
    return y

  def patches_done(self, k) -> int:
    v = self.progress.get(str(k), 0)
    return 1 << 62 if v == "done" else int(v)

  def array(self, k, shape):
    path = self._path(k)
    if os.path.exists(path) and str(k) in self.progress:
      arr = np.load(path, mmap_mode="r+")
      if arr.shape == tuple(shape):
        return arr
    return open_memmap(path, shape)

  def record(self, k, out, done):
    """Flushes the output, then records the patches done (in that order, so
    the record never runs ahead of the data on disk); at most every
    ``RECORD_EVERY_S`` seconds."""
    if time.monotonic() - self._last_flush < RECORD_EVERY_S:
      return
    self._flush(out)
    self._write(k, done)

  def finish_scale(self, k, out, n):
    self._flush(out)
    self._write(k, "done")

  def _flush(self, out):
    if isinstance(out, np.memmap):
      out.flush()
    self._last_flush = time.monotonic()

  def _write(self, k, value):
    self.progress[str(k)] = value
    with io.atomic_path(self._progress_path, ".json") as tmp:
      with open(tmp, "w") as f:
        json.dump(self.progress, f)


def _drop_unit_axes(a: np.ndarray) -> np.ndarray:
  """``[D, H, W, 1]`` (any trailing 1-axes) as ``[D, H, W]``, as a 4D NIfTI
  of one volume is read; other arrays as they are."""
  if a.ndim > 3 and set(a.shape[3:]) == {1}:
    return a.reshape(a.shape[:3])
  return a


def open_memmap(path: str, shape) -> np.ndarray:
  """A new float32 ``.npy`` file at ``path`` mapped into memory, its disk
  space reserved first: a full disk is then an ``OSError`` naming the file
  here, not a SIGBUS when a page of the sparse file is first written."""
  try:
    arr = np.lib.format.open_memmap(path, "w+", np.float32, tuple(shape))
  except OSError as e:  # writing the header: a write error names no file
    with contextlib.suppress(OSError):
      os.remove(path)
    raise OSError(e.errno, f"{e.strerror or e} (reserving "
                  f"{4 * int(np.prod(shape)) / 2**20:.1f} MiB)", path) from None
  try:
    with open(path, "r+b") as f:
      os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
  except OSError as e:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
      del arr
      with contextlib.suppress(OSError):
        os.remove(path)
      raise OSError(e.errno, f"{e.strerror} (reserving "
                    f"{4 * int(np.prod(shape)) / 2**20:.1f} MiB)", path) from None
    # Filesystems without fallocate: the sparse file as before.
  except AttributeError:  # no posix_fallocate on this platform
    pass
  return arr


def _file_id(path: str) -> list:
  """What identifies a file's contents for resuming: absolute path, size,
  modification time."""
  st = os.stat(path)
  return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def _fingerprint(*parts) -> str:
  blob = json.dumps(parts, sort_keys=True, default=str).encode()
  return hashlib.sha1(blob).hexdigest()


def mask_on(vol: io.Volume, mask, grid: bool = True) -> np.ndarray:
  """``mask`` (an array, or an ``io.Volume`` whose voxel grid must be
  ``vol``'s when ``grid``) as a bool array on ``vol``'s voxels."""
  if isinstance(mask, io.Volume):
    if grid:
      io.check_same_grid(f"mask {mask.path or ''}".rstrip(), mask.data.shape,
                         mask.affine, vol.data.shape, vol.affine, ref="input")
    mask = mask.data
  arr = np.asarray(mask)
  if arr.ndim != 3 or arr.dtype.kind not in "biuf":
    raise InputError(f"mask: expected a 3D array of numbers on the input's "
                     f"voxels, got {type(mask).__name__} of shape "
                     f"{arr.shape}, dtype {arr.dtype}")
  io.check_same_grid("mask", arr.shape, None, vol.data.shape, None,
                     ref="input")
  if arr.dtype.kind == "f" and not np.isfinite(arr).all():  # NaN > 0.5 is
    raise InputError("mask: non-finite values (NaN or inf)")  # False
  return arr > 0.5


def workspace_for(out: str, fingerprint: str) -> str:
  """The resume folder beside ``out``; a stale one (other arguments) is
  cleared (its contents: the folder is what ``lock_workspace`` locks)."""
  return claim_workspace(workspace_path(out), fingerprint)


def claim_workspace(folder: str, fingerprint: str) -> str:
  """``folder`` as the resume folder of the translation ``fingerprint``
  names: what another one left there is cleared first."""
  meta = os.path.join(folder, "meta.json")
  os.makedirs(folder, exist_ok=True)
  try:
    with open(meta) as f:
      same = json.load(f).get("fingerprint") == fingerprint
  except (OSError, ValueError):
    same = False
  if not same:
    for name in _records_first(os.listdir(folder)):
      path = os.path.join(folder, name)
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
      else:
        os.remove(path)
    try:
      with open(meta, "w") as f:
        json.dump({"fingerprint": fingerprint}, f)
    except OSError as e:  # a write error names no file: this one's
      with contextlib.suppress(OSError):
        os.remove(meta)
      raise OSError(e.errno, f"{e.strerror or e} (writing the resume "
                    "folder's meta.json)", folder) from None
  return folder


def _records_first(names: list[str]) -> list[str]:
  """A resume folder's file names in a safe order to remove them in: its
  meta.json, then its progress record, then the scales' files; a process
  killed part way through leaves a folder no rerun takes as its own."""
  first = ["meta.json", _Workspace.PROGRESS]
  return ([n for n in first if n in names]
          + sorted(n for n in names if n not in first))


def discard_workspace(folder: str) -> None:
  """Removes a resume folder, its records first (`_records_first`), as
  far as it can."""
  try:
    names = os.listdir(folder)
  except OSError:
    return
  for name in _records_first(names):
    path = os.path.join(folder, name)
    with contextlib.suppress(OSError):
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
      else:
        os.remove(path)
  with contextlib.suppress(OSError):
    os.rmdir(folder)


def workspace_path(out: str) -> str:
  """``.OUT.partial`` beside ``out``."""
  return os.path.join(os.path.dirname(os.path.abspath(out)),
                      f".{os.path.basename(out)}.partial")


def workspace_has_batches(out: str) -> bool:
  """Whether ``out``'s resume folder holds batches (it is made, empty,
  before the first)."""
  return os.path.exists(os.path.join(workspace_path(out), _Workspace.PROGRESS))


def lock_workspace(out: str) -> int | None:
  """A file descriptor holding an exclusive ``flock`` on ``out``'s resume
  folder (made if missing), or None if another process holds it: two
  translations into one output would share (and clear) one resume state.
  ``os.close`` of it, or the process ending, frees it."""
  import fcntl
  folder = workspace_path(out)
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as e:  # the output is what the user named
    raise OSError(e.errno, f"{e.strerror or e} (making its resume folder "
                  f"{os.path.basename(folder)})", out) from None
  fd = os.open(folder, os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    os.close(fd)
    return None
  return fd


def load_source(path: str) -> io.Volume:
  """A NIfTI source volume, or the embedded template for "mni152"."""
  from megan_jax import data
  if path == data.MNI152_NAME:
    return data.mni152("t1")
  return io.load_nifti(path, what="input", allow_constant=False)


def working_shape(config, vol: io.Volume | tuple) -> tuple[int, int, int]:
  """The shape the cascade runs at (``grid.working_shape``: the volume's,
  reoriented to ``config.data.orientation`` and resampled to
  ``config.data.spacing``)."""
  from megan_jax import grid
  return grid.working_shape(config, vol)


def _naming(error: InputError, path: str) -> InputError:
  """``error``, or the same saying first which input it is about."""
  return error if path in str(error) else InputError(f"input {path}: {error}")


def left_right_axis(affine) -> int:
  """The voxel axis of an image with this affine that runs left-right (the
  one nearest the world's x), where a label mirror is anatomically
  plausible; 0 for an affine that names none (degenerate)."""
  import nibabel as nib
  try:
    ornt = nib.orientations.io_orientation(np.asarray(affine, np.float64))
  except (ValueError, np.linalg.LinAlgError):  # a degenerate affine
    return 0
  (axis,) = np.flatnonzero(ornt[:, 0] == 0)[:1].tolist() or [0]
  return int(axis)


def translate_file(translator: Translator, in_path: str, out_path: str,
                   mask_path: str | None = None, *, progress: bool = True,
                   on_batch: Callable | None = None,
                   mask_augment_seed: int | None = None,
                   label: np.ndarray | None = None) -> str:
  """Translates a NIfTI file into ``out_path`` (input's shape, affine and
  header), resumably; the file appears only at the end, atomically.

  With ``mask_augment_seed`` the label mask is first scaled (±
  ``config.augment.label_scale``) and mirrored at random (the paper's label
  augmentation, ``edges.augment_label``): a new lesion placement, so one
  healthy scan and one mask give many pathological images. The mirror is
  left-right in the world, whatever the file's voxel order
  (:func:`left_right_axis`).

  With several processes every one calls this with the same arguments; only
  process 0 writes (the output and the resume workspace), and all return once
  the file is there. ``label`` (an array on the input's grid) may stand in
  for ``mask_path``.

  The resume folder is kept only for the same input and mask files (path,
  size, modification time; an array mask by its contents), seed, config,
  dtype, checkpoints and edge engine (the engines' sketches differ by
  rounding near ties); anything else starts afresh.
  """
  writer = translator.is_writer
  if mask_path is not None and label is not None:
    raise ValueError("translate_file: give mask_path or label, not both")
  vol, error = None, None
  try:
    if writer:
      io.check_output_path(out_path, [in_path, mask_path])
    vol = load_source(in_path)
    mask_id = None
    if mask_path is not None:
      label = io.load_nifti(mask_path, what="mask")
      mask_id = _file_id(mask_path)
    if label is not None:
      label = mask_on(vol, label)
      if mask_id is None:
        mask_id = hashlib.sha1(np.packbits(label).tobytes()).hexdigest()
      if mask_augment_seed is not None:
        from megan_jax import edges
        a = translator.config.augment
        label = edges.augment_label(
            label, np.random.default_rng(mask_augment_seed),
            scale_range=a.label_scale, mirror=a.label_mirror,
            axes=(left_right_axis(vol.affine),)) > 0
    # What the translation checks of the input (a constant image on the
    # working grid, a grid too small) fails here, agreed by every process,
    # so a job of several inputs goes on with the next.
    try:
      work, image = translator._prepare(vol, label)
    except InputError as e:
      raise _naming(e, in_path) from None
  except (InputError, OSError) as e:
    error = e
  translator._agree(error, f"input {in_path}")
  if translator.multiprocess:  # or their patches would not fit together
    sharding.assert_same_on_all(_content_digest(vol, label),
                                f"input {in_path}")
  fp = _fingerprint(_file_id(vol.path), mask_id, mask_augment_seed,
                    translator.config.to_dict(), str(translator.dtype),
                    translator.fingerprint, edges_lib.ENGINE)
  lock = folder = None
  try:
    if writer:
      lock = lock_workspace(out_path)
      if lock is None:
        raise InputError(
            f"output {out_path}: another megan translate is writing it (its "
            f"resume folder {workspace_path(out_path)} is locked)")
      folder = workspace_for(out_path, fp)
  except (InputError, OSError) as e:
    error = e
  try:
    translator._agree(error, f"output {out_path}")
    try:
      y = translator._to_input(work, translator.translate_normalised(
          image, work.label, progress=progress, workspace=folder,
          workspace_key=fp, on_batch=on_batch))
    except InputError as e:
      # This input cannot be translated: no resume state to keep.
      if folder:
        discard_workspace(folder)
      raise _naming(e, in_path) from None
    if writer:
      try:
        io.save_nifti(out_path, y, like=vol, inputs=[mask_path])
      except OSError as e:  # a full disk, say: the work is kept
        error = OSError(e.errno, f"{e.strerror or e} (the translated "
                        f"scales are kept in {workspace_path(out_path)}: "
                        "the same command resumes from them)", e.filename)
      except InputError as e:
        error = e
      else:
        discard_workspace(folder)
    translator._agree(error, f"output {out_path}")
  finally:
    if lock is not None:
      os.close(lock)
  if translator.multiprocess:  # nobody returns before the file exists
    from jax.experimental import multihost_utils
    # One name on every process: with node-local copies the inputs' (and
    # so the outputs') names may differ between them.
    multihost_utils.sync_global_devices("megan translate_file")
  return out_path


def _digest(image, label, *extra: bytes):
  """A blake2b hash of an array's voxels and shape, a label mask and
  ``extra`` bytes."""
  h = hashlib.blake2b(digest_size=16)
  data = np.ascontiguousarray(image)
  h.update(repr((data.shape, data.dtype.str)).encode())
  h.update(data.reshape(-1).view(np.uint8))  # no copy
  for b in extra:
    h.update(b)
  if label is not None:
    h.update(np.packbits(np.asarray(label, bool)).tobytes())
  return h


def _array_digest(image, label) -> str:
  """A hex digest of an array's voxels and shape, and of a label mask."""
  return _digest(image, label).hexdigest()


def _content_digest(vol: io.Volume, label) -> np.ndarray:
  """A digest of a source's voxels, grid and label mask (16 bytes as int32s,
  what the processes of a job compare)."""
  h = _digest(vol.data, label, np.asarray(vol.affine, np.float64).tobytes())
  return np.frombuffer(h.digest(), np.int32)


def load(workdir: str, *, devices=None, batch_size: int | str | None = None,
         dtype: str = "float32", which: str = "best") -> Translator:
  """A ``Translator`` of a trained run (its ``best`` generators by default,
  the checkpoints with the lowest validation L1). Only the generators are
  read; in a multi-process job each process reads them onto its own first
  device (orbax would otherwise place them as saved, on device 0, which only
  process 0 has)."""
  devices = sharding.as_devices(devices)  # once: an iterator is read here
  error = None
  try:
    config, gens = state_lib.restore_generators(workdir, which)
    missing = [n for n in state_lib.scale_names(config) if n not in gens]
    if missing:  # here, so that every process of a job hears of it
      raise InputError(f"workdir {workdir}: no generator for scale(s) "
                       f"{', '.join(missing)}; train them first")
    intensity = state_lib.load_intensity(workdir)
    if intensity is None:  # megan train writes it before any checkpoint
      raise InputError(f"workdir {workdir}: no intensity.json (the target "
                       "domain's intensity range); copy it with the run")
  except (InputError, OSError) as e:
    error = e
  # A run unreadable on one node stops all the processes the Translator
  # spans (none but this one when ``devices`` are its own).
  if not sharding.is_local(sharding.make_mesh(devices)):
    sharding.agree(error, f"workdir {workdir}")
  elif error is not None:
    raise error
  t = Translator(config, {n: g for n, (_, g) in gens.items()},
                 intensity=intensity, devices=devices,
                 batch_size=batch_size, dtype=dtype)
  t.checkpoint_steps = {n: int(step) for n, (step, _) in gens.items()}
  t.fingerprint = _fingerprint(os.path.abspath(workdir), t.checkpoint_steps,
                               which)
  return t
