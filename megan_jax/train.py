"""Per-scale GAN training: one jit-compiled step per scale kind, resumable.

Each scale trains on its own (HR scale k is conditioned on the *real*, augmented
scale k-1 volume, as in the paper), so scales can be trained in any order or
on different machines. ``train_step(state, batch, rng) -> (state, metrics)``
is pure: the step's randomness is ``fold_in(rng, state.step)`` and its batch
comes from a generator seeded by ``(seed, scale, step)``, so a run killed and
resumed from its latest checkpoint gives the same parameters as one that was
never stopped.
"""
from __future__ import annotations

import functools
import os
import shutil
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from megan_jax import augment, dataset, losses, sharding
from megan_jax import state as state_lib
from megan_jax.errors import InputError
from megan_jax.state import GanState


# ---------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------
def augment_inputs(batch, key, config, kind: str):
  """Training-time augmentation of the conditioning (not of the target)."""
  a = config.augment
  k_prev, k_edges = jax.random.split(key)
  out = dict(batch)
  out["edges"] = augment.augment_edges(k_edges, batch["edges"],
                                       a.edge_noise_std,
                                       a.get("edge_gain", 0.0))
  if kind == "hr":
    out["prev"] = augment.augment_previous(
        k_prev, batch["prev"], noise_std=a.prev_noise_std,
        blur_prob=a.blur_prob, halfres_prob=a.halfres_prob)
  return out


def train_step(state: GanState, batch, rng, *, config, kind: str,
               g_model, d_model, optimizer):
  """One pix2pix update of D, then G, on one batch.

  Args:
    state: the scale's ``GanState``.
    batch: ``dataset.sample_*_batch`` output (jax or numpy arrays).
    rng: the scale's base key; the step folds in ``state.step``.
    config, kind, g_model, d_model, optimizer: static, bound by ``partial``.

  Returns:
    ``(new_state, metrics)``, metrics a dict of scalars.
  """
  rng = jax.random.fold_in(rng, state.step)
  k_aug, k_drop = jax.random.split(rng)
  batch = augment_inputs(batch, k_aug, config, kind)
  real = batch["target"]
  x = state_lib.generator_input(batch, config, kind)
  gan_kind = config.loss.gan

  # G forward once; its VJP serves G's update after D's.
  def g_fwd(g_params):
    out = g_model.apply(g_params, x, train=True, rngs={"dropout": k_drop})
    return state_lib.generator_output(out, batch, config, kind)
  fake, g_vjp = jax.vjp(g_fwd, state.g_params)
  fake_f32 = fake.astype(jnp.float32)

  def d_logits(d_params, image):
    logits, _ = d_model.apply(
        d_params, state_lib.discriminator_input(batch, image, kind, config),
        train=True)
    return logits.astype(jnp.float32)

  def d_loss_fn(d_params):
    real_logits = d_logits(d_params, real)
    fake_logits = d_logits(d_params, jax.lax.stop_gradient(fake_f32))
    loss, parts = losses.discriminator_loss(real_logits, fake_logits,
                                            kind=gan_kind)
    acc = losses.discriminator_accuracy(real_logits, fake_logits, gan_kind)
    return loss, (parts, acc)

  (d_loss, (d_parts, d_acc)), d_grads = jax.value_and_grad(
      d_loss_fn, has_aux=True)(state.d_params)
  d_updates, d_opt = optimizer.update(d_grads, state.d_opt, state.d_params)
  d_params = jax.tree.map(jnp.add, state.d_params, d_updates)
  # The public code skips D's update while D is too good (accuracy > 0.8).
  threshold = config.loss.d_skip_accuracy
  skip = (d_acc > threshold) if threshold > 0 else jnp.asarray(False)
  keep_old = lambda new, old: jnp.where(skip, old, new)
  d_params = jax.tree.map(keep_old, d_params, state.d_params)
  d_opt = state_lib.skip_update(skip, d_opt, state.d_opt)

  def g_loss_fn(fake_img):
    fake_logits = d_logits(d_params, fake_img)
    _, parts = losses.generator_loss(fake_logits, fake_img, real,
                                     kind=gan_kind)
    total = (config.loss.gan_weight * parts["gan"]
             + config.loss.l1_weight * parts["l1"])
    return total, parts

  (g_loss, g_parts), dfake = jax.value_and_grad(g_loss_fn, has_aux=True)(
      fake_f32)
  (g_grads,) = g_vjp(dfake.astype(fake.dtype))
  g_updates, g_opt = optimizer.update(g_grads, state.g_opt, state.g_params)
  g_params = jax.tree.map(jnp.add, state.g_params, g_updates)

  new_state = GanState(step=state.step + 1, g_params=g_params,
                       d_params=d_params, g_opt=g_opt, d_opt=d_opt)
  metrics = {"g_loss": g_loss, "g_gan": g_parts["gan"], "g_l1": g_parts["l1"],
             "d_loss": d_loss, "d_real": d_parts["real"],
             "d_fake": d_parts["fake"], "d_acc": d_acc,
             "d_skipped": skip.astype(jnp.float32)}
  return new_state, metrics


