"""`state.check_config`: bad config values are one-line errors, found before
anything is written, and the size rules are the networks' own."""
import itertools
import os

import pytest

from megan_jax import baselines, cli, configs, tiling, train
from megan_jax import state as state_lib
from megan_jax.errors import InputError


def smoke():
  c = configs.get_config("demo:smoke")
  c.unlock()
  return c


@pytest.mark.parametrize("spec", ["default", "demo", "demo:smoke", "brats_t2",
                                  "copd_ct"])
def test_the_shipped_configs_pass(spec):
  state_lib.check_config(configs.get_config(spec))
  state_lib.check_config(baselines.patch_gan_config(configs.get_config(spec)))


# Each: an override a fuzzer found crashing (or silently accepted), and the
# field the one-line error must name.
BAD = [
    ("lr_size=0", "lr_size"),  # was ZeroDivisionError
    ("lr_size=-16", "lr_size"),  # math domain error
    ("lr_size=18", "lr_size"),  # not a multiple of 4 (3 U-Net levels)
    ("patch_size=0", "patch_size"),
    ("patch_size=7", "patch_size"),  # TypeError in concatenate
    ("model.d_layers=3", "patch_size"),  # a 16³ patch is too small for 3
    ("data.percentiles=(1,)", "data.percentiles"),
    ("data.percentiles=(50.0,10.0)", "data.percentiles"),
    ("train.hr_batch_size=0", "train.hr_batch_size"),  # nothing to stack
    ("train.log_every=0", "train.log_every"),  # n % 0
    ("seed=-1", "seed"),
    ("seed=4294967296", "seed"),  # jax.random.key(2**32) is key(0)
    ("steps=0", "steps"),  # printed "trained" and left no checkpoint
    ("steps=-1", "steps"),
    ("border=-3", "border"),
    ("border=100", "border"),
    ("border=8", "border"),  # patch 16: nothing left in the centre
    ("infer.batch_size=0", "infer.batch_size"),
    ("hr_condition=foo", "hr_condition"),
    ("data.orientation=XYZ", "data.orientation"),
    ("data.spacing=-4.0", "data.spacing"),  # said "constant image"
    ("data.window=(5.0,1.0)", "data.window"),
    ("edges.low=0.5", "edges.low"),  # above edges.high
    ("edges.high=1.0", "edges.high"),  # no voxel above the peak: no edges
    ("model.d_output=pix2pix", "model.d_output"),
    ("edges.sigma=-1.0", "edges.sigma"),
    ("loss.l1_weight=-1.0", "loss.l1_weight"),
    ("optim.lr=0.0", "optim.lr"),
    ("optim.b1=1.0", "optim.b1"),
    ("optim.decay=cosine", "optim.decay"),
    ("model.ngf=0", "model.ngf"),
    ("model.dropout=1.0", "model.dropout"),
    ("augment.blur_prob=2.0", "augment.blur_prob"),
    ("augment.edge_gain=1.5", "augment.edge_gain"),
]


@pytest.mark.parametrize("override,field", BAD)
def test_bad_override_is_one_line_and_writes_nothing(tmp_path, capsys,
                                                     override, field):
  work = tmp_path / "run"
  code = cli.main(["train", "--config", "demo:smoke", "--workdir", str(work),
                   "--quiet", f"--config.{override}"])
  err = capsys.readouterr().err.strip()
  assert code == 2, err
  assert len(err.splitlines()) == 1 and "Traceback" not in err, err
  assert f"config {field}" in err, err
  assert not work.exists()  # no config.json, cache or logs to lock it
  # the same as a library call
  c = smoke()
  configs.apply_overrides(c, [f"--config.{override}"])
  with pytest.raises(InputError, match=field.replace(".", r"\.")):
    state_lib.check_config(c)
  with pytest.raises(InputError):
    state_lib.save_config(str(work), c)
  assert not work.exists()


def test_hr_residual_needs_a_previous_scale():
  c = smoke()
  c.hr_condition = "none"
  with pytest.raises(InputError, match="hr_residual"):
    state_lib.check_config(c)


def _accepted_and_builds(c, kind: str, field: str) -> tuple[bool, bool]:
  """Whether `check_config` accepts ``c`` (a refusal must name ``field``)
  and whether the ``kind`` networks of ``c`` build at all."""
  try:
    state_lib.check_config(c)
    accepted = True
  except InputError as e:
    assert f"config {field}" in str(e)
    accepted = False
  try:
    state_lib.abstract_state(c, kind)
    builds = True
  except Exception:  # pylint: disable=broad-except  # any crash counts
    builds = False
  return accepted, builds


