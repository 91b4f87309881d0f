"""Networks, optimisers and the per-scale training state, from a config.

State is data: a ``GanState`` pytree of both networks' parameters, their
optimiser states and the step. Checkpoints hold exactly this pytree (orbax),
two managers per scale: ``latest`` (resume) and ``best`` (lowest validation
L1, the checkpoint inference uses, as in the public code).
"""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import os
import shutil
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from megan_jax import losses, models
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
  name = config.model.dtype
  if name not in DTYPES:
    _fail("model.dtype", "one of " + ", ".join(map(repr, DTYPES)), name)
  return DTYPES[name]


def _check_kind(kind) -> None:
  if kind not in ("lr", "hr"):
    raise ValueError(f"kind {kind!r}: 'lr' or 'hr'")


def build_generator(config, kind: str, dtype=None):
  """The generator of a scale kind ("lr" or "hr") described by ``config``."""
  _check_kind(kind)
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
  """The PatchGAN discriminator of a scale kind ("lr" or "hr")."""
  _check_kind(kind)
  m = config.model
  return models.PatchDiscriminator(kind=kind, ndf=m.ndf, n_layers=m.d_layers,
                                   norm=m.d_norm, dtype=_dtype(config),
                                   impl=m.impl, output=m.d_output)


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
  alone, ``hr_condition="none"``: the patch-wise GAN baseline).

  ``batch`` holds channels-last arrays: ``edges`` ``[B, 2L, 2L, 2L, 1]`` (LR)
  or ``prev`` and ``edges`` ``[B, p, p, p, 1]`` (HR); other shapes are a
  ``ValueError`` saying which (at trace time under ``jit``).
  """
  _check_kind(kind)
  _check_batch(batch, config, kind)
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


def _check_batch(batch, config, kind: str) -> None:
  side = 2 * config.lr_size if kind == "lr" else config.patch_size
  keys = (("edges",) if kind == "lr" or config.hr_condition == "none"
          else ("prev", "edges"))
  for key in keys:
    if key not in batch:
      raise ValueError(f"{kind} batch: no {key!r} (has {sorted(batch)})")
    shape = tuple(batch[key].shape)
    if (len(shape) != 5 or shape[1:] != (side, side, side, 1)):
      raise ValueError(
          f"{kind} batch[{key!r}]: shape {shape}, expected [B, {side}, "
          f"{side}, {side}, 1] (channels last)")


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
  [-1, 1], in float32 (the sum; ``out`` as is without the option). The
  generator then predicts what the previous scale lacks
  instead of the whole intensity again, which its instance norms make
  hard: they take each patch's mean away (measured on the demo: its note
  in `configs.demo`)."""
  if kind != "hr" or not config.model.get("hr_residual", False):
    return out
  if config.hr_condition == "none":
    raise InputError("config model.hr_residual needs the previous scale; "
                     "hr_condition='none' has none")
  # In float32 whatever the compute dtype: the base carries most of the
  # intensity, and in bfloat16 it would be rounded to 8 bits (~0.004 at
  # 1) where only the generator's small residual needs to be.
  base = linear_upsampled_centre(batch["prev"].astype(jnp.float32),
                                 config.patch_size)
  return jnp.clip(base + out.astype(jnp.float32), -1, 1)


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
  # optax.adam, spelled out (the same state) so that a skipped update can
  # keep Adam's part and still advance the schedule's (skip_update).
  return optax.chain(optax.scale_by_adam(b1=o.b1, b2=o.b2),
                     optax.scale_by_learning_rate(lr))


def skip_update(skip, new_opt, old_opt):
  """The optimiser state after an update that ``skip`` drops (D's while it
  is too good): Adam's moments and count as before the step, the
  learning-rate schedule's count advanced all the same, so the rate follows
  the training step as the public code's per-epoch scheduler does, whether
  D updated or not (a schedule counting only D's updates lagged G's and
  never reached 0)."""
  (adam_new, *schedule_new), (adam_old, *_) = new_opt, old_opt
  adam = jax.tree.map(lambda new, old: jnp.where(skip, old, new),
                      adam_new, adam_old)
  return (adam, *schedule_new)