def make_train_step(config, kind: str, donate: bool = True) -> Callable:
  """The jit-compiled ``train_step(state, batch, rng)`` of a scale kind.

  With ``donate`` (the default, what the training loop wants) the input
  state's buffers are reused for the new state: the old one is deleted by
  the call. Pass ``donate=False`` to call it again on the same state. One
  function per (config, kind, donate): every HR scale of a run, and a
  resumed run in the same process, reuse one compilation.
  """
  return _train_step_cached(config.to_json(), kind, donate)


@functools.lru_cache(maxsize=16)
def _train_step_cached(config_json: str, kind: str, donate: bool):
  config = state_lib.config_from_json(config_json)
  state_lib.check_config(config)  # a clear error before any tracing (once)
  step = functools.partial(
      train_step, config=config, kind=kind,
      g_model=state_lib.build_generator(config, kind),
      d_model=state_lib.build_discriminator(config, kind),
      optimizer=state_lib.make_optimizer(config))
  return jax.jit(step, donate_argnums=(0,) if donate else ())


def make_eval_fn(config, kind: str) -> Callable:
  """jit-compiled ``(g_params, batch) -> generated`` in inference mode."""
  return _eval_fn_cached(config.to_json(), kind)


@functools.lru_cache(maxsize=16)
def _eval_fn_cached(config_json: str, kind: str):
  config = state_lib.config_from_json(config_json)
  g = state_lib.build_generator(config, kind)

  def generate(g_params, batch):
    x = state_lib.generator_input(batch, config, kind)
    out = g.apply(g_params, x, train=False)
    return state_lib.generator_output(out, batch, config,
                                      kind).astype(jnp.float32)
  return jax.jit(generate)


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------
def scale_index(name: str) -> int:
  return 0 if name == "lr" else int(name[2:])


def sample_batch(subjects, config, scale: int, step: int):
  rng = dataset.step_rng(config.seed, scale, step)
  if scale == 0:
    return dataset.sample_lr_batch(subjects, config.train.lr_batch_size, rng)
  return dataset.sample_hr_batch(subjects, scale, config.train.hr_batch_size,
                                 config.patch_size, rng,
                                 config.data.uniform_patch_fraction)


def validation_batches(subjects, config, scale: int):
  """Fixed validation batches (seeded apart from the training steps)."""
  rng = dataset.step_rng(config.seed, scale, 0, stream=1)
  if scale == 0:
    return [dataset.sample_lr_batch([s], 1, rng) for s in subjects]
  n = max(config.train.val_patches, 1)
  return [dataset.sample_hr_batch(subjects, scale, n, config.patch_size, rng)]


def _montage(path, batch, fake, kind):
  from megan_jax import writers
  vols = {"edges": batch["edges"][0, ..., 0] * 2.0 - 1.0}
  if kind == "hr":
    vols["previous"] = batch["prev"][0, ..., 0]
  vols["generated"] = np.asarray(fake[0, ..., 0])
  vols["real"] = batch["target"][0, ..., 0]
  return writers.montage(vols, path)


