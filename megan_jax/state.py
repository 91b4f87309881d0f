"""Networks, optimisers and the per-scale training state, from a config.

State is data: a ``GanState`` pytree of both networks' parameters, their
optimiser states and the step. Checkpoints hold exactly this pytree (orbax),
two managers per scale: ``latest`` (resume) and ``best`` (lowest validation
L1, the checkpoint inference uses, as in the public code).
"""
from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from megan_jax import models
from megan_jax.errors import InputError


@flax.struct.dataclass
class GanState:
  """One scale's G and D: parameters, optimiser states, step (a scalar)."""
  step: jax.Array
  g_params: Any
  d_params: Any
  g_opt: Any
  d_opt: Any


def scale_names(config) -> list[str]:
  """``["lr", "hr1", ..., "hrN"]``: scale 0 is the LR GAN."""
  return ["lr"] + [f"hr{k}" for k in range(1, config.num_hr_scales + 1)]


def _dtype(config):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
          "bf16": jnp.bfloat16}[config.model.dtype]


def build_generator(config, kind: str, dtype=None):
  """The generator of a scale kind ("lr" or "hr") described by ``config``."""
  m = config.model
  dtype = dtype or _dtype(config)
  if kind == "hr":
    return models.HRGenerator(ngf=m.ngf, n_blocks=m.n_blocks,
                              dropout_rate=m.dropout, dtype=dtype,
                              impl=m.impl)
  if m.lr_generator == "resnet":
    return models.LRResNetGenerator(ngf=m.ngf, n_blocks=m.n_blocks,
                                    dropout_rate=m.dropout, dtype=dtype,
                                    impl=m.impl)
  if m.lr_generator == "unet":
    return models.LRUNetGenerator(ngf=m.ngf, num_levels=m.unet_levels,
                                  dropout_rate=m.dropout, dtype=dtype,
                                  impl=m.impl)
  raise InputError(f"config model.lr_generator={m.lr_generator!r}: "
                   "choose 'unet' or 'resnet'")


def build_discriminator(config, kind: str):
  m = config.model
  return models.PatchDiscriminator(kind=kind, ndf=m.ndf, n_layers=m.d_layers,
                                   norm=m.d_norm, dtype=_dtype(config),
                                   impl=m.impl)


def input_shapes(config, kind: str, batch_size: int = 1):
  """Shapes of a batch's entries for a scale kind (see ``dataset``)."""
  if kind == "lr":
    n = config.lr_size
    return {"edges": (batch_size, 2 * n, 2 * n, 2 * n, 1),
            "target": (batch_size, n, n, n, 1)}
  p = config.patch_size
  shape = (batch_size, p, p, p, 1)
  return {"prev": shape, "edges": shape, "target": shape}


def generator_input(batch, config, kind: str):
  """The generator's input from a batch: LR the sketch; HR previous patch and
  edges as channels (optionally the previous patch's centre upsampled ×2 so
  the two align voxel for voxel: ``hr_condition="upsampled"``; or the edges
  alone, ``hr_condition="none"``: the patch-wise GAN baseline)."""
  if kind == "lr":
    return batch["edges"]
  if config.hr_condition == "none":
    return batch["edges"]
  prev = batch["prev"]
  if config.hr_condition == "upsampled":
    p = config.patch_size
    q = p // 4
    centre = prev[:, q:p - q, q:p - q, q:p - q, :]
    prev = jnp.repeat(jnp.repeat(jnp.repeat(centre, 2, 1), 2, 2), 2, 3)
  elif config.hr_condition != "concat":
    raise InputError(f"config hr_condition={config.hr_condition!r}: choose "
                     "'concat', 'upsampled' or 'none'")
  return jnp.concatenate([prev, batch["edges"]], axis=-1)