def create_state(rng, config, kind: str) -> GanState:
  """Fresh parameters and optimiser states for a scale kind.

  Compiled as one function, with the non-partitionable threefry: eager
  initialisation compiles every random draw apart (~40 s for the tiny demo
  networks on 2 CPU cores, 4 s this way). Initialisation is not sharded, so
  the partitionable stream would buy nothing here. The config is checked
  first (`check_config`: a clear error, not one from inside the networks).
  """
  check_config(config)
  return _make_state(rng, config, kind)


def _make_state(rng, config, kind: str) -> GanState:
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
  """The state's shapes and dtypes, nothing allocated. Not checked by
  `check_config`: a trained run's saved config restores as it was trained,
  whatever later rules say of fields inference does not use."""
  return jax.eval_shape(lambda k: _make_state(k, config, kind),
                        jax.random.key(0))


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


# ---------------------------------------------------------------------------
# The config's own checks
# ---------------------------------------------------------------------------
HR_CONDITIONS = ("concat", "upsampled", "none")
LR_GENERATORS = ("unet", "resnet")
# Compute dtype names, for `model.dtype` (`_dtype`) and the Translator's.
DTYPES = {"float32": jnp.float32, "fp32": jnp.float32,
          "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}
DECAYS = ("none", "linear")  # `make_optimizer`
# jax.random.key keeps 32 bits of the seed (key(2**32) is key(0)), and the
# batch samplers' numpy generators refuse negative seeds.
MAX_SEED = 2**32 - 1

_MISSING = object()


def lr_size_multiple(config) -> int:
  """What ``lr_size`` must be a multiple of: the LR generator halves its
  ``2 * lr_size`` input ``model.unet_levels`` times (the ResNet: 3 times) and
  the LR discriminator halves ``lr_size`` ``model.d_layers`` times."""
  m = config.model
  halvings = (m.unet_levels if m.lr_generator == "unet"
              else 2 + models.LRResNetGenerator.N_PRE_DOWN)
  return max(2**(halvings - 1), 2**m.d_layers)


def min_patch_size(d_layers: int) -> int:
  """The smallest ``patch_size`` (a multiple of 4) the HR networks take."""
  from megan_jax.models.discriminator import hr_logit_side
  p = 4
  while hr_logit_side(p, d_layers) < 1:
    p += 4
  return p


def _field(config, name: str, default=_MISSING):
  node = config
  for part in name.split("."):
    try:
      has = part in node
    except TypeError:
      has = False
    if not has:
      if default is _MISSING:
        raise InputError(f"config {name}: missing")
      return default
    node = node[part]
  return node


def _fail(name: str, what: str, value):
  raise InputError(f"config {name}: must be {what}, got {value!r}")


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v) -> bool:
  return ((_is_int(v) or isinstance(v, (float, np.floating)))
          and math.isfinite(v))


def _int(config, name: str, lo: int, hi: int | None = None,
         default=_MISSING) -> int:
  v = _field(config, name, default)
  if not _is_int(v) or v < lo or (hi is not None and v > hi):
    _fail(name, f"an integer >= {lo}" if hi is None
          else f"an integer in [{lo}, {hi}]", v)
  return int(v)


def _number(config, name: str, lo: float, hi: float | None = None, *,
            lo_open: bool = False, hi_open: bool = False, why: str = "",
            default=_MISSING) -> float:
  v = _field(config, name, default)
  ok = _is_number(v) and (v > lo if lo_open else v >= lo)
  if ok and hi is not None:
    ok = v < hi if hi_open else v <= hi
  if not ok:
    if hi is None:
      what = f"a number {'>' if lo_open else '>='} {lo:g}"
    else:
      what = (f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}"
              f"{')' if hi_open else ']'}")
    _fail(name, what + (f" ({why})" if why else ""), v)
  return float(v)


