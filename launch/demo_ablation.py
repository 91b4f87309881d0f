"""Each scale of the demo alone, under the paper's training settings and ours.

Trains the demo config (MNI152 T1 template, the target domain) once per
variant and scores every scale *alone* on the T2-like contrast's sketch
(the demo's source): the LR scale from the sketch, each HR scale fed the
*real* T1 scale below it (so a scale's score is not the scales below it),
against the T1 at that scale, inside the brain (SSIM, PSNR, MAE, MSE on
[0, 1]). The same on the T1's own sketch shows what is learnt versus what
carries over to another contrast. Reference row: the real scale below,
trilinearly upsampled.

  python launch/demo_ablation.py                  # ~15 min on 2 CPU cores
  python launch/demo_ablation.py --variants paper demo --steps 1000

Variants (config fields over the demo config):

  paper   Adam 2e-4, dropout 0.5, no edge_gain, no hr_residual
  fast    Adam 1e-3, no dropout, edge_gain 1, no hr_residual
  demo    the demo config as it is (fast + hr_residual)

Writes ``benchmarks/results/demo-ablation.{json,md,png}`` (``--results``);
the runs stay under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

VARIANTS = {
    "paper": {"optim.lr": 2e-4, "model.dropout": 0.5,
              "augment.edge_gain": 0.0, "model.hr_residual": False},
    "fast": {"optim.lr": 1e-3, "model.dropout": 0.0,
             "augment.edge_gain": 1.0, "model.hr_residual": False},
    "demo": {},
}
REFERENCE = "upsampled"  # the real scale below, trilinearly upsampled


def parse_args(argv):
  p = argparse.ArgumentParser(
      description="Scores each scale of the demo alone under the paper's "
      "training settings and ours (see the module doc).")
  p.add_argument("--variants", nargs="+", default=list(VARIANTS),
                 choices=list(VARIANTS))
  p.add_argument("--steps", type=int, default=None,
                 help="training steps per scale (default: the config's)")
  p.add_argument("--config", default="demo",
                 help="base config (tests use demo:smoke)")
  p.add_argument("--out", default=os.path.join("runs", "demo-ablation"),
                 help="folder for the training runs")
  p.add_argument("--results", default=os.path.join("benchmarks", "results"))
  p.add_argument("--no-progress", action="store_true")
  return p.parse_args(argv)


def variant_config(base: str, variant: str, steps: int | None):
  from megan_jax import configs
  c = configs.get_config(base)
  for key, value in VARIANTS[variant].items():
    group, field = key.split(".")
    c[group][field] = value
  if steps is not None:
    c.steps = int(steps)
  return c


def settings(c) -> dict:
  return {"lr": c.optim.lr, "dropout": c.model.dropout,
          "edge_gain": float(c.augment.edge_gain),
          "hr_residual": bool(c.model.hr_residual),
          "l1_weight": c.loss.l1_weight}


def _volumes(config):
  """Normalised T1 (target) and T2-like (source) pyramids and sketches, the
  brain mask of every scale."""
  from megan_jax import data, dataset, resample
  from megan_jax.normalise import normalise
  spacing = config.data.spacing or None
  arrays = {name: dataset.preprocess(normalise(vol.data)[0], config,
                                     foreground=False)
            for name, vol in (("t1", data.mni152("t1", spacing)),
                              ("t2_like", data.t2_like(spacing)))}
  masks = [data.brain_mask(spacing).astype(np.float32)]
  for _ in range(config.num_hr_scales):
    masks.insert(0, np.asarray(resample.downsample2(masks[0])))
  return arrays, [m > 0.5 for m in masks]


def generate_scale(config, params, name: str, sketch: dict, real: dict,
                   batch: int = 64) -> np.ndarray:
  """Scale ``name`` of the cascade alone: LR from ``sketch``'s LR input; HR
  scale k from ``sketch``'s edges and ``real``'s scale k-1."""
  from megan_jax import resample, tiling, train
  if name == "lr":
    gen = train.make_eval_fn(config, "lr")(
        params, {"edges": sketch["lr_input"][None, ..., None]})
    _, crop = resample.lr_pad(real["image_0"], config.lr_size)
    return np.asarray(gen)[0, ..., 0][crop]
  k = int(name[2:])
  prev = real[f"image_{k - 1}"]
  shape = real[f"image_{k}"].shape
  even = tuple(2 * n for n in prev.shape)
  plan = tiling.make_plan(even, config.patch_size, config.border)
  edges, _ = resample.pad_to(sketch[f"edges_{k}"], even, 0.0, low=(0, 0, 0))
  fn = train.make_eval_fn(config, "hr")
  out = []
  for start in range(0, plan.num_patches, batch):
    idx = np.arange(start, min(start + batch, plan.num_patches))
    b = {"prev": tiling.previous_patches(prev, plan, indices=idx)[..., None],
         "edges": tiling.extract_batch(edges, plan, idx,
                                       pad_value=0.0)[..., None]}
    out.append(np.asarray(fn(params, b))[..., 0])
  full = tiling.stitch(np.concatenate(out), plan)
  return np.asarray(full)[tuple(slice(0, n) for n in shape)]


def _score(pred, target, mask) -> dict:
  from megan_jax import metrics
  from megan_jax.normalise import to_unit
  s = metrics.evaluate(to_unit(np.clip(pred, -1, 1)), to_unit(target), mask)
  return {k: float(v) for k, v in s.items() if k in ("ssim", "psnr", "mae",
                                                     "mse")}


def markdown(result: dict) -> str:
  rows = result["rows"]
  scales = list(dict.fromkeys(r["scale"] for r in rows))
  names = list(dict.fromkeys(r["variant"] for r in rows))
  m = result["meta"]
  lines = [f"Each scale alone, SSIM inside the brain on the T2-like sketch "
           f"(on the T1's own sketch in brackets); HR scales fed the real "
           f"scale below. {m['steps']} steps per scale, config "
           f"`{m['config']}`, {m['device']} ({m['backend']}).", "",
           "| variant | " + " | ".join(scales) + " |",
           "|---|" + "---|" * len(scales)]
  for name in names:
    cells = []
    for s in scales:
      got = {r["sketch"]: r for r in rows
             if r["variant"] == name and r["scale"] == s}
      main = got.get("t2_like", got.get("none"))
      if main is None:
        cells.append("–")
        continue
      cell = f"{main['ssim']:.3f}"
      if "t1" in got:
        cell += f" ({got['t1']['ssim']:.3f})"
      cells.append(cell)
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  import jax
  from megan_jax import io, resample, train, writers
  from megan_jax import state as state_lib
  from megan_jax.errors import InputError

  made = []  # folders this run made: removed if a failure leaves them empty
  try:  # both usable before any work (the results come last)
    for flag, folder in (("--out", args.out), ("--results", args.results)):
      made += io.make_folder(folder, flag)
  except InputError as e:
    print(f"demo_ablation: error: {e}", file=sys.stderr)
    io.remove_empty_folders(made)
    return 2
  t_start = time.perf_counter()
  rows, panels, meta_variants = [], {}, {}
  arrays = masks = config = None
  try:
    for variant in args.variants:
      config = variant_config(args.config, variant, args.steps)
      if arrays is None:
        arrays, masks = _volumes(config)
      workdir = os.path.join(args.out, variant)
      t0 = time.perf_counter()
      train.train(config, workdir, "all", progress=not args.no_progress)
      meta_variants[variant] = {"settings": settings(config),
                                "train_s": round(time.perf_counter() - t0, 1)}
      _, states = train.restore(workdir)
      for name in state_lib.scale_names(config):
        k = 0 if name == "lr" else int(name[2:])
        for sketch in ("t2_like", "t1"):
          y = generate_scale(config, states[name].g_params, name,
                             arrays[sketch], arrays["t1"])
          rows.append({"variant": variant, "scale": name, "sketch": sketch,
                       **_score(y, arrays["t1"][f"image_{k}"], masks[k])})
          if sketch == "t2_like" and name in ("lr", f"hr{config.num_hr_scales}"):
            panels[f"{variant}: {name}"] = y
      print(f"[demo_ablation] {variant}: "
            + ", ".join(f"{r['scale']} {r['ssim']:.3f}" for r in rows
                        if r["variant"] == variant and r["sketch"] == "t2_like"),
            flush=True)
  except InputError as e:
    print(f"demo_ablation: error: {e}", file=sys.stderr)
    io.remove_empty_folders(made)
    return 2

  t1 = arrays["t1"]
  for k in range(1, config.num_hr_scales + 1):
    up = np.asarray(resample.upsample2(t1[f"image_{k - 1}"]))
    up = up[tuple(slice(0, n) for n in t1[f"image_{k}"].shape)]
    rows.append({"variant": REFERENCE, "scale": f"hr{k}", "sketch": "none",
                 **_score(up, t1[f"image_{k}"], masks[k])})
    if k == config.num_hr_scales:
      panels[f"{REFERENCE}: hr{k}"] = up
  panels["real T1: lr"] = t1["image_0"]
  panels[f"real T1: hr{config.num_hr_scales}"] = t1[
      f"image_{config.num_hr_scales}"]

  result = {
      "meta": {"config": args.config, "steps": config.steps,
               "spacing": config.data.spacing,
               "jax_version": jax.__version__,
               "backend": jax.default_backend(),
               "device": jax.devices()[0].device_kind,
               "cpu_count": os.cpu_count(), "platform": platform.platform(),
               "variants": meta_variants,
               "wall_s": round(time.perf_counter() - t_start, 1)},
      "rows": rows,
  }
  os.makedirs(args.results, exist_ok=True)
  stem = os.path.join(args.results, "demo-ablation")
  io.write_text(stem + ".json", json.dumps(result, indent=2))
  io.write_text(stem + ".md", markdown(result))
  writers.montage(panels, stem + ".png")
  print(markdown(result))
  print(f"[demo_ablation] wrote {stem}.json, .md, .png in "
        f"{result['meta']['wall_s']:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