def test_lr_size_rule_is_the_lr_networks_own():
  # check_config accepts an lr_size exactly when both LR networks build.
  c = smoke()
  c.model.ngf = c.model.ndf = 2
  c.patch_size = 32  # large enough for every d_layers below
  # "map": the LR discriminator's map is lr_size / 2**d_layers - 1 wide,
  # empty (a NaN loss) at lr_size = 2**d_layers.
  for gen, levels, d_layers, size, out in itertools.product(
      ("unet", "resnet"), (2, 3), (1, 2, 3), (4, 6, 8, 12, 16),
      ("code", "map")):
    c.model.lr_generator, c.model.unet_levels = gen, levels
    c.model.d_layers, c.lr_size, c.model.d_output = d_layers, size, out
    accepted, builds = _accepted_and_builds(c, "lr", "lr_size")
    assert accepted == builds, (gen, levels, d_layers, size, out)


def test_an_empty_lr_discriminator_map_is_refused():
  # lr_size = 2**d_layers passed the multiple rule, and "map"'s last conv
  # left a 0³ map of logits: the GAN loss was NaN from the first step.
  c = smoke()
  c.model.d_output, c.model.d_layers, c.lr_size = "map", 2, 4
  with pytest.raises(InputError, match=r"config lr_size.*d_output='map'"):
    state_lib.check_config(c)
  with pytest.raises(InputError, match="too small for output='map'"):
    state_lib.abstract_state(c, "lr")
  c.lr_size = 8  # a 1³ map
  state_lib.check_config(c)
  d = state_lib.abstract_state(c, "lr")
  assert d.d_params is not None


def test_patch_size_and_border_rules_are_the_hr_networks_and_grids_own():
  c = smoke()
  c.model.ngf = c.model.ndf = 2
  c.lr_size = 32
  for d_layers, p, cond in itertools.product(
      (1, 2, 3), (4, 6, 8, 12, 16, 20, 24, 32), ("concat", "upsampled",
                                                 "none")):
    c.model.d_layers, c.patch_size, c.hr_condition = d_layers, p, cond
    c.model.hr_residual = cond != "none"
    c.border = 0
    accepted, builds = _accepted_and_builds(c, "hr", "patch_size")
    assert accepted == builds, (d_layers, p, cond)
  c.patch_size, c.model.d_layers, c.hr_condition = 16, 2, "upsampled"
  c.model.hr_residual = True
  for border in range(-2, 10):
    c.border = border
    try:
      state_lib.check_config(c)
      accepted = True
    except InputError as e:
      assert "config border" in str(e)
      accepted = False
    try:
      tiling.make_plan((40, 40, 40), c.patch_size, border)
      plans = True
    except InputError:
      plans = False
    assert accepted == plans, border


def test_unknown_variant_is_refused():
  with pytest.raises(InputError, match="unknown variant 'bogus'.*smoke"):
    configs.get_config("demo:bogus")
  with pytest.raises(InputError, match="no variants"):
    configs.get_config("default:smoke")
  assert configs.get_config("demo:smoke").steps == 4
  top = os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py")
  with pytest.raises(InputError, match="unknown variant"):
    configs.get_config(f"{top}:bogus")


def test_a_users_failing_config_file_is_one_line(tmp_path, capsys):
  raises = tmp_path / "raises.py"
  raises.write_text("def get_config(arg=None):\n"
                    "  raise ValueError('no such\\nsetting: ' + str(arg))\n")
  with pytest.raises(InputError, match=r"raises\.py.*ValueError: no such "
                     "setting: x") as e:
    configs.get_config(f"{raises}:x")
  assert "\n" not in str(e.value)
  wrong = tmp_path / "wrong.py"
  wrong.write_text("def get_config(arg=None):\n  return {'lr_size': 16}\n")
  with pytest.raises(InputError, match=r"wrong\.py.*returned a dict"):
    configs.get_config(str(wrong))
  code = cli.main(["train", "--config", str(wrong), "--workdir",
                   str(tmp_path / "run")])
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1 and "wrong.py" in err
  assert not (tmp_path / "run").exists()


def test_train_checks_the_config_before_the_workdir_or_data(tmp_path):
  c = smoke()
  c.data.path = str(tmp_path / "missing")  # would fail too, but later
  c.steps = 0
  with pytest.raises(InputError, match="config steps"):
    train.train(c, str(tmp_path / "run"), progress=False)
  assert not (tmp_path / "run").exists()