def _choice(config, name: str, choices, default=_MISSING) -> str:
  v = _field(config, name, default)
  if not isinstance(v, str) or v not in choices:
    _fail(name, "one of " + ", ".join(repr(c) for c in choices), v)
  return v


def _bool(config, name: str, default=_MISSING) -> bool:
  v = _field(config, name, default)
  if not isinstance(v, (bool, np.bool_)):
    _fail(name, "true or false", v)
  return bool(v)


def _str(config, name: str, default=_MISSING) -> str:
  v = _field(config, name, default)
  if not isinstance(v, str):
    _fail(name, "a string", v)
  return v


def _pair(v) -> bool:
  return (isinstance(v, (tuple, list)) and len(v) == 2
          and all(_is_number(x) for x in v) and v[0] < v[1])


def check_config(config) -> None:
  """Raises an ``InputError`` naming the first field no run can use.

  What each field must be comes from the code that reads it: the networks'
  size constraints (`lr_size_multiple`, `min_patch_size`), the patch grid's
  (``tiling.make_plan``: ``0 <= border``, ``2 * border < patch_size``), the
  samplers' (``seed`` a non-negative 32-bit integer), and each option's
  values. Writes nothing; cheap (no arrays). The fields a translation
  reads are `check_inference_config`'s.
  """
  _str(config, "name", default="")
  _int(config, "seed", 0, MAX_SEED)
  _int(config, "steps", 1)
  check_inference_config(config)
  _check_training_config(config)


