"""Training: the step learns, compiles once, and resumes exactly."""
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megan_jax import cli, configs, dataset, train
from megan_jax import state as state_lib
from megan_jax.errors import InputError


def tiny_config(**overrides):
  c = configs.get_config("demo:smoke")
  c.unlock()
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for part in path:
      node = node[part]
    node[last] = v
  return c


@pytest.fixture(scope="module")
def subjects(tmp_path_factory):
  c = tiny_config()
  return dataset.load_dataset("mni152", c, str(tmp_path_factory.mktemp("cache")))


def _fixed_batch(subjects, config, scale):
  return train.sample_batch(subjects, config, scale, step=0)


@pytest.mark.parametrize("kind,scale", [("hr", 2), ("lr", 0)])
def test_step_lowers_loss_and_compiles_once(subjects, kind, scale):
  config = tiny_config(**{"loss.d_skip_accuracy": 0.0, "optim.lr": 1e-3})
  state = state_lib.create_state(jax.random.key(0), config, kind)
  step = train.make_train_step(config, kind, donate=False)
  batch = _fixed_batch(subjects, config, scale)
  l1s = []
  for _ in range(6):
    state, metrics = step(state, batch, jax.random.key(1))
    l1s.append(float(metrics["g_l1"]))
    assert all(np.isfinite(float(v)) for v in metrics.values())
  assert l1s[-1] < l1s[0]
  assert int(state.step) == 6
  assert step._cache_size() == 1  # no per-step recompilation


@pytest.mark.parametrize("accuracy", [1.0, 0.0])
def test_a_skipped_d_update_keeps_d_but_not_its_schedule(subjects,
                                                         monkeypatch,
                                                         accuracy):
  """While D is too good (accuracy > loss.d_skip_accuracy) its parameters
  and Adam state stay as they were, but its learning-rate schedule follows
  the training step as G's does (it once counted only D's own updates, so
  with linear decay D's rate lagged G's and never reached 0)."""
  from megan_jax import losses
  monkeypatch.setattr(losses, "discriminator_accuracy",
                      lambda *a, **k: jnp.asarray(accuracy, jnp.float32))
  # A seed of its own: no step compiled before the patch is reused.
  config = tiny_config(**{"optim.decay": "linear", "steps": 4,
                          "seed": 4242 + int(accuracy)})
  state = state_lib.create_state(jax.random.key(0), config, "hr")
  d_before = jax.tree.map(np.asarray, state.d_params)
  step = train.make_train_step(config, "hr", donate=False)
  batch = _fixed_batch(subjects, config, 1)
  for _ in range(4):
    state, metrics = step(state, batch, jax.random.key(1))
    assert float(metrics["d_skipped"]) == float(accuracy > 0.8)
  (d_adam, d_schedule), (g_adam, g_schedule) = state.d_opt, state.g_opt
  assert int(d_schedule.count) == int(g_schedule.count) == 4
  assert int(g_adam.count) == 4
  same = jax.tree.leaves(jax.tree.map(
      lambda a, b: bool(np.array_equal(a, np.asarray(b))), d_before,
      state.d_params))
  if accuracy > 0.8:  # skipped every step
    assert all(same) and int(d_adam.count) == 0
  else:
    assert not all(same) and int(d_adam.count) == 4


def test_augment_inputs_follows_the_config(subjects):
  quiet = {"augment.edge_noise_std": 0.0, "augment.prev_noise_std": 0.0,
           "augment.blur_prob": 0.0, "augment.halfres_prob": 0.0,
           "augment.edge_gain": 0.0}  # the demo's configs have it on
  batch = _fixed_batch(subjects, tiny_config(), 2)
  e = np.asarray(batch["edges"])
  assert (e > 0).sum() > 100
  key = jax.random.key(3)
  off = train.augment_inputs(batch, key, tiny_config(**quiet), "hr")
  np.testing.assert_array_equal(off["edges"], e)
  np.testing.assert_array_equal(off["prev"], batch["prev"])
  on = train.augment_inputs(
      batch, key, tiny_config(**{**quiet, "augment.edge_gain": 0.5}), "hr")
  got = np.asarray(on["edges"])
  np.testing.assert_array_equal(got[e == 0], 0.0)
  ratio = got[e > 0] / e[e > 0]
  assert ratio.min() >= 0.5 - 1e-6 and ratio.max() <= 1.5 + 1e-6
  assert ratio.std() > 0.2  # per voxel (uniform: 0.29)
  # A run saved before the field existed trains without it.
  old = tiny_config(**quiet)
  del old.augment["edge_gain"]
  np.testing.assert_array_equal(
      train.augment_inputs(batch, key, old, "hr")["edges"], e)