def test_the_library_entry_points_check_the_config_too():
  """``make_train_step`` and ``create_state`` called from Python say which
  field is wrong, as the command line does, not a KeyError from inside."""
  import jax
  c = smoke()
  c.model.dtype = "fp16"
  for call in (lambda: train.make_train_step(c, "hr"),
               lambda: state_lib.create_state(jax.random.key(0), c, "lr"),
               lambda: state_lib.build_generator(c, "hr")):
    with pytest.raises(InputError, match="model.dtype: must be one of "
                       "'float32', 'fp32', 'bfloat16', 'bf16', got 'fp16'"):
      call()
  c.model.dtype = "fp32"  # the names the Translator takes, too
  state_lib.check_config(c)
  assert state_lib.build_generator(c, "hr").dtype == jax.numpy.float32


def test_the_default_config_is_the_papers():
  """`default` carries METHOD.md's settings: "L1 weight 10 in the code. Adam,
  lr 2e-4, beta1 0.5"; "skips D's update when D's accuracy on the batch is
  above 0.8"; the paper's log-likelihood GAN loss; LR 64³ from 128³ edges;
  32³ HR patches keeping their 20³ centre; ngf/ndf 64, 6 ResNet blocks."""
  c = configs.get_config("default")
  assert c.loss.l1_weight == 10.0 and c.loss.gan_weight == 1.0
  assert c.loss.gan == "bce"
  assert c.loss.d_skip_accuracy == 0.8
  assert (c.optim.lr, c.optim.b1) == (2e-4, 0.5)
  assert c.lr_size == 64 and c.patch_size == 32
  assert c.patch_size - 2 * c.border == 20
  assert (c.model.ngf, c.model.ndf, c.model.n_blocks) == (64, 64, 6)


def test_a_saved_config_restores_whatever_later_rules_say():
  """``abstract_state`` (what restoring a trained run builds on) does not
  re-check the run's config: a field a later version refuses, which
  inference does not use, must not make a trained run unreadable."""
  c = smoke()
  c.train.val_patches = -1  # refused by check_config
  with pytest.raises(InputError):
    state_lib.check_config(c)
  assert state_lib.abstract_state(c, "hr").step.shape == ()


def test_a_config_file_of_any_name_loads_or_is_one_line(tmp_path, capsys):
  # Read as Python whatever its suffix (spec_from_file_location has no
  # loader for ".txt" or none: that was a traceback).
  for name in ("cfg.txt", "cfg"):
    path = tmp_path / name
    path.write_text("from megan_jax.configs import demo\n"
                    "def get_config(arg=None):\n"
                    "  return demo.get_config('smoke')\n")
    assert configs.get_config(str(path)).lr_size == smoke().lr_size
  not_python = tmp_path / "image.nii"
  not_python.write_bytes(b"\x5c\x01\x00\x00 not python \xff")
  with pytest.raises(InputError, match=r"image\.nii: failed to load") as e:
    configs.get_config(str(not_python))
  assert "\n" not in str(e.value)
  code = cli.main(["train", "--config", str(not_python), "--workdir",
                   str(tmp_path / "run")])
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1 and "image.nii" in err
  assert not (tmp_path / "run").exists()


def test_overrides_read_true_false_words_and_keep_names_as_text():
  c = smoke()
  for word, value in (("true", True), ("False", False), ("1", True),
                      ("no", False), ("ON", True), ("True", True)):
    configs.apply_overrides(c, [f"--config.model.hr_residual={word}"])
    assert c.model.hr_residual is value, word
  for word in ("ture", "yes please", "2", "None"):  # was silently False
    with pytest.raises(InputError, match="hr_residual") as e:
      configs.apply_overrides(c, [f"--config.model.hr_residual={word}"])
    assert "\n" not in str(e.value)
  # A string field takes a name that reads as a number, as text.
  configs.apply_overrides(c, ["--config.data.path=123", "--config.name=0.5"])
  assert (c.data.path, c.name) == ("123", "0.5")
  configs.apply_overrides(c, ["--config.data.path=brains/t1"])
  assert c.data.path == "brains/t1"
  # Numbers still go to numeric fields, as numbers.
  configs.apply_overrides(c, ["--config.steps=7", "--config.optim.lr=1"])
  assert c.steps == 7 and c.optim.lr == 1.0 and isinstance(c.optim.lr, float)


def test_a_users_config_file_missing_a_field_is_named(tmp_path, capsys):
  # Was "config seed: missing", with no word of which file.
  path = tmp_path / "mine.py"
  path.write_text("from megan_jax.configs import demo\n"
                  "def get_config(arg=None):\n"
                  "  c = demo.get_config('smoke')\n"
                  "  del c['seed']\n"
                  "  return c\n")
  code = cli.main(["train", "--config", str(path), "--workdir",
                   str(tmp_path / "run")])
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1, err
  assert "config seed: missing" in err and f"the config of {path})" in err
  assert not (tmp_path / "run").exists()