def linear_upsampled_centre(prev, patch_size: int):
  """The centre half of previous-scale patches, trilinearly upsampled ×2.

  Output voxel ``i`` of a patch lies at ``q + i/2 - 1/4`` in the previous
  patch's voxel coordinates (``q = p/4``, the margin around the centre; one
  previous voxel is 2³ output voxels), so each output voxel mixes its
  previous voxel (3/4) with the neighbour on its side (1/4), along each
  axis: `resample.upsample2`'s weights, the margin supplying the
  neighbours. ``[B, p, p, p, C] -> [B, p, p, p, C]``.
  """
  p = patch_size
  q = p // 4
  x = prev
  for axis in (1, 2, 3):
    def part(lo, hi, x=x, axis=axis):
      idx = [slice(None)] * x.ndim
      idx[axis] = slice(lo, hi)
      return x[tuple(idx)]
    centre = part(q, p - q)
    even = 0.75 * centre + 0.25 * part(q - 1, p - q - 1)
    odd = 0.75 * centre + 0.25 * part(q + 1, p - q + 1)
    x = jnp.stack([even, odd], axis=axis + 1)
    shape = list(x.shape)
    shape[axis:axis + 2] = [shape[axis] * 2]
    x = x.reshape(shape)
  return x


def generator_output(out, batch, config, kind: str):
  """The scale's image from the generator's output: the output itself, or
  with ``model.hr_residual`` (HR scales; our option, not the paper's) the
  previous patch's centre trilinearly upsampled plus the output, clipped to
  [-1, 1]. The generator then predicts what the previous scale lacks
  instead of the whole intensity again, which its instance norms make
  hard: they take each patch's mean away (measured on the demo: its note
  in `configs.demo`)."""
  if kind != "hr" or not config.model.get("hr_residual", False):
    return out
  if config.hr_condition == "none":
    raise InputError("config model.hr_residual needs the previous scale; "
                     "hr_condition='none' has none")
  base = linear_upsampled_centre(batch["prev"], config.patch_size)
  return jnp.clip(base.astype(out.dtype) + out, -1, 1)


def discriminator_input(batch, image, kind: str, config=None):
  """D sees the condition with the image: HR (edges, prev, image) channels
  ((edges, image) when the generator sees no previous scale); LR the pair
  (edges at 2L, image at L)."""
  if kind == "lr":
    return (batch["edges"], image)
  if config is not None and config.hr_condition == "none":
    return jnp.concatenate([batch["edges"], image], axis=-1)
  return jnp.concatenate([batch["edges"], batch["prev"], image], axis=-1)