def _zero_output_conv(g_params):
  """Generator params whose last conv outputs 0 (tanh(0) = 0)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x * 0 if "conv_out" in jax.tree_util.keystr(path)
      else x, g_params)


def test_hr_residual_adds_the_upsampled_previous_patch(subjects):
  quiet = {"augment.edge_noise_std": 0.0, "augment.prev_noise_std": 0.0,
           "augment.blur_prob": 0.0, "augment.halfres_prob": 0.0,
           "model.dropout": 0.0, "hr_condition": "upsampled"}
  config = tiny_config(**quiet, **{"model.hr_residual": True})
  batch = _fixed_batch(subjects, config, 2)
  base = np.clip(state_lib.linear_upsampled_centre(
      jnp.asarray(batch["prev"]), config.patch_size), -1, 1)
  state = state_lib.create_state(jax.random.key(0), config, "hr")
  zero = _zero_output_conv(state.g_params)
  # Inference form: a generator that outputs 0 returns the base.
  gen = train.make_eval_fn(config, "hr")(zero, batch)
  np.testing.assert_allclose(gen, base, atol=1e-6)
  plain = train.make_eval_fn(
      tiny_config(**quiet, **{"model.hr_residual": False}), "hr")(zero, batch)
  np.testing.assert_allclose(plain, 0.0, atol=1e-6)
  # Training form: the step's L1 is that of the base against the target.
  step = train.make_train_step(config, "hr", donate=False)
  _, metrics = step(state.replace(g_params=zero), batch, jax.random.key(1))
  np.testing.assert_allclose(
      float(metrics["g_l1"]),
      float(np.mean(np.abs(base - np.asarray(batch["target"])))), rtol=1e-5)
  # Without a previous scale there is nothing to add to.
  with pytest.raises(InputError, match="hr_residual"):
    state_lib.generator_output(gen, batch, tiny_config(
        **{"model.hr_residual": True, "hr_condition": "none"}), "hr")


def test_l1_only_overfits_a_single_patch(subjects):
  config = tiny_config(**{"loss.gan_weight": 0.0, "optim.lr": 2e-3,
                          "model.dropout": 0.0, "augment.prev_noise_std": 0.0,
                          "augment.blur_prob": 0.0, "augment.halfres_prob": 0.0,
                          "augment.edge_noise_std": 0.0,
                          "augment.edge_gain": 0.0,
                          # the whole patch from the generator, not a
                          # correction of the upsampled scale below
                          "model.hr_residual": False,
                          "train.hr_batch_size": 1})
  state = state_lib.create_state(jax.random.key(0), config, "hr")
  step = train.make_train_step(config, "hr", donate=False)
  batch = _fixed_batch(subjects, config, 1)
  first = None
  for i in range(60):
    state, metrics = step(state, batch, jax.random.key(1))
    first = first if first is not None else float(metrics["g_l1"])
  last = float(metrics["g_l1"])
  assert last < 0.35 * first, (first, last)


def test_generator_is_a_pure_function(subjects):
  """The eval function runs the generator in inference mode: with dropout
  in the model it is still deterministic, and it is the ``train=False``
  apply, not the training one (which drops units and differs)."""
  config = tiny_config(**{"model.dropout": 0.5})
  state = state_lib.create_state(jax.random.key(0), config, "hr")
  gen = train.make_eval_fn(config, "hr")
  batch = _fixed_batch(subjects, config, 1)
  a, b = gen(state.g_params, batch), gen(state.g_params, batch)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  g = state_lib.build_generator(config, "hr")
  x = state_lib.generator_input(batch, config, "hr")

  def out(raw):
    return np.asarray(state_lib.generator_output(raw, batch, config, "hr"),
                      np.float32)
  np.testing.assert_allclose(
      np.asarray(a), out(g.apply(state.g_params, x, train=False)),
      rtol=1e-5, atol=1e-6)
  dropped = out(g.apply(state.g_params, x, train=True,
                        rngs={"dropout": jax.random.key(3)}))
  assert np.abs(dropped - np.asarray(a)).max() > 1e-3


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_parameters(tmp_path, capsys):
  config = tiny_config()
  full = train.train(config, str(tmp_path / "full"), "all", progress=False)
  killed = str(tmp_path / "killed")
  train.train(config, killed, "all", progress=False, stop_after=2)  # "killed"
  _, partial = train.restore(killed)
  assert {int(s.step) for s in partial.values()} == {2}
  capsys.readouterr()
  resumed = train.train(config, killed, "all", progress=False)
  # Said without a progress bar too (`megan train --quiet`).
  said = capsys.readouterr().err
  for name in ("lr", "hr1", "hr2"):
    assert f"{name}: resuming from step 2" in said, said
  for name in ("lr", "hr1", "hr2"):
    jax.tree.map(np.testing.assert_array_equal, full[name].g_params,
                 resumed[name].g_params)
    jax.tree.map(np.testing.assert_array_equal, full[name].d_params,
                 resumed[name].d_params)
  cfg, states = train.restore(killed)
  assert cfg.steps == 4 and int(states["hr1"].step) == 4
  # logs, montages and both checkpoint kinds are there
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "killed" / "logs" / "lr"))
  assert os.listdir(tmp_path / "killed" / "montages")
  assert os.listdir(tmp_path / "killed" / "checkpoints" / "hr1" / "best")


def test_a_run_killed_before_its_first_checkpoint_logs_each_step_once(
    tmp_path):
  """Its logs (steps it never checkpointed) are dropped when the rerun
  logs those steps again, in metrics.jsonl and for TensorBoard."""
  from megan_jax import writers
  config = tiny_config()
  logdir = tmp_path / "logs" / "lr"
  with writers.create_default_writer(str(logdir)) as w:  # the killed run's
    w.write_scalars(2, {"g_loss": 1e9})
  train.train(config, str(tmp_path), "lr", progress=False)
  lines = [json.loads(l) for l in open(logdir / "metrics.jsonl")]
  twos = [l["g_loss"] for l in lines if l["step"] == 2 and "g_loss" in l]
  assert len(twos) == 1 and twos[0] < 1e3, twos
  event_accumulator = pytest.importorskip(
      "tensorboard.backend.event_processing.event_accumulator")
  acc = event_accumulator.EventAccumulator(str(logdir))
  acc.Reload()
  events = [(e.step, e.value) for e in acc.Scalars("g_loss")]
  assert [s for s, _ in events] == sorted({s for s, _ in events})
  assert all(v < 1e3 for _, v in events), events


def test_a_run_killed_once_a_checkpoint_is_saved_has_that_steps_logs(
    tmp_path, monkeypatch):
  """What is on disk the moment a checkpoint is saved (all a SIGKILL then
  leaves) holds that step's scalars and montage: the resumed run starts
  after it and never logs it again. The logs were flushed only at open
  and close, and the montage written after the save. And sec_per_step
  times the steps alone: the interval after a logged step counted that
  step's validation, checkpoint and montage (hr2 logged 0.08 s, then
  0.8 s after each); a montage that takes 1000 s on a clock of our own
  is not counted."""
  import shutil
  event_accumulator = pytest.importorskip(
      "tensorboard.backend.event_processing.event_accumulator")
  # Checkpoint and montage every 2 steps, logs every step.
  config = tiny_config(**{"steps": 4, "train.log_every": 1})
  run = tmp_path / "run"
  real = state_lib.Checkpoints.save_latest
  snapshots = {}

  def save_and_look(self, step, state):
    out = real(self, step, state)
    snap = tmp_path / f"at{step}"
    shutil.copytree(run / "logs" / "lr", snap / "logs")
    shutil.copytree(run / "montages", snap / "montages")
    snapshots[step] = snap
    return out
  monkeypatch.setattr(state_lib.Checkpoints, "save_latest", save_and_look)
  offset = [0.0]
  real_clock, real_montage = time.perf_counter, train._montage

  def slow_montage(*args, **kwargs):
    offset[0] += 1000.0
    return real_montage(*args, **kwargs)
  monkeypatch.setattr(train, "_montage", slow_montage)
  monkeypatch.setattr(train.time, "perf_counter",
                      lambda: real_clock() + offset[0])
  train.train(config, str(run), "lr", progress=False)
  assert sorted(snapshots) == [2, 4]
  for step, snap in snapshots.items():
    assert f"lr_{step:06d}.png" in os.listdir(snap / "montages")
    acc = event_accumulator.EventAccumulator(
        str(snap / "logs"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert step in [e.step for e in acc.Scalars("g_loss")]
    assert step in [e.step for e in acc.Scalars("val_l1")]
    assert step in [e.step for e in acc.Images("montage")]
  assert offset[0] == 2000.0  # montages at steps 2 and 4
  lines = [json.loads(l) for l in open(run / "logs" / "lr" /
                                       "metrics.jsonl") if "g_loss" in l]
  secs = {l["step"]: l["sec_per_step"] for l in lines}
  assert sorted(secs) == [1, 2, 3, 4]
  assert secs[3] < 500.0, secs  # step 2's montage is not step 3's time


def test_workdir_of_another_config_is_refused(tmp_path):
  config = tiny_config()
  state_lib.save_config(str(tmp_path), config)
  other = tiny_config(**{"model.ngf": 6})
  with pytest.raises(InputError, match="model.ngf"):
    state_lib.save_config(str(tmp_path), other)
  longer = tiny_config(steps=99)  # more steps: the same run, continued
  state_lib.save_config(str(tmp_path), longer)


def test_run_saved_before_added_fields_still_resumes(tmp_path):
  import json
  config = tiny_config(**{"augment.edge_gain": 0.0, "model.hr_residual": False,
                          "data.orientation": ""})
  saved = json.loads(config.to_json())
  for (group, key) in state_lib.ADDED_FIELDS:
    del saved[group][key]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  state_lib.save_config(str(tmp_path), config)  # their absence means off
  with pytest.raises(InputError, match="augment.edge_gain"):
    state_lib.save_config(str(tmp_path), tiny_config(**{
        "augment.edge_gain": 1.0, "model.hr_residual": False}))
  with pytest.raises(InputError, match="model.hr_residual"):
    state_lib.save_config(str(tmp_path), tiny_config(**{
        "augment.edge_gain": 0.0, "model.hr_residual": True,
        "data.orientation": ""}))
  # today's default orientation is not what such a run trained with; the
  # message says how to go on with it
  with pytest.raises(InputError, match="--config.data.orientation= to go on"):
    state_lib.save_config(str(tmp_path), tiny_config(**{
        "augment.edge_gain": 0.0, "model.hr_residual": False}))


def test_a_run_of_a_config_far_from_this_one_is_named_with_its_count(
    tmp_path):
  # The first differing field alone sent a user through a round per field
  # (the demo's run against the paper's config: 24 rounds).
  state_lib.save_config(str(tmp_path), tiny_config())
  with pytest.raises(InputError) as info:
    state_lib.save_config(str(tmp_path), tiny_config(**{
        "seed": 5, "border": 2, "model.ngf": 3}))
  msg = str(info.value)
  assert ("holds a run of config 'demo' with other settings, 3 fields "
          "differ" in msg), msg
  assert "also model.ngf, seed" in msg and "--config." not in msg, msg
  with pytest.raises(InputError, match=r"\(seed is 0 there, 5 here\); use "
                     r"another --workdir, or --config\.seed=0 to go on"):
    state_lib.save_config(str(tmp_path), tiny_config(seed=5))
  other = tiny_config(seed=5)
  other.name = "mine"  # another config's name is said as such
  with pytest.raises(InputError, match="holds a run of config 'demo' \\("):
    state_lib.save_config(str(tmp_path), other)


def test_cli_train_errors(tmp_path, capsys):
  empty = tmp_path / "empty"
  empty.mkdir()
  code = cli.main(["train", "--config", "demo:smoke", "--workdir",
                   str(tmp_path / "run"), f"--config.data.path={empty}"])
  err = capsys.readouterr().err
  assert code == 2 and str(empty) in err and len(err.strip().splitlines()) == 1
  code = cli.main(["train", "--config", "demo:smoke", "--workdir",
                   str(tmp_path / "run"), "--config.model.ngff=3"])
  assert code == 2 and "ngff" in capsys.readouterr().err
  code = cli.main(["train", "--config", "demo:smoke", "--workdir",
                   str(tmp_path / "run"), "--scale", "7"])
  assert code == 2 and "--scale 7" in capsys.readouterr().err


def test_paper_configs_fit_their_data():
  from megan_jax import resample
  brats = configs.get_config("brats_t2")
  shapes = resample.scale_shapes((155, 240, 240), brats.num_hr_scales)
  assert shapes[0] == (39, 60, 60)
  resample.check_lr_size(shapes[0], brats.lr_size)
  copd = configs.get_config("copd_ct")
  assert resample.scale_shapes((512,) * 3, copd.num_hr_scales)[0] == (64,) * 3
  assert state_lib.scale_names(copd) == ["lr", "hr1", "hr2", "hr3"]


@pytest.mark.parametrize("kind,scale", [("hr", 2), ("lr", 0)])
def test_bfloat16_step_runs(subjects, kind, scale):
  """bf16 compute (float32 params) trains on the CPU too: every custom
  backward of the fast convs runs in bf16."""
  config = tiny_config(**{"model.dtype": "bfloat16"})
  state = state_lib.create_state(jax.random.key(0), config, kind)
  step = train.make_train_step(config, kind, donate=False)
  state, metrics = step(state, _fixed_batch(subjects, config, scale),
                        jax.random.key(1))
  assert all(np.isfinite(float(v)) for v in metrics.values())
  assert jax.tree.leaves(state.g_params)[0].dtype == np.float32
  # The config's dtype reaches the networks the step builds (a config
  # whose dtype was ignored passed the checks above).
  assert state_lib.build_generator(config, kind).dtype == jnp.bfloat16
  assert state_lib.build_discriminator(config, kind).dtype == jnp.bfloat16


def test_sketch_cache_key_follows_the_edge_engine_and_config(monkeypatch):
  # Cached sketches are reused only for the same file, edge settings and
  # engine (the engines differ by rounding near ties).
  c = tiny_config()
  key = dataset._cache_key("mni152", c)
  assert dataset._cache_key("mni152", tiny_config()) == key
  assert dataset._cache_key("mni152", tiny_config(**{"edges.sigma": 2.0})) != key
  monkeypatch.setattr(dataset.edges_lib, "ENGINE", "numpy")
  assert dataset._cache_key("mni152", c) != key


def test_steps_may_change_on_resume_unless_the_schedule_follows_them(
    tmp_path):
  state_lib.save_config(str(tmp_path / "a"), tiny_config(steps=4))
  state_lib.save_config(str(tmp_path / "a"), tiny_config(steps=8))  # more
  assert json.load(open(tmp_path / "a" / "config.json"))["steps"] == 8
  linear = {"optim.decay": "linear"}
  state_lib.save_config(str(tmp_path / "b"), tiny_config(steps=4, **linear))
  with pytest.raises(InputError, match="optim.decay=linear"):
    state_lib.save_config(str(tmp_path / "b"), tiny_config(steps=8, **linear))


@pytest.mark.parametrize("field,value", [("train.hr_batch_size", 7),
                                         ("train.lr_batch_size", 3),
                                         ("train.val_patches", 5)])
def test_a_resume_with_other_batches_or_validation_is_refused(
    tmp_path, field, value):
  # Another batch is another run (a resume no longer equals the
  # uninterrupted one), and best compares scores on one validation set.
  state_lib.save_config(str(tmp_path), tiny_config())
  before = (tmp_path / "config.json").read_text()
  with pytest.raises(InputError, match=f"{field} is"):
    state_lib.save_config(str(tmp_path), tiny_config(**{field: value}))
  assert (tmp_path / "config.json").read_text() == before


def test_config_json_says_what_a_resumed_run_goes_on_with(tmp_path):
  # Same steps, another logging interval: the run goes on, and its
  # config.json was left saying the old interval.
  state_lib.save_config(str(tmp_path), tiny_config())
  state_lib.save_config(str(tmp_path), tiny_config(**{"train.log_every": 3}))
  saved = json.load(open(tmp_path / "config.json"))
  assert saved["train"]["log_every"] == 3


def test_a_config_json_of_the_wrong_structure_is_one_line(tmp_path):
  state_lib.save_config(str(tmp_path), tiny_config())
  d = json.load(open(tmp_path / "config.json"))
  d["data"] = [1]
  (tmp_path / "config.json").write_text(json.dumps(d))
  with pytest.raises(InputError, match=r"config\.json: damaged, data"):
    state_lib.check_workdir(str(tmp_path), tiny_config())


def test_best_checkpoints_after_the_resumed_step_are_forgotten(tmp_path):
  # A run killed after its latest checkpoint left a "best" of a later step;
  # orbax refuses to save below it, so the resumed run's evaluations of
  # those steps were silently dropped (on a GPU they need not be equal).
  config = tiny_config()
  st = state_lib.create_state(jax.random.key(0), config, "hr")
  ck = state_lib.Checkpoints(str(tmp_path), "hr1")
  ck.save_best(6, st, 0.5)
  ck.wait()
  ck.save_best(5, st, 0.1)  # what a resumed run at step 4 does: refused
  ck.wait()
  assert ck.best.best_step() == 6
  assert ck.forget_after(4) == [6]
  ck.save_best(5, st, 0.1)
  ck.wait()
  assert ck.best.best_step() == 5
  assert ck.forget_after(5) == []
  ck.close()


def test_a_nan_validation_score_never_replaces_the_best_checkpoint(tmp_path):
  # A diverged run's val_l1 = NaN: orbax kept the NaN step as the best (and
  # deleted the good one), and inference loads the best by default.
  st = state_lib.create_state(jax.random.key(0), tiny_config(), "hr")
  ck = state_lib.Checkpoints(str(tmp_path), "hr1")
  ck.save_best(1, st, 0.5)
  ck.wait()
  ck.save_best(2, st, float("nan"))
  ck.wait()
  assert ck.best.best_step() == 1 and ck.best.all_steps() == [1]
  ck.save_best(3, st, 0.4)  # a finite, better score still wins
  ck.wait()
  assert ck.best.best_step() == 3
  ck.close()


def test_a_run_saved_on_two_devices_restores_and_resumes_on_one(tmp_path):
  # Orbax restored onto the devices a checkpoint was saved from: a run
  # killed on a 2-GPU node could not resume (nor be read) on 1 GPU.
  import subprocess
  import sys
  import textwrap
  run = str(tmp_path / "run")
  script = textwrap.dedent(f"""
    import jax
    from megan_jax import configs, sharding
    from megan_jax import state as state_lib
    assert len(jax.devices()) == 2
    c = configs.get_config("demo:smoke")
    state_lib.save_config({run!r}, c)
    st = state_lib.create_state(jax.random.key(7), c, "lr")
    st = sharding.replicate(st.replace(step=st.step + 1),
                            sharding.make_mesh())
    ck = state_lib.Checkpoints({run!r}, "lr")
    ck.save_latest(1, st)
    ck.finish()
    # A batch that does not divide over the devices is replicated: said.
    from megan_jax import train
    train.train(c, {run!r} + "-other", "lr", progress=False, stop_after=1)
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", script], capture_output=True,
                     text=True, timeout=600, env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  assert ("lr: batch 1 does not divide over the 2 devices" in r.stderr
          and "--config.train.lr_batch_size" in r.stderr), r.stderr[-2000:]
  assert len(jax.devices()) == 1
  config, states = train.restore(run)
  want = state_lib.create_state(jax.random.key(7), config, "lr")
  got = states["lr"]
  assert int(got.step) == 1
  for a, b in zip(jax.tree.leaves(got.g_params), jax.tree.leaves(want.g_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ck = state_lib.Checkpoints(run, "lr", read_only=True)  # the generator alone
  step, g = ck.restore_generator(state_lib.abstract_state(config, "lr").g_params)
  ck.close()
  assert step == 1
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(want.g_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # And training goes on from it, here.
  out = train.train(config.copy_and_resolve_references(), run, "lr",
                    progress=False, stop_after=1)
  assert int(out["lr"].step) == 2


def test_reading_a_run_makes_no_folder_in_it(tmp_path):
  # Reading made empty checkpoints/<scale>/{latest,best} for every scale
  # without a checkpoint (orbax's create=True): on a read-only share the
  # error was "Read-only file system" instead of what is missing.
  run = str(tmp_path / "run")
  c = tiny_config()
  state_lib.save_config(run, c)
  st = state_lib.create_state(jax.random.key(0), c, "hr")
  ck = state_lib.Checkpoints(run, "hr1")
  ck.save_latest(3, st)
  ck.finish()
  before = sorted(os.walk(run))
  _, got = state_lib.restore_generators(run)
  assert list(got) == ["hr1"]
  _, states = train.restore(run)
  assert list(states) == ["hr1"]
  assert sorted(os.walk(run)) == before
  with pytest.raises(InputError, match="no latest checkpoint"):
    state_lib.restore_generators(run, "latest", scales=["lr", "hr2"])
  assert sorted(os.walk(run)) == before


def _nifti(path, data):
  import nibabel as nib
  nib.save(nib.Nifti1Image(data, np.diag([4.0, 4.0, 4.0, 1.0])), str(path))


def test_failed_data_leaves_the_workdir_as_it_was_and_the_retry_trains(
    tmp_path):
  # A dataset whose second volume cannot be used (constant): the first is
  # preprocessed and cached before it fails. That run used to leave
  # config.json (and the cache) behind, and the corrected command was then
  # refused as "a run of another config".
  import synthetic
  good, bad = tmp_path / "good", tmp_path / "bad"
  good.mkdir()
  bad.mkdir()
  _nifti(good / "a.nii.gz", synthetic.blob(seed=0))
  _nifti(bad / "a.nii.gz", synthetic.blob(seed=0))
  _nifti(bad / "b.nii.gz", np.full((30, 37, 26), 7.0, np.float32))
  run = tmp_path / "runs" / "run"
  with pytest.raises(InputError, match="b.nii.gz"):
    train.train(tiny_config(**{"data.path": str(bad), "steps": 1}), str(run),
                "lr", progress=False)
  assert not (tmp_path / "runs").exists()  # the folders it made are gone
  run.mkdir(parents=True)  # the user's own (empty) folder stays as it was
  with pytest.raises(InputError, match="b.nii.gz"):
    train.train(tiny_config(**{"data.path": str(good), "steps": 1,
                               "data.val_path": str(bad)}), str(run), "lr",
                progress=False)
  assert os.listdir(run) == []
  # The corrected command trains there.
  states = train.train(tiny_config(**{"data.path": str(good), "steps": 1}),
                       str(run), "lr", progress=False)
  assert int(states["lr"].step) == 1
  with open(run / "config.json") as f:
    assert json.load(f)["data"]["path"] == str(good)
  assert os.listdir(run / "checkpoints" / "lr" / "latest")


def test_resume_from_another_folder_and_changed_data_and_a_second_train(
    tmp_path, monkeypatch):
  import synthetic
  from megan_jax import state as state_lib
  data = tmp_path / "data"
  data.mkdir()
  _nifti(data / "a.nii.gz", synthetic.blob(seed=0))
  run = tmp_path / "run"
  monkeypatch.chdir(tmp_path)  # a relative data path, kept absolute
  train.train(tiny_config(**{"data.path": "data", "steps": 1}), str(run),
              "lr", progress=False)
  with open(run / "config.json") as f:
    assert json.load(f)["data"]["path"] == str(data)
  (tmp_path / "elsewhere").mkdir()
  monkeypatch.chdir(tmp_path / "elsewhere")  # ../data is the same folder
  state_lib.check_workdir(str(run), tiny_config(**{
      "data.path": os.path.join("..", "data"), "steps": 1}))
  # The data changed under the run (a much brighter volume): its target
  # intensity range no longer holds; refused, nothing rewritten.
  _nifti(data / "b.nii.gz", 10.0 * synthetic.blob(seed=1))
  before = (run / "intensity.json").read_text()
  with pytest.raises(InputError, match="training data changed"):
    train.train(tiny_config(**{"data.path": str(data), "steps": 2}),
                str(run), "lr", progress=False)
  assert (run / "intensity.json").read_text() == before
  # One megan train per workdir at a time.
  with state_lib.workdir_lock(str(run)):
    with pytest.raises(InputError, match="another megan train is using it"):
      with state_lib.workdir_lock(str(run)):
        pass
  with state_lib.workdir_lock(str(run)):  # released
    pass


def test_batches_of_the_wrong_shape_say_so():
  from megan_jax import state as state_lib
  config = tiny_config()
  p = config.patch_size
  good = {"prev": jnp.zeros((2, p, p, p, 1)), "edges": jnp.zeros((2, p, p, p, 1))}
  assert state_lib.generator_input(good, config, "hr").shape[-1] == 2
  for batch, msg in (
      ({**good, "prev": jnp.zeros((2, 1, p, p, p))}, "channels last"),
      ({**good, "edges": jnp.zeros((2, 2 * p, 2 * p, 2 * p, 1))}, "edges"),
      ({"edges": good["edges"]}, "no 'prev'")):
    with pytest.raises(ValueError, match=msg):
      state_lib.generator_input(batch, config, "hr")
  with pytest.raises(ValueError, match="kind 'foo'"):
    state_lib.build_generator(config, "foo")
  with pytest.raises(InputError, match="which='foo'"):
    train.restore("/nonexistent", "foo")


def _damage(checkpoint):
  """Cuts the array data files of an orbax checkpoint to 10 bytes (a disk
  that filled up, a copy that stopped half-way)."""
  import glob
  for f in glob.glob(os.path.join(checkpoint, "default", "ocdbt.process_*",
                                  "d", "*")):
    os.truncate(f, min(10, os.path.getsize(f)))


# In this process pytest collects those reports itself.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_damaged_checkpoint_is_one_line_naming_it(run_dir, tmp_path):
  # Training's resume (and train.restore) read the whole state: a damaged
  # file is an InputError naming the checkpoint and tensorstore's reason,
  # and the process's stderr is that line alone (orbax's other reads, still
  # under way on the event loop it has closed, are not reported).
  import shutil
  import subprocess
  import sys
  run = tmp_path / "run"
  shutil.copytree(run_dir, run)
  _damage(run / "checkpoints" / "lr" / "latest" / "0")
  with pytest.raises(InputError) as e:
    train.restore(str(run))
  msg = str(e.value)
  assert msg.startswith(f"checkpoint {run / 'checkpoints' / 'lr' / 'latest' / '0'}: ")
  assert "\n" not in msg and "TensorStore(" not in msg
  script = ("import sys\nfrom megan_jax import train\nfrom megan_jax.errors "
            "import InputError\ntry:\n  train.restore(sys.argv[1])\nexcept "
            "InputError as e:\n  print(e, file=sys.stderr)\n  sys.exit(2)\n")
  r = subprocess.run([sys.executable, "-c", script, str(run)],
                     capture_output=True, text=True, timeout=300,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()  # which array fails first varies
  assert len(lines) == 1 and lines[0].startswith(msg.split(" (")[0] + " (")


def test_after_a_damaged_read_only_orbaxs_closed_loop_reports_are_dropped(
    monkeypatch):
  # Those reports come from tensorstore's threads at a time of their own
  # (none to dozens per run): the hook is tested directly.
  import sys
  import types
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  try:
    raise InputError("outer") from ValueError("OUT_OF_RANGE: a.kernel")
  except InputError as e:
    err = state_lib.unreadable_checkpoint("/r/ckpt/3", e)
  assert str(err) == ("checkpoint /r/ckpt/3: unreadable (ValueError: "
                      "OUT_OF_RANGE: a.kernel)")  # the innermost cause
  state_lib._drop_closed_loop_reports()
  hook = sys.unraisablehook
  state_lib._drop_closed_loop_reports()
  assert sys.unraisablehook is hook  # installed once

  def report(exc, obj=None):
    return types.SimpleNamespace(exc_type=type(exc), exc_value=exc,
                                 exc_traceback=None, err_msg=None, object=obj)
  hook(report(RuntimeError("Event loop is closed")))
  orbax_read = types.SimpleNamespace(cr_code=types.SimpleNamespace(
      co_filename="/site-packages/orbax/checkpoint/serialization.py"))
  hook(report(ImportError("sys.meta_path is None"), orbax_read))
  assert seen == []
  other = report(RuntimeError("something else"))
  hook(other)
  mine = report(ImportError("x"), types.SimpleNamespace(
      cr_code=types.SimpleNamespace(co_filename="/home/me/job.py")))
  hook(mine)
  assert seen == [other, mine]


def test_steps_below_a_trained_scale_are_refused(tmp_path):
  # config.json would say 4 while a checkpoint is at step 5.
  config = tiny_config(steps=8)
  state_lib.save_config(str(tmp_path), config)
  ck = state_lib.Checkpoints(str(tmp_path), "hr1")
  ck.save_latest(5, state_lib.create_state(jax.random.key(0), config, "hr"))
  ck.wait()
  ck.close()
  assert state_lib.checkpointed_step(str(tmp_path), "hr1") == 5
  assert state_lib.checkpointed_step(str(tmp_path), "lr") is None
  for scale in ("lr", "hr1", "1"):  # any scale: config.json is the run's
    with pytest.raises(InputError, match="hr1 is trained to step 5"):
      train.train(tiny_config(steps=4), str(tmp_path), scale, progress=False)
  assert json.load(open(tmp_path / "config.json"))["steps"] == 8


def test_an_interrupt_lets_the_checkpoint_under_way_finish(tmp_path,
                                                           monkeypatch):
  # Ctrl-C right after an (asynchronous) save: the save completes before
  # the interrupt leaves train(), so no half-written step folder is left
  # (and orbax reports nothing at exit).
  real = state_lib.Checkpoints.save_latest

  def save_then_interrupt(self, step, state):
    real(self, step, state)
    raise KeyboardInterrupt
  monkeypatch.setattr(state_lib.Checkpoints, "save_latest",
                      save_then_interrupt)
  with pytest.raises(KeyboardInterrupt):
    train.train(tiny_config(), str(tmp_path), "lr", progress=False)
  latest = tmp_path / "checkpoints" / "lr" / "latest"
  assert [p.name for p in latest.iterdir()] == ["2"]
  assert state_lib.checkpointed_step(str(tmp_path), "lr") == 2


# The step's own arithmetic: D's skip, G's loss weights, the directions of
# the two updates. One fixed batch, no augmentation or dropout, so a loss
# can be recomputed outside the step; two configs (l1_weight 10 and 2) that
# differ in nothing else, each compiled once for the three tests, with the
# plain convolutions (the same params; a third of the fast ones' compile
# time on a CPU).
_QUIET = {"augment.edge_noise_std": 0.0, "augment.prev_noise_std": 0.0,
          "augment.blur_prob": 0.0, "augment.halfres_prob": 0.0,
          "augment.edge_gain": 0.0, "model.dropout": 0.0}


def _arithmetic_config(l1_weight=10.0):
  return tiny_config(**_QUIET, **{"loss.d_skip_accuracy": 0.4,
                                  "loss.gan_weight": 1.0,
                                  "loss.l1_weight": l1_weight,
                                  "optim.lr": 1e-4, "model.impl": "plain"})


def _d_with_constant_logit(d_params, value):
  """HR D params whose every logit is ``value``: the last conv's kernel 0,
  its bias ``value``. For BCE (threshold 0) D's accuracy is then exactly 0
  (``value`` 0: no real above 0, no fake below) or 0.5 (``value`` > 0: every
  real right, every fake wrong)."""
  def f(path, x):
    name = jax.tree_util.keystr(path)
    if "conv_out" not in name:
      return x
    return x * 0 + (value if "bias" in name else 0.0)
  return jax.tree_util.tree_map_with_path(f, d_params)


def _same_tree(a, b):
  return all(np.array_equal(x, y) for x, y in
             zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def hr_state():
  # The optimiser's state does not depend on the learning rate or losses:
  # one initialisation serves every config here.
  return state_lib.create_state(jax.random.key(0), tiny_config(), "hr")


def test_d_update_is_skipped_exactly_when_d_is_above_the_threshold(
    subjects, hr_state):
  """With ``loss.d_skip_accuracy`` 0.4: D at accuracy 0.5 (above) keeps its
  params and optimiser state bit for bit and says ``d_skipped`` 1; D at
  accuracy 0 (below) is updated (params changed, Adam's count advanced)
  and says 0. G is updated either way."""
  config = _arithmetic_config()
  assert config.loss.gan == "bce"
  step = train.make_train_step(config, "hr", donate=False)
  batch = _fixed_batch(subjects, config, 2)
  for logit, acc, skipped in ((1.0, 0.5, True), (0.0, 0.0, False)):
    state = hr_state.replace(
        d_params=_d_with_constant_logit(hr_state.d_params, logit))
    new, metrics = step(state, batch, jax.random.key(1))
    assert float(metrics["d_acc"]) == acc
    assert float(metrics["d_skipped"]) == float(skipped), (acc, metrics)
    assert _same_tree(new.d_params, state.d_params) == skipped
    assert _same_tree(new.d_opt, state.d_opt) == skipped
    assert int(new.d_opt[0].count) == (0 if skipped else 1)
    assert not _same_tree(new.g_params, state.g_params)
    assert int(new.step) == 1


def test_g_loss_weighs_l1_by_l1_weight(subjects, hr_state):
  """G's loss is ``gan_weight * gan + l1_weight * l1`` (checked at l1_weight
  10 and 2), and the two weights move G differently (the mix of the GAN and
  L1 gradients changes; Adam would hide a mere rescaling)."""
  batch = _fixed_batch(subjects, _arithmetic_config(), 2)
  g_params = {}
  for w in (10.0, 2.0):
    step = train.make_train_step(_arithmetic_config(w), "hr", donate=False)
    new, m = step(hr_state, batch, jax.random.key(1))
    gan, l1 = float(m["g_gan"]), float(m["g_l1"])
    assert l1 > 0.01 and gan > 0.01
    np.testing.assert_allclose(float(m["g_loss"]), gan + w * l1, rtol=1e-5)
    g_params[w] = new.g_params
  assert not _same_tree(g_params[10.0], g_params[2.0])


def test_one_step_lowers_d_and_g_losses_on_its_batch(subjects, hr_state):
  """After one small-lr step (D not skipped: accuracy 0 here) D's loss on
  the same real and fake pairs is lower with the new D params than with the
  old, and G's loss (against the new D, as in the step) is lower with the
  new G params than with the old: both descend, neither climbs."""
  from megan_jax import losses
  config = _arithmetic_config()
  step = train.make_train_step(config, "hr", donate=False)
  batch = _fixed_batch(subjects, config, 2)
  state = hr_state.replace(
      d_params=_d_with_constant_logit(hr_state.d_params, 0.0))
  new, m = step(state, batch, jax.random.key(1))
  assert float(m["d_skipped"]) == 0.0
  g_model = state_lib.build_generator(config, "hr")
  d_model = state_lib.build_discriminator(config, "hr")
  real = jnp.asarray(batch["target"])

  @jax.jit
  def step_losses(g_params, d_params, fake_g_params):
    def gen(p):  # dropout is 0: any key
      out = g_model.apply(p, state_lib.generator_input(batch, config, "hr"),
                          train=True, rngs={"dropout": jax.random.key(0)})
      return state_lib.generator_output(out, batch, config, "hr")

    def logits(image):
      out, _ = d_model.apply(d_params, state_lib.discriminator_input(
          batch, image, "hr", config), train=True)
      return out
    d_loss, _ = losses.discriminator_loss(logits(real),
                                          logits(gen(fake_g_params)),
                                          kind=config.loss.gan)
    fake = gen(g_params)
    _, parts = losses.generator_loss(logits(fake), fake, real,
                                     kind=config.loss.gan)
    g_loss = (config.loss.gan_weight * parts["gan"]
              + config.loss.l1_weight * parts["l1"])
    return d_loss, g_loss

  d_old, _ = step_losses(state.g_params, state.d_params, state.g_params)
  np.testing.assert_allclose(float(d_old), float(m["d_loss"]), rtol=1e-5)
  d_new, g_old = step_losses(state.g_params, new.d_params, state.g_params)
  _, g_new = step_losses(new.g_params, new.d_params, state.g_params)
  np.testing.assert_allclose(float(g_old), float(m["g_loss"]), rtol=1e-5)
  assert float(d_new) < float(d_old), (float(d_old), float(d_new))
  assert float(g_new) < float(g_old), (float(g_old), float(g_new))


def test_the_best_checkpoint_is_the_lowest_validation_l1(tmp_path, hr_state):
  """``save_best`` keeps the step of the lowest ``val_l1`` (not the highest):
  after step 5 at 0.1 and step 6 at 0.5 the best step is 5, and restoring
  ``best`` gives step 5's parameters."""
  five = hr_state.replace(
      g_params=jax.tree.map(lambda x: x + 1, hr_state.g_params))
  ck = state_lib.Checkpoints(str(tmp_path), "hr1")
  ck.save_best(5, five, 0.1)
  ck.wait()
  ck.save_best(6, hr_state, 0.5)
  ck.wait()
  assert ck.best.best_step() == 5
  got = ck.restore(state_lib.abstract_state(tiny_config(), "hr"), "best")
  assert _same_tree(got.g_params, five.g_params)
  assert not _same_tree(got.g_params, hr_state.g_params)
  ck.close()


def test_an_empty_saved_intensity_range_names_its_file(tmp_path):
  path = tmp_path / "intensity.json"
  for bad in ('{"lo": 5, "hi": 5}', '{"lo": 0, "hi": Infinity}'):
    path.write_text(bad)
    with pytest.raises(InputError, match=f"{path}: damaged, intensity range"):
      state_lib.load_intensity(str(tmp_path))
  path.write_text('{"lo": 0, "hi": 255}')
  assert state_lib.load_intensity(str(tmp_path)) == (0.0, 255.0)


def test_a_full_disk_stops_training_with_one_line_before_orbax_writes(
    tmp_path, monkeypatch, capsys):
  # On a disk without room for a save, orbax's background writers failed
  # with hundreds of lines of tracebacks (tmpfs of 2.5 MB: 1 378 lines).
  # Now the save is refused first, naming the checkpoint folder.
  import collections
  import shutil
  usage = collections.namedtuple("usage", "total used free")
  real = shutil.disk_usage
  free = {"bytes": 10**12}

  def disk_usage(path):
    return usage(*real(path)[:2], free["bytes"])
  monkeypatch.setattr(state_lib.shutil, "disk_usage", disk_usage)
  state = state_lib.create_state(jax.random.key(0), tiny_config(), "lr")
  need = sum(x.nbytes for x in jax.tree.leaves(state))
  ckpt = state_lib.Checkpoints(str(tmp_path / "run"), "lr")
  try:
    ckpt.check_space(state)  # room: nothing said
    free["bytes"] = need  # the arrays alone, no margin: refused
    with pytest.raises(OSError) as e:
      ckpt.save_latest(1, state)
    assert e.value.errno == __import__("errno").ENOSPC
    assert e.value.filename == ckpt.root and "MiB free" in e.value.strerror
    assert ckpt.latest.latest_step() is None  # nothing was started
  finally:
    ckpt.finish()
  code = cli.main(["train", "--config", "demo:smoke", "--workdir",
                   str(tmp_path / "cli"), "--quiet"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1, err
  assert "checkpoints" in err[0] and "No space left on device" in err[0]
  # Failed saves' closed-loop reports are dropped (as a failed read's).
  import sys
  assert getattr(sys.unraisablehook, "_megan_drops_closed_loop", False)


def test_cli_train_of_a_finished_run_says_nothing_was_trained(
    tmp_path, capsys, monkeypatch):
  # It printed "trained lr, hr1, hr2" (and full bars) though no step ran.
  run = tmp_path / "run"
  for scale, step in (("lr", 4), ("hr1", 4), ("hr2", 2)):
    (run / "checkpoints" / scale / "latest" / str(step)).mkdir(parents=True)
  monkeypatch.setattr(train, "train", lambda config, workdir, scales, **k: {
      s: None for s in ("lr", "hr1", "hr2")})
  argv = ["train", "--config", "demo:smoke", "--workdir", str(run), "--quiet"]
  assert cli.main(argv) == 0  # hr2 was at step 2 of 4
  assert capsys.readouterr().out.startswith("trained lr, hr1, hr2 in")
  (run / "checkpoints" / "hr2" / "latest" / "2").rename(
      run / "checkpoints" / "hr2" / "latest" / "4")
  assert cli.main(argv) == 0
  out = capsys.readouterr().out
  assert "already trained to 4 steps, nothing to do" in out, out


def test_train_arguments_are_checked_before_anything_is_written(tmp_path):
  # A dict config, scales=None, stop_after="x" or -1, workdir None or a
  # file: deep AttributeErrors or TypeErrors before, some after the workdir
  # was written.
  wd = tmp_path / "run"
  a_file = tmp_path / "f"
  a_file.write_text("")
  for kwargs, what in (({"config": {"seed": 1}}, "config: an ml_collections"),
                       ({"workdir": None}, "workdir: a folder path"),
                       ({"workdir": str(a_file)}, "exists and is not a folder"),
                       ({"scales": None}, "scales None"),
                       ({"stop_after": "x"}, "stop_after 'x'"),
                       ({"stop_after": -1}, "stop_after -1"),
                       ({"stop_after": True}, "stop_after True"),
                       ({"scales": 7}, "--scale 7")):
    call = {"config": tiny_config(), "workdir": str(wd), **kwargs}
    with pytest.raises(InputError, match=what):
      train.train(call.pop("config"), call.pop("workdir"), progress=False,
                  **call)
    assert not wd.exists()
  # A name is a config's (it was read as a config missing "seed").
  with pytest.raises(InputError, match="unknown variant 'nonesuch'"):
    train.train("demo:nonesuch", str(wd), progress=False)
  assert not wd.exists()
