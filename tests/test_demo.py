"""`megan demo` end to end on the smoke config: files, scores, reuse."""
import json
import os

import numpy as np
import pytest

from megan_jax import demo, io, metrics
from megan_jax.normalise import fit_normaliser, normalise, to_unit
from megan_jax import state as state_lib


@pytest.mark.slow
def test_demo_writes_everything_and_reuses_its_run(tmp_path):
  out = str(tmp_path / "demo")
  first = demo.run(out, config_spec="demo:smoke", progress=False)
  for key in ("source", "target", "translated", "brain_mask", "metrics",
              "montage"):
    assert os.path.getsize(first[key]) > 0, key
  with open(first["metrics"]) as f:
    written = json.load(f)
  scores = written["scores"]
  assert set(scores) >= {"ssim", "psnr", "mae", "mse"}
  # The scores are those of the written translation against the written
  # target inside the written mask, each scaled as the demo says it does
  # (scoring the target against itself, or anything but these files,
  # fails here).
  config = state_lib.load_config(os.path.join(out, "run"))
  pred = io.load_nifti(first["translated"]).data
  tgt = io.load_nifti(first["target"]).data
  inside = io.load_nifti(first["brain_mask"]).data > 0
  rescored = metrics.evaluate(
      to_unit(fit_normaliser(pred, percentiles=tuple(
          config.data.percentiles)).normalise(pred)),
      to_unit(normalise(tgt)[0]), inside)
  for name in ("ssim", "psnr", "mae", "mse"):
    assert scores[name] == pytest.approx(rescored[name], rel=1e-4,
                                         abs=1e-6), name
  assert 0.0 < scores["ssim"] < 0.99 and 0.0 < scores["mae"] < 1.0
  assert np.isfinite(scores["psnr"])
  run = os.path.join(out, "run")
  assert os.path.exists(os.path.join(run, demo.MARKER))  # the demo's run
  trained = state_lib.load_config(run).steps
  assert written["steps"] == trained and not written["reused_run"]
  assert set(written["checkpoint_steps"]) == set(state_lib.scale_names(
      state_lib.load_config(run)))
  assert all(1 <= s <= trained for s in written["checkpoint_steps"].values())
  # The mask it scores in is written on the volumes' grid.
  mask, target = io.load_nifti(first["brain_mask"]), io.load_nifti(
      first["target"])
  assert mask.data.shape == target.data.shape
  np.testing.assert_allclose(mask.affine, target.affine)
  assert 0 < mask.data.mean() < 1

  # A second call, even asking for fewer steps, translates with the
  # finished run (no training) and says what that run was trained to.
  stamp = os.path.getmtime(os.path.join(run, "config.json"))
  again = demo.run(out, steps=1, config_spec="demo:smoke", progress=False)
  assert os.path.getmtime(os.path.join(run, "config.json")) == stamp
  assert again["scores"] == pytest.approx(first["scores"], abs=1e-6)
  with open(again["metrics"]) as f:
    written = json.load(f)
  assert written["steps"] == trained > 1 and written["reused_run"]

  # A run of another config there (the demo's before an upgrade changed
  # it) is replaced by a fresh one of the current config.
  path = os.path.join(run, "config.json")
  with open(path) as f:
    saved = json.load(f)
  saved["model"]["ngf"] += 2
  with open(path, "w") as f:
    json.dump(saved, f)
  demo.run(out, config_spec="demo:smoke", progress=False)
  assert state_lib.load_config(run).model.ngf == saved["model"]["ngf"] - 2