def make_optimizer(config) -> optax.GradientTransformation:
  o = config.optim
  if o.decay == "linear":  # constant for the first half, then linearly to 0
    half = max(config.steps // 2, 1)
    lr = optax.join_schedules(
        [optax.constant_schedule(o.lr),
         optax.linear_schedule(o.lr, 0.0, max(config.steps - half, 1))],
        [half])
  elif o.decay == "none":
    lr = o.lr
  else:
    raise InputError(f"config optim.decay={o.decay!r}: 'none' or 'linear'")
  return optax.adam(lr, b1=o.b1, b2=o.b2)


def create_state(rng, config, kind: str) -> GanState:
  """Fresh parameters and optimiser states for a scale kind.

  Compiled as one function, with the non-partitionable threefry: eager
  initialisation compiles every random draw apart (~40 s for the tiny demo
  networks on 2 CPU cores, 4 s this way). Initialisation is not sharded, so
  the partitionable stream would buy nothing here.
  """
  with jax.threefry_partitionable(False):
    return _init_fn(config.to_json(), kind)(rng)


@functools.lru_cache(maxsize=16)
def _init_fn(config_json: str, kind: str):
  config = config_from_json(config_json)
  return jax.jit(lambda rng: _create_state(rng, config, kind))


def _create_state(rng, config, kind: str) -> GanState:
  g, d = build_generator(config, kind), build_discriminator(config, kind)
  shapes = input_shapes(config, kind)
  dummy = {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}
  kg, kd, kdrop = jax.random.split(rng, 3)
  g_params = g.init({"params": kg, "dropout": kdrop},
                    generator_input(dummy, config, kind), train=False)
  d_params = d.init({"params": kd},
                    discriminator_input(dummy, dummy["target"], kind, config),
                    train=False)
  opt = make_optimizer(config)
  return GanState(step=jnp.zeros((), jnp.int32), g_params=g_params,
                  d_params=d_params, g_opt=opt.init(g_params),
                  d_opt=opt.init(d_params))


def abstract_state(config, kind: str) -> GanState:
  """The state's shapes and dtypes, nothing allocated."""
  return jax.eval_shape(lambda k: create_state(k, config, kind),
                        jax.random.key(0))


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


# ---------------------------------------------------------------------------
# Checkpoints and the run's config
# ---------------------------------------------------------------------------
# Fields that make a run what it is: a workdir refuses a config that differs
# in any of them (steps, logging intervals and inference settings may change).
IDENTITY_FIELDS = ("seed", "data", "num_hr_scales", "lr_size", "patch_size",
                   "border", "hr_condition", "edges", "model", "loss", "optim",
                   "augment")


# Fields added after runs were first saved, with the value their absence
# means (what those runs trained with), so such runs still resume.
ADDED_FIELDS = {("augment", "edge_gain"): 0.0, ("model", "hr_residual"): False,
                ("data", "orientation"): ""}


def _identity(config_dict: dict) -> dict:
  out = json.loads(json.dumps({k: config_dict.get(k) for k in IDENTITY_FIELDS},
                              default=list))  # tuples == lists
  for (group, key), value in ADDED_FIELDS.items():
    if isinstance(out.get(group), dict):
      out[group].setdefault(key, value)
  return out


def _diff(a, b, prefix=""):
  if isinstance(a, dict) and isinstance(b, dict):
    for k in sorted(set(a) | set(b)):
      d = _diff(a.get(k), b.get(k), f"{prefix}{k}.")
      if d:
        return d
    return None
  return None if a == b else (prefix.rstrip("."), a, b)


def same_run(a, b) -> bool:
  """Whether two configs describe the same run (all but steps and logging)."""
  return _diff(_identity(json.loads(a.to_json())),
               _identity(json.loads(b.to_json()))) is None


def save_config(workdir: str, config) -> None:
  """Writes ``config.json``, or checks the workdir's run has the same config."""
  from megan_jax import io
  path = os.path.join(workdir, "config.json")
  new = json.loads(config.to_json())
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    d = _diff(_identity(old), _identity(new))
    if d:
      raise InputError(
          f"workdir {workdir}: holds a run of another config ({d[0]} is "
          f"{d[1]!r} there, {d[2]!r} here); use another --workdir, or "
          f"--config.{d[0]}={'' if d[1] is None else d[1]} to go on with it")
    if old.get("steps") == new.get("steps"):
      return
    if new["optim"].get("decay") == "linear":
      raise InputError(
          f"workdir {workdir}: trained for steps={old.get('steps')} with "
          "optim.decay=linear, whose learning rate follows the number of "
          f"steps; steps={new.get('steps')} would change the schedule of the "
          "steps already taken (use another --workdir)")
  os.makedirs(workdir, exist_ok=True)
  with io.atomic_path(path, ".json") as tmp:
    with open(tmp, "w") as f:
      json.dump(new, f, indent=2)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise InputError(f"workdir {workdir}: no config.json (not a megan run)")
  with open(path) as f:
    return config_from_json(f.read())


def config_from_json(text: str) -> ml_collections.ConfigDict:
  """Inverse of ``config.to_json()``."""
  d = json.loads(text)
  for key in ("percentiles", "window"):  # JSON turned these tuples into lists
    d["data"][key] = tuple(d["data"][key])
  for (group, key), value in ADDED_FIELDS.items():  # an older run's config
    if isinstance(d.get(group), dict):
      d[group].setdefault(key, value)
  return ml_collections.ConfigDict(d)


def save_intensity(workdir: str, lo_hi) -> None:
  """The target domain's intensity range (mean over the training volumes):
  translations are written back in it."""
  from megan_jax import io
  with io.atomic_path(os.path.join(workdir, "intensity.json"), ".json") as tmp:
    with open(tmp, "w") as f:
      json.dump({"lo": float(lo_hi[0]), "hi": float(lo_hi[1])}, f)


def load_intensity(workdir: str) -> tuple[float, float] | None:
  path = os.path.join(workdir, "intensity.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    d = json.load(f)
  return d["lo"], d["hi"]


class Checkpoints:
  """``latest`` and ``best`` orbax managers of one scale of a workdir."""

  def __init__(self, workdir: str, scale: str):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    root = os.path.abspath(os.path.join(workdir, "checkpoints", scale))
    self.latest = ocp.CheckpointManager(
        os.path.join(root, "latest"),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
    self.best = ocp.CheckpointManager(
        os.path.join(root, "best"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, best_fn=lambda m: m["val_l1"],
            best_mode="min"))

  def save_latest(self, step: int, state: GanState) -> None:
    self.latest.save(step, args=self._ocp.args.StandardSave(state))

  def save_best(self, step: int, state: GanState, val_l1: float) -> None:
    self.best.save(step, args=self._ocp.args.StandardSave(state),
                   metrics={"val_l1": float(val_l1)})

  def restore(self, abstract: GanState, which: str = "latest"
              ) -> GanState | None:
    """The ``latest`` or ``best`` state, or None if there is none."""
    mngr = self.latest if which == "latest" else self.best
    step = mngr.latest_step() if which == "latest" else mngr.best_step()
    if step is None:
      return None
    return mngr.restore(step, args=self._ocp.args.StandardRestore(abstract))

  def restore_generator(self, abstract_g, which: str = "latest",
                        sharding=None) -> tuple[int, Any] | None:
    """``(step, g_params)`` of the ``latest`` or ``best`` checkpoint, or None
    if there is none. Reads only the generator's parameters (orbax's partial
    restore): what inference needs, in half the time of the whole state and
    without the optimiser moments in memory. ``sharding`` places every array
    (default: as saved)."""
    ocp = self._ocp
    mngr = self.latest if which == "latest" else self.best
    step = mngr.latest_step() if which == "latest" else mngr.best_step()
    if step is None:
      return None
    item = {"step": jax.ShapeDtypeStruct((), jnp.int32), "g_params": abstract_g}
    restore_args = jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(sharding=sharding, dtype=x.dtype), item)
    # A manager of its own: orbax binds a manager to the first kind of
    # restore it serves, and this one is a PyTree restore.
    # Read-only (a run folder may be someone else's); orbax logs a warning
    # for each such manager, which says nothing to our users.
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)
    try:
      reader = ocp.CheckpointManager(
          mngr.directory, options=ocp.CheckpointManagerOptions(read_only=True))
    finally:
      absl_log.setLevel(level)
    try:
      got = reader.restore(step, args=ocp.args.PyTreeRestore(
          item=item, restore_args=restore_args, partial_restore=True))
    finally:
      reader.close()
    return int(got["step"]), got["g_params"]

  def forget_after(self, step: int) -> list[int]:
    """Deletes the ``best`` checkpoints saved after ``step`` (by a run killed
    after its latest checkpoint): a resumed run evaluates those steps again,
    and orbax would refuse a save at a step below one it already holds.
    Returns the steps deleted."""
    gone = [s for s in self.best.all_steps() if s > step]
    for s in gone:
      self.best.delete(s)
    return gone

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()


def restore_generators(workdir: str, which: str = "best", scales=None,
                       sharding=None):
  """``(config, {scale: (step, g_params)})``: the generators of a run, what
  inference needs (``Checkpoints.restore_generator``). ``which="best"`` takes
  per scale its best checkpoint (lowest validation L1) where there is one and
  its latest otherwise; ``"latest"`` the latest. Scales without a checkpoint
  are left out; ``scales`` limits the scales read. Arrays go to ``sharding``
  (default: this process's first device)."""
  config = load_config(workdir)
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  got = {}
  for name in scales or scale_names(config):
    kind = "lr" if name == "lr" else "hr"
    abstract_g = abstract_state(config, kind).g_params
    ckpt = Checkpoints(workdir, name)
    try:
      found = None
      if which == "best":
        found = ckpt.restore_generator(abstract_g, "best", sharding)
      if found is None:
        found = ckpt.restore_generator(abstract_g, "latest", sharding)
    finally:
      ckpt.close()
    if found is not None:
      got[name] = found
  if not got:
    raise InputError(f"workdir {workdir}: no checkpoint found")
  return config, got