def check_inference_config(config) -> None:
  """`check_config` for the fields a translation reads (the cascade's
  networks and geometry, how a volume is read, its edges, ``infer``): what
  a trained run's saved config is held to when it is loaded, so a damaged
  one is one error naming the field, and a field only training reads never
  makes a trained run unreadable."""
  _int(config, "num_hr_scales", 0)

  # The networks first: the sizes below depend on them.
  gen = _choice(config, "model.lr_generator", LR_GENERATORS)
  if gen == "unet":
    _int(config, "model.unet_levels", 2)
  _int(config, "model.ngf", 1)
  _int(config, "model.n_blocks", 0)
  _int(config, "model.ndf", 1)
  d_layers = _int(config, "model.d_layers", 1)
  _choice(config, "model.d_norm", models.layers.NORMS)
  d_output = _choice(config, "model.d_output", models.discriminator.OUTPUTS)
  _number(config, "model.dropout", 0.0, 1.0, hi_open=True)
  _choice(config, "model.dtype", DTYPES)
  _choice(config, "model.impl", models.layers.IMPLS)
  residual = _bool(config, "model.hr_residual", default=False)

  # Geometry of the cascade.
  lr_size = _field(config, "lr_size")
  m = lr_size_multiple(config)
  if not _is_int(lr_size) or lr_size < 1 or lr_size % m:
    why = (f"model.unet_levels={config.model.unet_levels}" if gen == "unet"
           else "model.lr_generator='resnet'")
    _fail("lr_size", f"a positive multiple of {m} (for {why} and "
          f"model.d_layers={d_layers})", lr_size)
  if d_output == "map" and lr_size < 2**(d_layers + 1):
    _fail("lr_size", f">= {2**(d_layers + 1)} (model.d_output='map' with "
          f"model.d_layers={d_layers}: the LR discriminator's map would be "
          "empty)", lr_size)
  p = _field(config, "patch_size")
  p_min = min_patch_size(d_layers)
  if not _is_int(p) or p < p_min or p % 4:
    _fail("patch_size", f"a multiple of 4 (the HR generator halves it twice) "
          f"and >= {p_min} (the HR discriminator, model.d_layers={d_layers})",
          p)
  _int(config, "border", 0, (p - 1) // 2)  # a centre p - 2 * border >= 1
  cond = _choice(config, "hr_condition", HR_CONDITIONS)
  if residual and cond == "none":
    raise InputError("config model.hr_residual needs the previous scale; "
                     "hr_condition='none' has none")

  # Data: how a volume is read and normalised.
  suffix = _str(config, "data.label_suffix", default="")
  from megan_jax import grid
  grid.check_orientation(_str(config, "data.orientation", default=""))
  _number(config, "data.spacing", 0.0, why="isotropic mm; 0 keeps each "
          "file's voxel size")
  pct = _field(config, "data.percentiles")
  if not _pair(pct) or pct[0] < 0 or pct[1] > 100:
    _fail("data.percentiles", "a pair (lo, hi) with 0 <= lo < hi <= 100", pct)
  window = _field(config, "data.window", default=())
  if not (isinstance(window, (tuple, list)) and not window) and not _pair(
      window):
    _fail("data.window", "() or a pair (lo, hi) with lo < hi", window)

  # Edges: thresholds are fractions of the largest gradient magnitude.
  _number(config, "edges.sigma", 0.0)
  low = _number(config, "edges.low", 0.0, 1.0)
  high = _number(config, "edges.high", 0.0, 1.0, hi_open=True,
                 why="at 1 no voxel is strong: an empty sketch")
  if low > high:
    _fail("edges.low", f"<= edges.high ({high:g})", low)
  if _bool(config, "edges.use_label") and not suffix:
    raise InputError("config edges.use_label needs data.label_suffix (the "
                     "label of x.nii.gz is x{suffix}.nii.gz, e.g. '_seg')")
  _int(config, "infer.batch_size", 1, default=1)
  _int(config, "infer.memmap_bytes", 0, default=0)
  _bool(config, "infer.overlap_edges", True)


def _check_training_config(config) -> None:
  """`check_config`'s fields that only training reads."""
  _str(config, "data.path")
  _str(config, "data.val_path", default="")
  _number(config, "data.foreground", -1.0, 1.0, hi_open=True,
          why="images are in [-1, 1]")
  _number(config, "data.uniform_patch_fraction", 0.0, 1.0)

  _choice(config, "loss.gan", losses.GAN_KINDS)
  l1 = _number(config, "loss.l1_weight", 0.0)
  gan = _number(config, "loss.gan_weight", 0.0)
  if l1 == 0 and gan == 0:
    _fail("loss.gan_weight", "> 0 where loss.l1_weight is 0 (the generator "
          "would learn nothing)", gan)
  _number(config, "loss.d_skip_accuracy", 0.0, 1.0)

  _number(config, "optim.lr", 0.0, lo_open=True)
  _number(config, "optim.b1", 0.0, 1.0, hi_open=True)
  _number(config, "optim.b2", 0.0, 1.0, hi_open=True)
  _choice(config, "optim.decay", DECAYS)

  _number(config, "augment.prev_noise_std", 0.0)
  _number(config, "augment.blur_prob", 0.0, 1.0)
  _number(config, "augment.halfres_prob", 0.0, 1.0)
  _number(config, "augment.edge_noise_std", 0.0)
  _number(config, "augment.edge_gain", 0.0, 1.0, default=0.0)
  _number(config, "augment.label_scale", 0.0, 1.0, hi_open=True)
  _bool(config, "augment.label_mirror")

  for name in ("lr_batch_size", "hr_batch_size", "log_every",
               "checkpoint_every", "eval_every", "montage_every",
               "val_patches"):
    _int(config, f"train.{name}", 1)


# ---------------------------------------------------------------------------
# Checkpoints and the run's config
# ---------------------------------------------------------------------------
# Fields that make a run what it is: a workdir refuses a config that differs
# in any of them (steps, logging and checkpoint intervals and inference
# settings may change).
IDENTITY_FIELDS = ("seed", "data", "num_hr_scales", "lr_size", "patch_size",
                   "border", "hr_condition", "edges", "model", "loss", "optim",
                   "augment")
# And of train: the batches (another batch is another run: its steps, and
# a resume no longer equals the uninterrupted run) and the validation
# patches (``best`` compares scores on one validation set).
IDENTITY_TRAIN_FIELDS = ("lr_batch_size", "hr_batch_size", "val_patches")


# Fields added after runs were first saved, with the value their absence
# means (what those runs trained with), so such runs still resume.
ADDED_FIELDS = {("augment", "edge_gain"): 0.0, ("model", "hr_residual"): False,
                ("data", "orientation"): "", ("model", "d_output"): "code"}


def _identity(config_dict: dict) -> dict:
  out = json.loads(json.dumps({k: config_dict.get(k) for k in IDENTITY_FIELDS},
                              default=list))  # tuples == lists
  train = config_dict.get("train")
  if isinstance(train, dict):
    out["train"] = {k: train.get(k) for k in IDENTITY_TRAIN_FIELDS}
  for (group, key), value in ADDED_FIELDS.items():
    if isinstance(out.get(group), dict):
      out[group].setdefault(key, value)
  return out


def _diffs(a, b, prefix=""):
  """Every ``(field, a's value, b's value)`` where two config dicts differ,
  in field order."""
  if isinstance(a, dict) and isinstance(b, dict):
    for k in sorted(set(a) | set(b)):
      yield from _diffs(a.get(k), b.get(k), f"{prefix}{k}.")
  elif a != b:
    yield (prefix.rstrip("."), a, b)


def _diff(a, b, prefix=""):
  return next(_diffs(a, b, prefix), None)


def same_run(a, b) -> bool:
  """Whether two configs describe the same run (all but steps and logging)."""
  return _diff(_identity(json.loads(a.to_json())),
               _identity(json.loads(b.to_json()))) is None


def checkpointed_step(workdir: str, scale: str) -> int | None:
  """The step of ``scale``'s latest checkpoint in ``workdir`` (None if it
  has none), read from the folder names: nothing is opened or made."""
  folder = os.path.join(workdir, "checkpoints", scale, "latest")
  try:
    steps = [int(n) for n in os.listdir(folder) if n.isdigit()]
  except OSError:
    return None
  return max(steps, default=None)


def check_workdir(workdir: str, config) -> bool:
  """Raises an ``InputError`` if ``workdir`` holds a run that ``config`` may
  not go on with; returns whether ``config.json`` is to be (re)written
  (``False``: it says exactly this config already). Writes nothing."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return True
  new = json.loads(config.to_json())
  old = _read_json(path)
  for group, value in new.items():  # a section that is no object: damaged
    if isinstance(value, dict) and not isinstance(old.get(group, {}), dict):
      raise InputError(f"{path}: damaged, {group} is not an object")
  for key in ("path", "val_path"):  # the same folder, named another way
    a, b = old.get("data", {}).get(key), new["data"].get(key)
    if (isinstance(a, str) and isinstance(b, str) and a and b and a != b
        and os.path.realpath(a) == os.path.realpath(b)):
      old["data"][key] = b
  diffs = list(_diffs(_identity(old), _identity(new)))
  if diffs:
    (field, there, here), rest = diffs[0], [d[0] for d in diffs[1:]]
    name = old.get("name")
    what = "another config"
    if isinstance(name, str) and name:
      what = (f"config {name!r} with other settings"
              if name == new.get("name") else f"config {name!r}")
    if not rest:
      raise InputError(
          f"workdir {workdir}: holds a run of {what} ({field} is {there!r} "
          f"there, {here!r} here); use another --workdir, or "
          f"--config.{field}={'' if there is None else there} to go on "
          "with it")
    more = ", ".join(rest[:5]) + (f" and {len(rest) - 5} more"
                                  if len(rest) > 5 else "")
    raise InputError(
        f"workdir {workdir}: holds a run of {what}, {len(diffs)} fields "
        f"differ ({field} is {there!r} there, {here!r} here; also {more}); "
        "use another --workdir")
  if old.get("steps") == new.get("steps"):
    # The same run: config.json is rewritten where a field that may change
    # (logging, inference settings) did, so it says what the run goes on
    # with.
    return old != new
  if new["optim"].get("decay") == "linear":
    raise InputError(
        f"workdir {workdir}: trained for steps={old.get('steps')} with "
        "optim.decay=linear, whose learning rate follows the number of "
        f"steps; steps={new.get('steps')} would change the schedule of the "
        "steps already taken (use another --workdir)")
  return True


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds ``workdir/.lock`` (an exclusive ``flock``, released when the
  process ends, however it ends): a second ``megan train`` on the same
  workdir is one ``InputError`` instead of two runs writing the same
  checkpoints. Makes the workdir."""
  import fcntl
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, ".lock"), "a") as f:
    try:
      fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      raise InputError(f"workdir {workdir}: another megan train is using "
                       "it") from None
    try:
      yield
    finally:
      fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def save_config(workdir: str, config) -> None:
  """Writes ``config.json``, or checks the workdir's run has the same config.

  The config is checked first (`check_config`): a run folder never holds one
  that cannot train.
  """
  from megan_jax import io
  check_config(config)
  if not check_workdir(workdir, config):
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  with io.atomic_path(path, ".json") as tmp:
    with open(tmp, "w") as f:
      json.dump(json.loads(config.to_json()), f, indent=2)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.isdir(workdir):
    raise InputError(f"workdir {workdir}: " + (
        "not a folder" if os.path.exists(workdir) else "no such folder"))
  if not os.path.exists(path):
    raise InputError(f"workdir {workdir}: no config.json (not a megan run)")
  try:
    config = config_from_json(json.dumps(_read_json(path)))
  except KeyError as e:
    raise InputError(f"{path}: not a megan config (no field {e})") from None
  except (TypeError, ValueError) as e:
    raise InputError(f"{path}: not a megan config ({e})") from None
  try:  # the fields a translation reads (not training's: see the check)
    check_inference_config(config)
  except InputError as e:
    raise InputError(f"{path}: {e}") from None
  return config