def train_scale(config, workdir: str, scale: str, subjects, val_subjects, *,
                progress: bool = True, stop_after: int | None = None
                ) -> GanState:
  """Trains (or resumes) one scale to ``config.steps`` steps.

  Args:
    config: the run's config.
    workdir: the run folder (checkpoints/, logs/, montages/ inside).
    scale: "lr" or "hrK".
    subjects, val_subjects: ``dataset.Subject`` lists.
    progress: show a tqdm bar.
    stop_after: stop (as if killed) after this many steps of this call; for
      tests of resuming.

  Returns:
    The final state.
  """
  from tqdm import tqdm
  from megan_jax import writers
  k = scale_index(scale)
  kind = "lr" if k == 0 else "hr"
  ckpt = state_lib.Checkpoints(workdir, scale)
  base = jax.random.fold_in(jax.random.key(config.seed), k)
  abstract = state_lib.abstract_state(config, kind)
  mesh = sharding.make_mesh()
  # Onto this run's devices, whichever the checkpoint was saved from.
  state = ckpt.restore(abstract, "latest", sharding.replicated(mesh))
  if state is None:
    state = state_lib.create_state(jax.random.fold_in(base, -1 % 2**31),
                                   config, kind)
  start = int(state.step)
  ckpt.forget_after(start)  # the steps after it run (and are judged) again
  state = sharding.replicate(state, mesh)
  step_fn = make_train_step(config, kind)
  eval_fn = make_eval_fn(config, kind)
  val = validation_batches(val_subjects, config, k)
  logdir = os.path.join(workdir, "logs", scale)
  writer = writers.create_default_writer(logdir)
  # A killed run's logs of the steps after its checkpoint (all of them when
  # it was killed before its first) go: those steps are logged again.
  writer.resume_from(start)
  montage_dir = os.path.join(workdir, "montages")
  os.makedirs(montage_dir, exist_ok=True)
  t = config.train
  bar = tqdm(range(start, config.steps), initial=start, total=config.steps,
             desc=f"train {scale}", unit="step", disable=not progress,
             dynamic_ncols=True)
  notes = [f"{scale}: resuming from step {start}"] if start else []
  n_dev = mesh.devices.size
  batch = t.lr_batch_size if kind == "lr" else t.hr_batch_size
  if n_dev > 1 and batch % n_dev:  # sharding.shard_batch replicates it
    field = "lr_batch_size" if kind == "lr" else "hr_batch_size"
    notes.append(
        f"{scale}: batch {batch} does not divide over the {n_dev} devices: "
        f"each computes the whole batch (a multiple of {n_dev}, "
        f"--config.train.{field}, splits it)")
  for note in notes:  # said with or without the bar (`--quiet` too)
    if progress:
      bar.write(note)
    else:
      print(note, file=sys.stderr)
  finished = False
  try:
    done = 0
    tick, tick_step = time.perf_counter(), start
    for step in bar:
      batch = sharding.shard_batch(sample_batch(subjects, config, k, step),
                                   mesh)
      state, metrics = step_fn(state, batch, base)
      n = step + 1
      last = n == config.steps
      logged = n % t.log_every == 0 or last
      if logged:
        metrics = {key: float(v) for key, v in metrics.items()}
        now = time.perf_counter()  # the first interval includes compiling
        metrics["sec_per_step"] = (now - tick) / (n - tick_step)
        tick_step = n
        writer.write_scalars(n, metrics)
        bar.set_postfix(g=f"{metrics['g_loss']:.3f}",
                        l1=f"{metrics['g_l1']:.3f}",
                        d=f"{metrics['d_loss']:.3f}")
      if n % t.eval_every == 0 or last:
        l1s = [float(jnp.mean(jnp.abs(eval_fn(state.g_params, b)
                                      - b["target"]))) for b in val]
        val_l1 = float(np.mean(l1s))
        writer.write_scalars(n, {"val_l1": val_l1})
        ckpt.save_best(n, state, val_l1)
      if n % t.montage_every == 0 or last:
        b = val[0]
        image = _montage(os.path.join(montage_dir, f"{scale}_{n:06d}.png"), b,
                         eval_fn(state.g_params, b), kind)
        writer.write_images(n, {"montage": image})
      if n % t.checkpoint_every == 0 or last:
        # Step n's logs and montage on disk before the checkpoint a resume
        # starts after: a process killed once it is saved loses none.
        writer.flush()
        ckpt.save_latest(n, state)
      if logged:  # the next interval times steps alone, not this one's
        tick = time.perf_counter()  # validation, montage and checkpoint
      done += 1
      if stop_after is not None and done >= stop_after:
        break
    finished = True
  finally:
    bar.close()
    try:  # interrupted too: a save under way ends before the process does
      ckpt.finish()
    except Exception:
      if finished:
        raise  # else what stopped the steps is the error to report
    writer.close()
  return state


