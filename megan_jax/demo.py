"""``megan demo``: the whole job on embedded data, nothing downloaded.

Target domain: the MNI152 T1 template (inside nilearn's wheel) at 2 mm.
Source domain: a T2-like contrast of the same template made from its tissue
maps (``data.t2_like``). MEGAN trains on the target only (edges → T1) and
translates the source's edges into T1; since both share the anatomy, the
template's T1 is the ground truth of the translation and the metrics mean
something.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

from megan_jax import configs, data, infer, io, metrics, train, writers
from megan_jax import state as state_lib
from megan_jax.errors import InputError
from megan_jax.normalise import fit_normaliser, normalise, to_unit


def _finished(workdir: str, config) -> bool:
  try:
    _, states = train.restore(workdir)
  except Exception:  # no run: train afresh
    return False
  return all(int(states.get(n).step) >= config.steps if n in states else False
             for n in state_lib.scale_names(config))


# What training writes in a workdir: a folder holding anything else is not
# the demo's to delete.
RUN_ENTRIES = frozenset({".lock", "cache", "checkpoints", "config.json",
                         "intensity.json", "logs", "montages", ".megan-demo"})
# Written in a run `megan demo` trained: only such a run of other settings
# (the demo's before an upgrade changed them) is replaced without --train.
MARKER = ".megan-demo"


def _deletable(workdir: str, config, retrain: bool) -> bool:
  """Whether the demo deletes ``workdir`` to train afresh: asked to
  (``retrain``), or it holds a run `megan demo` trained (``MARKER``) with
  other settings (e.g. the demo's before an upgrade changed them). Raises
  an ``InputError`` rather than delete a folder the demo did not make
  (another config's run, a run of the demo config with other settings
  made by `megan train`, other files)."""
  try:
    saved = state_lib.load_config(workdir)
  except Exception:
    saved = None
  if saved is not None and (saved.get("name") != config.name
                            or saved.data.get("path") != config.data.path):
    raise InputError(
        f"{workdir}: holds a run of config {saved.get('name')!r} on "
        f"{saved.data.get('path')!r}, not one `megan demo` made; the demo "
        "will not delete it (use another --out)")
  stale = saved is not None and not state_lib.same_run(saved, config)
  if stale and not retrain and not os.path.exists(
      os.path.join(workdir, MARKER)):
    raise InputError(
        f"{workdir}: holds a run of the demo config with other settings "
        "that `megan demo` did not train; the demo will not delete it "
        "(--train replaces it; or use another --out)")
  delete = retrain or stale
  others = sorted(n for n in set(os.listdir(workdir)) - RUN_ENTRIES
                  if not n.startswith(io.TEMP_PREFIX))  # a killed write's
  if delete and others:
    raise InputError(f"{workdir}: holds {others[0]!r}, which `megan demo` "
                     "did not make; the demo will not delete the folder to "
                     "train afresh (move it, or use another --out)")
  return delete


# The files a demo writes in its --out folder.
OUTPUTS = ("source.nii.gz", "target.nii.gz", "translated.nii.gz",
           "brain_mask.nii.gz", "metrics.json", "montage.png")


def run(out: str, *, steps: int | None = None, retrain: bool = False,
        config_spec: str = "demo", progress: bool = True) -> dict:
  """Trains (unless a finished run is there) and translates; returns paths
  and scores."""
  config = configs.get_config(config_spec)
  if steps is not None:
    config.steps = int(steps)
  for name in OUTPUTS:  # now, not after minutes of training
    path = os.path.join(out, name)
    if os.path.isdir(path):
      raise InputError(f"output {path}: is a folder")
  workdir = os.path.join(out, "run")
  if os.path.isdir(workdir) and _deletable(workdir, config, retrain):
    shutil.rmtree(workdir)
  reused = _finished(workdir, config)
  if not reused:
    train.train(config, workdir, "all", progress=progress)
    io.write_text(os.path.join(workdir, MARKER),
                  "trained by megan demo: it may replace this run\n")
  # What the run was trained to: a reused run may have more steps than
  # asked for (it is finished for any fewer).
  steps = int(state_lib.load_config(workdir).steps)

  spacing = config.data.spacing or None
  source = data.t2_like(spacing)
  target = data.mni152("t1", spacing)
  paths = {k: os.path.join(out, f"{k}.nii.gz")
           for k in ("source", "target", "translated", "brain_mask")}
  io.save_nifti(paths["source"], source.data, source.affine, source.header)
  io.save_nifti(paths["target"], target.data, target.affine, target.header)
  mask = data.brain_mask(spacing)
  io.save_nifti(paths["brain_mask"], mask.astype(np.uint8), target.affine)

  translator = infer.load(workdir)
  translator.keep_scales = True
  y = translator.translate_volume(source, progress=progress)
  io.save_nifti(paths["translated"], y, source.affine, source.header,
                inputs=[paths["source"]])

  # Scores in [0, 1], inside the brain, against the template's own T1;
  # each volume scaled by its own percentiles, as training scales them.
  tgt = to_unit(normalise(target.data)[0])
  pred = to_unit(fit_normaliser(y, percentiles=tuple(
      config.data.percentiles)).normalise(y))
  scores = metrics.evaluate(pred, tgt, mask)
  paths["metrics"] = os.path.join(out, "metrics.json")
  io.write_text(paths["metrics"], json.dumps(
      {"scores": scores, "mask": "brain_mask.nii.gz",
       "scaling": "each volume by its own percentiles "
                  f"{list(config.data.percentiles)} to [0, 1]",
       "steps": steps, "checkpoint_steps": translator.checkpoint_steps,
       "reused_run": reused, "timings_s": translator.timings}, indent=2))

  panels = {"source (T2-like)": normalise(source.data)[0],
            "edges": translator.scale_outputs["edges"] * 2.0 - 1.0}
  for name, vol in translator.scale_outputs["scales"].items():
    panels[name] = vol
  panels["result"] = pred * 2.0 - 1.0
  panels["target (T1)"] = tgt * 2.0 - 1.0
  paths["montage"] = os.path.join(out, "montage.png")
  writers.montage(panels, paths["montage"])
  return {**paths, "scores": scores, "steps": steps, "reused_run": reused}