def _read_json(path: str) -> dict:
  """A JSON object from ``path``; a damaged file is one ``InputError``."""
  try:
    with open(path) as f:
      d = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise InputError(f"{path}: damaged, not valid JSON ({e})") from None
  if not isinstance(d, dict):
    raise InputError(f"{path}: damaged, expected a JSON object")
  return d


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
  d = _read_json(path)
  try:
    lo, hi = float(d["lo"]), float(d["hi"])
  except (KeyError, TypeError, ValueError):
    raise InputError(f"{path}: damaged, expected numbers lo and hi") from None
  if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
    raise InputError(f"{path}: damaged, intensity range [{lo:g}, {hi:g}] is "
                     "empty or not finite")
  return lo, hi


# A checkpoint save is refused where the disk has less room than
# (factor x its arrays' bytes + bytes): orbax's metadata and zarr chunks.
SAVE_SPACE_MARGIN = (1.1, 4 * 2**20)


def _best_score(metrics: dict) -> float:
  """The ``best`` manager's score: validation L1, lower is better. A
  diverged run's NaN is worst (inf): orbax would otherwise keep the NaN step
  as the best and delete the good one."""
  v = float(metrics["val_l1"])
  return v if math.isfinite(v) else math.inf


class Checkpoints:
  """``latest`` and ``best`` orbax managers of one scale of a workdir.
  ``read_only``: makes no folder and writes nothing (reading a run that may
  be someone else's, or on a read-only share)."""

  def __init__(self, workdir: str, scale: str, read_only: bool = False):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    # A save that fails (a full disk) leaves the same closed-loop reports
    # as a failed read.
    _drop_closed_loop_reports()
    root = os.path.abspath(os.path.join(workdir, "checkpoints", scale))
    self.root = root
    mode = dict(read_only=True) if read_only else dict(create=True)
    self.latest = ocp.CheckpointManager(
        os.path.join(root, "latest"),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, **mode))
    self.best = ocp.CheckpointManager(
        os.path.join(root, "best"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=_best_score, best_mode="min", **mode))

  def save_latest(self, step: int, state: GanState) -> None:
    self.check_space(state)
    self.latest.save(step, args=self._ocp.args.StandardSave(state))

  def save_best(self, step: int, state: GanState, val_l1: float) -> None:
    self.check_space(state)
    self.best.save(step, args=self._ocp.args.StandardSave(state),
                   metrics={"val_l1": float(val_l1)})

  def check_space(self, state: GanState) -> None:
    """An ``OSError`` (ENOSPC) naming the checkpoint folder where its disk
    has less room than a save of ``state`` takes (its arrays' bytes, with
    ``SAVE_SPACE_MARGIN``). Orbax writes in background threads; where the
    disk fills up under them, their failures reach stderr as hundreds of
    lines of tracebacks before ours."""
    need = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(state) if hasattr(x, "dtype"))
    need = int(need * SAVE_SPACE_MARGIN[0]) + SAVE_SPACE_MARGIN[1]
    try:
      usage = shutil.disk_usage(self.root)
    except OSError:  # not made yet, or no such call: orbax will say
      return
    free = usage.free
    if usage.total and free < need:  # (total 0: a file system with no size)
      raise OSError(errno.ENOSPC, (
          f"No space left on device for a checkpoint ({free / 2**20:,.1f} "
          f"MiB free, a save takes ~{need / 2**20:,.1f} MiB)"), self.root)

  def _step(self, which: str):
    """``(manager, step)`` of the ``latest`` or ``best`` checkpoint (step
    None if there is none)."""
    check_which(which)
    if which == "latest":
      return self.latest, self.latest.latest_step()
    return self.best, self.best.best_step()

  def restore(self, abstract: GanState, which: str = "latest",
              sharding=None) -> GanState | None:
    """The ``latest`` or ``best`` state, or None if there is none. Every
    array goes to ``sharding`` (default: this process's first device), not
    to the devices it was saved from: a run trained on 2 GPUs resumes on
    1."""
    mngr, step = self._step(which)
    if step is None:
      return None
    if sharding is None:
      sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
        abstract)
    _drop_closed_loop_reports()
    try:
      return mngr.restore(step, args=self._ocp.args.StandardRestore(abstract))
    except Exception as e:  # damaged files, or another network's shapes
      raise unreadable_checkpoint(
          os.path.join(mngr.directory, str(step)), e) from None

  def restore_generator(self, abstract_g, which: str = "latest",
                        sharding=None) -> tuple[int, Any] | None:
    """``(step, g_params)`` of the ``latest`` or ``best`` checkpoint, or None
    if there is none. Reads only the generator's parameters (orbax's partial
    restore): what inference needs, in half the time of the whole state and
    without the optimiser moments in memory. ``sharding`` places every array
    (default: this process's first device, as `restore`)."""
    ocp = self._ocp
    mngr, step = self._step(which)
    if step is None:
      return None
    if sharding is None:
      sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    _drop_closed_loop_reports()
    item = {"step": jax.ShapeDtypeStruct((), jnp.int32), "g_params": abstract_g}
    restore_args = jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(sharding=sharding, dtype=x.dtype), item)
    # A manager of its own: orbax binds a manager to the first kind of
    # restore it serves, and this one is a PyTree restore.
    # Read-only (a run folder may be someone else's). Orbax logs a warning
    # for each such manager, and what it finds damaged, on stderr: our
    # one-line error says it instead.
    with quiet_orbax():
      reader = ocp.CheckpointManager(
          mngr.directory, options=ocp.CheckpointManagerOptions(read_only=True))
      try:
        got = reader.restore(step, args=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True))
      except Exception as e:  # damaged files, or another network's shapes
        raise unreadable_checkpoint(
            os.path.join(mngr.directory, str(step)), e) from None
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

  def finish(self) -> None:
    """Waits for both managers' saves and closes both, each even where
    another failed (a full disk: a save left running in the background
    outlives the process's event loop and floods stderr), then raises the
    first error."""
    first = None
    for call in (self.latest.wait_until_finished,
                 self.best.wait_until_finished, self.latest.close,
                 self.best.close):
      try:
        call()
      except Exception as e:
        first = first or e
    if first is not None:
      raise first


