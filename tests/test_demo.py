"""`megan demo` end to end on the smoke config: files, scores, reuse."""
import json
import os

import pytest

from megan_jax import demo
from megan_jax import state as state_lib


@pytest.mark.slow
def test_demo_writes_everything_and_reuses_its_run(tmp_path):
  out = str(tmp_path / "demo")
  first = demo.run(out, config_spec="demo:smoke", progress=False)
  for key in ("source", "target", "translated", "metrics", "montage"):
    assert os.path.getsize(first[key]) > 0, key
  with open(first["metrics"]) as f:
    scores = json.load(f)["scores"]
  assert set(scores) >= {"ssim", "psnr", "mae", "mse"}
  assert -1.0 <= scores["ssim"] <= 1.0 and 0.0 <= scores["mae"] <= 1.0
  run = os.path.join(out, "run")
  stamp = os.path.getmtime(os.path.join(run, "config.json"))

  # A second call translates with the finished run: no training.
  again = demo.run(out, config_spec="demo:smoke", progress=False)
  assert os.path.getmtime(os.path.join(run, "config.json")) == stamp
  assert again["scores"] == pytest.approx(first["scores"], abs=1e-6)

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