def train(config, workdir: str, scales: str = "all", *, progress: bool = True,
          stop_after: int | None = None) -> dict[str, GanState]:
  """Trains the scales ``scales`` ("all", "lr", "1", "2", ...) of a run.

  Checks the config (`state.check_config`) and the workdir (one holding
  another config's run is refused), then loads the datasets, and only then
  writes ``workdir/config.json``: a run that fails before training leaves
  the workdir as it was (a folder it made, or a sketch cache it started, is
  removed again), so the corrected command can run there. Data paths are
  kept absolute (the run resumes from any folder); one ``megan train`` at a
  time holds a workdir (`state.workdir_lock`). ``config`` may also be a
  config's name (``configs.get_config``: "demo:smoke", a file), ``scales``
  a scale's number.
  """
  if isinstance(config, str):
    from megan_jax import configs
    config = configs.get_config(config)
  if not isinstance(config, ml_collections.ConfigDict):
    raise InputError(f"config: an ml_collections.ConfigDict (from "
                     f"configs.get_config) or a config's name, got "
                     f"{type(config).__name__}")
  if not isinstance(workdir, (str, os.PathLike)):
    raise InputError(f"workdir: a folder path, got {type(workdir).__name__}")
  workdir = os.fspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise InputError(f"workdir {workdir}: exists and is not a folder")
  if isinstance(scales, (int, np.integer)) and not isinstance(scales, bool):
    scales = str(int(scales))  # train(config, wd, 1): scale 1
  if not isinstance(scales, str):
    raise InputError(f"scales {scales!r}: a string, 'all', 'lr' or a scale "
                     "number such as '1'")
  if stop_after is not None and (isinstance(stop_after, bool) or not
                                 isinstance(stop_after, int)
                                 or stop_after < 1):
    raise InputError(f"stop_after {stop_after!r}: None or an integer >= 1")
  state_lib.check_config(config)
  config = _absolute_data_paths(config)
  names = state_lib.scale_names(config)
  if scales == "all":
    chosen = names
  else:
    want = ("lr" if scales in ("lr", "0") else
            scales if scales.startswith("hr") else f"hr{scales}")
    if want not in names:
      raise InputError(f"--scale {scales}: this config has scales "
                       f"{', '.join(['lr'] + [n[2:] for n in names[1:]])}")
    chosen = [want]
  state_lib.check_workdir(workdir, config)
  for name in names:  # config.json's steps must not fall below a scale's
    done = state_lib.checkpointed_step(workdir, name)
    if done is not None and done > config.steps:
      raise InputError(
          f"workdir {workdir}: scale {name} is trained to step {done} "
          f"already; steps={config.steps} is below it (steps is one value "
          f"for the whole run, whichever scale is trained: give steps >= "
          f"{done}, or another --workdir)")
  dataset.list_volumes(config.data.path, config.data.label_suffix)
  if config.data.val_path:
    dataset.list_volumes(config.data.val_path, config.data.label_suffix)
  subjects, val_subjects = _load_datasets(config, workdir, progress)
  with state_lib.workdir_lock(workdir):
    intensity = np.mean([s.intensity for s in subjects], 0)
    saved = state_lib.load_intensity(workdir)
    if saved is not None and not np.allclose(
        saved, intensity, rtol=0, atol=1e-3 * (saved[1] - saved[0])):
      raise InputError(
          f"workdir {workdir}: its training data changed since the run "
          f"started (target intensity range [{saved[0]:.4g}, {saved[1]:.4g}]"
          f" there, [{intensity[0]:.4g}, {intensity[1]:.4g}] now); use "
          "another --workdir")
    state_lib.save_config(workdir, config)
    state_lib.save_intensity(workdir, intensity)
    return {name: train_scale(config, workdir, name, subjects, val_subjects,
                              progress=progress, stop_after=stop_after)
            for name in chosen}


def _absolute_data_paths(config):
  """``config`` with ``data.path`` and ``data.val_path`` absolute (a copy)."""
  from megan_jax.data import MNI152_NAME
  config = config.copy_and_resolve_references()
  for key in ("path", "val_path"):
    value = config.data[key]
    if value and value != MNI152_NAME:
      config.data[key] = os.path.abspath(value)
  return config


def _load_datasets(config, workdir: str, progress: bool):
  """The training and validation subjects, their sketches cached in
  ``workdir/cache``. If either fails to load, the folders this call made are
  removed: the workdir (and its missing parents) if it was not there, else
  the cache it started."""
  cache = os.path.join(workdir, "cache")
  made = None  # the outermost folder that loading the datasets may create
  d = os.path.abspath(cache)
  while not os.path.exists(d):
    made, d = d, os.path.dirname(d)
  try:
    subjects = dataset.load_dataset(config.data.path, config, cache, progress)
    val_subjects = (dataset.load_dataset(config.data.val_path, config, cache)
                    if config.data.val_path else subjects)
  except BaseException:  # a bad volume, or the user stopping the run
    if made is not None:
      shutil.rmtree(made, ignore_errors=True)
    raise
  return subjects, val_subjects


def restore(workdir: str, which: str = "latest"):
  """``(config, {scale: GanState})`` of a run's ``latest`` (or ``best``)
  checkpoints, for notebooks and scripts; scales without one are left out."""
  return state_lib.read_scales(
      workdir, lambda ckpt, config, kind: ckpt.restore(
          state_lib.abstract_state(config, kind), which), which)