def unreadable_checkpoint(path: str, error: BaseException) -> InputError:
  """The one-line error for a checkpoint orbax failed to read: its folder
  and the innermost cause (where tensorstore says which file and what is
  wrong; the outer ones wrap it in a dump of the store's spec)."""
  seen, root = set(), error
  while id(root) not in seen:
    seen.add(id(root))
    nxt = root.__cause__ or (None if root.__suppress_context__
                             else root.__context__)
    if nxt is None:
      break
    root = nxt
  text = " ".join(f"{type(root).__name__}: {root}".split())
  if len(text) > 300:
    text = text[:297] + "..."
  return InputError(f"checkpoint {path}: unreadable ({text})")


def _drop_closed_loop_reports() -> None:
  """When one array of a checkpoint fails to read, orbax closes its event
  loop while tensorstore's other reads still complete on it: each reports
  ``RuntimeError: Event loop is closed``, and at exit each of orbax's
  read coroutines left pending reports that it was never finished (dozens
  of tracebacks around our one line), all through ``sys.unraisablehook``.
  Installs, once, a hook that drops just those and passes everything else
  to the hook before it. Called before every restore: the reports can come
  before the failure reaches us."""
  import sys
  previous = sys.unraisablehook
  if getattr(previous, "_megan_drops_closed_loop", False):
    return

  def hook(unraisable):
    if (unraisable.exc_type is RuntimeError
        and str(unraisable.exc_value) == "Event loop is closed"):
      return
    code = getattr(unraisable.object, "cr_code", None)  # a coroutine's
    if f"{os.sep}orbax{os.sep}" in getattr(code, "co_filename", ""):
      return
    previous(unraisable)
  hook._megan_drops_closed_loop = True
  sys.unraisablehook = hook