def _ablation():
  """launch/demo_ablation.py as a module."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "demo_ablation", os.path.join(os.path.dirname(__file__), "..",
                                    "launch", "demo_ablation.py"))
  ablation = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(ablation)
  return ablation


@pytest.mark.slow
def test_demo_ablation_scores_every_scale_of_every_variant(tmp_path):
  ablation = _ablation()
  results = tmp_path / "results"
  rc = ablation.main(["--config", "demo:smoke", "--steps", "2", "--variants",
                      "paper", "demo", "--out", str(tmp_path / "runs"),
                      "--results", str(results), "--no-progress"])
  assert rc == 0
  out = json.loads((results / "demo-ablation.json").read_text())
  scales = ["lr", "hr1", "hr2"]  # demo:smoke has two HR scales
  for variant in ("paper", "demo"):
    for scale in scales:
      for sketch in ("t2_like", "t1"):
        (row,) = [r for r in out["rows"] if (r["variant"], r["scale"],
                                             r["sketch"]) == (variant, scale,
                                                              sketch)]
        assert -1.0 <= row["ssim"] <= 1.0 and 0.0 <= row["mae"] <= 1.0
  ref = [r for r in out["rows"] if r["variant"] == "upsampled"]
  assert sorted(r["scale"] for r in ref) == ["hr1", "hr2"]
  settings = out["meta"]["variants"]
  assert settings["paper"]["settings"]["hr_residual"] is False
  assert settings["paper"]["settings"]["dropout"] == 0.5
  assert settings["demo"]["settings"]["hr_residual"] is True
  # The paper variant's run really trained without the residual.
  saved = state_lib.load_config(str(tmp_path / "runs" / "paper"))
  assert saved.model.hr_residual is False and saved.optim.lr == 2e-4
  md = (results / "demo-ablation.md").read_text()
  assert "| paper |" in md and "| upsampled | – |" in md
  assert (results / "demo-ablation.png").stat().st_size > 0


def test_demo_deletes_only_a_run_it_made(tmp_path):
  # `megan demo --out proj` beside the user's own `megan train` run in
  # proj/run used to delete it (a run of "another config") and retrain.
  from megan_jax import configs
  from megan_jax.errors import InputError
  demo_config = configs.get_config("demo:smoke")
  run = tmp_path / "run"
  run.mkdir()
  mine = configs.get_config("demo:smoke")
  mine.data.path = str(tmp_path / "my_volumes")
  state_lib.save_config(str(run), mine)
  for retrain in (False, True):
    with pytest.raises(InputError, match="not one `megan demo` made"):
      demo._deletable(str(run), demo_config, retrain)
  with pytest.raises(InputError, match="not one `megan demo` made"):
    demo.run(str(tmp_path), config_spec="demo:smoke", progress=False)
  assert state_lib.load_config(str(run)).data.path == mine.data.path
  # Another config name on the demo's own data: not the demo's either.
  os.remove(run / "config.json")
  named = configs.get_config("demo:smoke")
  named.name = "mine"
  state_lib.save_config(str(run), named)
  with pytest.raises(InputError, match="not one `megan demo` made"):
    demo._deletable(str(run), demo_config, False)

  # A demo run: kept if it is this config's, replaced if another's or
  # when asked to retrain.
  os.remove(run / "config.json")
  state_lib.save_config(str(run), demo_config)
  assert not demo._deletable(str(run), demo_config, False)
  assert demo._deletable(str(run), demo_config, True)
  older = configs.get_config("demo:smoke")
  older.model.ngf += 2
  os.remove(run / "config.json")
  state_lib.save_config(str(run), older)
  # Other settings of the demo config: replaced only if `megan demo`
  # trained it (its marker); a user's `megan train --config demo` run in
  # the same place is refused (it was deleted), unless --train.
  with pytest.raises(InputError, match="did not train"):
    demo._deletable(str(run), demo_config, False)
  assert demo._deletable(str(run), demo_config, True)
  (run / demo.MARKER).write_text("")
  assert demo._deletable(str(run), demo_config, False)
  os.remove(run / demo.MARKER)

  # No config there: --train deletes only what training writes.
  os.remove(run / "config.json")
  (run / "checkpoints").mkdir()
  assert demo._deletable(str(run), demo_config, True)
  assert not demo._deletable(str(run), demo_config, False)
  (run / "notes.txt").write_text("mine")
  assert not demo._deletable(str(run), demo_config, False)  # kept, no error
  with pytest.raises(InputError, match="'notes.txt'"):
    demo._deletable(str(run), demo_config, True)
  # A demo run with the user's files beside it: not deleted either (to
  # retrain, or because an upgrade changed the demo's config).
  (run / demo.MARKER).write_text("")
  state_lib.save_config(str(run), older)
  for cfg, retrain in ((older, True), (demo_config, False)):
    with pytest.raises(InputError, match="'notes.txt'"):
      demo._deletable(str(run), cfg, retrain)
  assert not demo._deletable(str(run), older, False)  # the same run: kept
  # A killed write's temporary file (config.json's, say) is the demo's own.
  os.remove(run / "notes.txt")
  (run / (io.temp_prefix(run / "config.json") + "1-x.json")).write_text("{")
  assert demo._deletable(str(run), demo_config, True)


def test_demo_refuses_an_output_name_taken_by_a_folder_before_training(
    tmp_path, capsys):
  # Was found only after training and translating, with half the outputs
  # written.
  from megan_jax import cli
  for name in demo.OUTPUTS:
    out = tmp_path / name.split(".")[0]
    (out / name).mkdir(parents=True)
    assert cli.main(["demo", "--out", str(out), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out / name) in err, err
    assert "is a folder" in err
    assert sorted(os.listdir(out)) == [name]  # no run, nothing written


def test_demo_ablation_checks_its_folders_before_training(tmp_path, capsys):
  # --results a file: found after ~15 min of training (a traceback);
  # --out a file: a NotADirectoryError traceback.
  ablation = _ablation()
  a_file = tmp_path / "f"
  a_file.write_text("")
  for argv, named in ((["--out", str(a_file)], "--out"),
                      (["--out", str(tmp_path / "o"), "--results",
                        str(a_file)], "--results")):
    assert ablation.main(["--config", "demo:smoke", "--steps", "1",
                          "--no-progress"] + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"demo_ablation: error: {named} ")
    assert err.count("\n") == 1
  assert sorted(os.listdir(tmp_path)) == ["f"]  # the made --out removed