def quiet_orbax():
  """Orbax's log (absl) off stderr meanwhile."""
  from megan_jax import io
  return io.quiet_log("absl")


def restore_generators(workdir: str, which: str = "best", scales=None,
                       sharding=None):
  """``(config, {scale: (step, g_params)})``: the generators of a run, what
  inference needs (``Checkpoints.restore_generator``). ``which="best"`` takes
  per scale its best checkpoint (lowest validation L1) where there is one and
  its latest otherwise; ``"latest"`` the latest. Scales without a checkpoint
  are left out; ``scales`` limits the scales read. Arrays go to ``sharding``
  (default: this process's first device)."""
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def read(ckpt, config, kind):
    abstract_g = abstract_state(config, kind).g_params
    found = ckpt.restore_generator(abstract_g, which, sharding)
    if found is None and which == "best":
      found = ckpt.restore_generator(abstract_g, "latest", sharding)
    return found
  return read_scales(workdir, read, which, scales)


def check_which(which: str) -> None:
  if which not in ("best", "latest"):
    raise InputError(f"which={which!r}: 'best' or 'latest'")


def read_scales(workdir: str, read, which: str = "latest", scales=None):
  """``(config, {scale: read(checkpoints, config, kind)})`` over the run's
  scales (or ``scales``), leaving out those ``read`` returns None for; an
  ``InputError`` if that is all of them."""
  check_which(which)
  config = load_config(workdir)
  got = {}
  for name in scales or scale_names(config):
    if not os.path.isdir(os.path.join(workdir, "checkpoints", name)):
      continue  # never trained (and nothing is made for it here)
    with quiet_orbax():
      ckpt = Checkpoints(workdir, name, read_only=True)
    try:
      found = read(ckpt, config, "lr" if name == "lr" else "hr")
    finally:
      ckpt.close()
    if found is not None:
      got[name] = found
  if not got:
    raise InputError(f"workdir {workdir}: no {which} checkpoint found")
  return config, got
