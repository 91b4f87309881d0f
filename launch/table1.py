"""A Table-1-style comparison: MEGAN against the paper's baselines.

Trains MEGAN and the patch-wise GAN on the train split's target-domain
volumes (translation is trained on the target domain: edges -> image),
translates the test split's source volumes, and scores every method against
the paired targets (SSIM, PSNR, MAE, MSE on [0, 1], inside the test mask;
seam score; seconds per volume):

  megan                 the cascade (LR + every HR scale)
  patch_gan             HR generator on full-resolution patches, edges only
  small_gan_upsampled   MEGAN's scale-0 output, trilinearly upsampled
  nlm                   non-local means of the input (scikit-image)
  input                 the source as is

Data: by default the embedded paired benchmark (``megan_jax.paired``:
synthetic contrasts of the real MNI152 template, seeded, regenerated on
demand, held-out test subjects); ``--data DIR`` takes your own folder with
``train/target/``, ``test/source/``, ``test/target/`` and optionally
``test/mask/`` (same file names), e.g. BRATS T1/T2 or COPD B80f/B20f (see
``launch/table1_brats.sh``, ``launch/table1_copd.sh``).

  python launch/table1.py --task t1t2 --steps 500
  python launch/table1.py --task kernel --steps 500
  python launch/table1.py --task t1t2 --spacing 1.0 --config default \
      --steps 20000                        # full 1 mm, paper widths: a GPU
  python launch/table1.py --data /data/brats_pairs --task brats_t1t2 \
      --config brats_t2 --config.edges.use_label=False --steps 20000

Writes ``benchmarks/results/table1-<task>.{json,md,png}`` (``--results``)
and keeps the runs and translated volumes under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import numpy as np

# Paper numbers (Uzunova, Ehrhardt & Handels, Table 1: COPD thorax CT, B80f -> B20f;
# BRATS T1 -> T2 SSIM), for the README next to ours.
PAPER = {
    "kernel": {
        "task": "COPD CT B80f -> B20f (paper, 56 subjects, ~512³)",
        "megan": {"ssim": 0.773, "mae": 0.033, "mse": 0.004, "psnr": 24.1},
        "patch_gan": {"ssim": 0.706, "mae": 0.049, "mse": 0.008, "psnr": 21.2},
        "small_gan_upsampled": {"ssim": 0.633, "mae": 0.058, "mse": 0.011,
                                "psnr": 19.5},
        "nlm": {"ssim": 0.773, "mae": 0.031, "mse": 0.004, "psnr": 19.5},
        "input": {"ssim": 0.480, "mae": 0.065, "mse": 0.012, "psnr": 19.2},
    },
    "t1t2": {
        "task": "BRATS T1 -> T2 (paper, 274 subjects, 155×240×240)",
        "megan": {"ssim": 0.911},
    },
}
METHODS = ("megan", "patch_gan", "small_gan_upsampled", "nlm", "input")
LABELS = {"megan": "MEGAN", "patch_gan": "patch-wise GAN",
          "small_gan_upsampled": "small GAN + upsampling",
          "nlm": "NLM-filtered input", "input": "input as is"}


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="Config fields can be overridden as for megan train: "
      "--config.FIELD=VALUE (e.g. --config.model.ngf=16). Example: python "
      "launch/table1.py --task kernel --steps 500")
  p.add_argument("--task", default="t1t2",
                 help="embedded paired task, t1t2 (default) or kernel; with "
                 "--data any name, used for the results' file names")
  p.add_argument("--steps", type=int, default=500,
                 help="training steps per scale, the same for every GAN "
                 "(default 500)")
  p.add_argument("--out", default=None,
                 help="folder for data, runs and outputs "
                 "(default runs/table1-<task>)")
  p.add_argument("--results", default=os.path.join("benchmarks", "results"),
                 help="where table1-<task>.{json,md,png} go")
  p.add_argument("--config", default="demo",
                 help="base config (default demo: the demo network widths; "
                 "brats_t2 / copd_ct for the paper's)")
  p.add_argument("--data", default=None,
                 help="your own folder (train/target, test/source, "
                 "test/target[, test/mask]) instead of the embedded benchmark")
  p.add_argument("--spacing", type=float, default=1.5,
                 help="voxel size of the embedded benchmark in mm (default "
                 "1.5, ~110×130×110, for CPUs; 1.0 is the full size, for a GPU "
                 "with --config default)")
  p.add_argument("--max-side", type=int, default=None,
                 help="crop of the embedded benchmark, voxels per side "
                 "(default 128 at >= 1.5 mm, no cap below; with the demo "
                 "config scale 0 must fit its 32³ LR grid)")
  p.add_argument("--n-train", type=int, default=4)
  p.add_argument("--n-test", type=int, default=2)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--no-nlm", action="store_true",
                 help="skip non-local means (slow on big volumes)")
  p.add_argument("--no-progress", action="store_true")
  argv = list(sys.argv[1:] if argv is None else argv)
  # --config.FIELD=VALUE overrides (as for megan train) pass through.
  overrides = [a for a in argv if a.startswith("--config.")]
  args = p.parse_args([a for a in argv if not a.startswith("--config.")])
  args.overrides = overrides
  from megan_jax import paired
  if args.data is None and args.task not in paired.TASKS:
    p.error(f"--task {args.task}: the embedded benchmark has "
            f"{', '.join(paired.TASKS)} (or pass --data DIR)")
  if not args.task.replace("_", "").replace("-", "").isalnum():
    p.error(f"--task {args.task!r}: letters, digits, - and _ only")
  if not (math.isfinite(args.spacing) and args.spacing > 0):
    p.error(f"--spacing {args.spacing:g}: must be a positive number of mm")
  if args.max_side is not None and args.max_side < 1:
    p.error(f"--max-side {args.max_side}: must be >= 1")
  if args.seed < 0:
    p.error(f"--seed {args.seed}: must be >= 0")
  if args.max_side is None:
    args.max_side = 128 if args.spacing >= 1.5 else None
  if args.steps < 1:
    p.error(f"--steps {args.steps}: must be >= 1")
  for name in ("n_train", "n_test"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be "
              ">= 1")
  return args


# Config fields table1 sets itself (the flag that sets each): an override
# of one would be silently undone.
OWN_FIELDS = {"data.path": "--data", "steps": "--steps", "seed": "--seed"}
OWN_FIELDS_BUILTIN_DATA = {"data.spacing": "--spacing",
                           "train.checkpoint_every": "--steps",
                           "train.eval_every": "--steps",
                           "train.montage_every": "--steps"}


def _config(args, train_dir: str):
  from megan_jax import configs, state
  from megan_jax.errors import InputError
  own = dict(OWN_FIELDS, **(OWN_FIELDS_BUILTIN_DATA if args.data is None
                            else {}))
  for item in args.overrides:
    field = item.lstrip("-").partition("=")[0][len("config."):]
    if field in own:
      raise InputError(f"{item}: table1 sets config.{field} itself (use "
                       f"{own[field]})")
  c = configs.get_config(args.config)
  configs.apply_overrides(c, args.overrides)
  c.data.path = train_dir
  c.steps = args.steps
  c.seed = args.seed
  if args.data is None:
    c.data.spacing = args.spacing
    c.train.checkpoint_every = max(args.steps // 4, 1)
    c.train.eval_every = max(args.steps // 4, 1)
    c.train.montage_every = args.steps
  state.check_config(c)
  return c


def _test_pairs(data_dir: str):
  """``(sources, targets, masks)`` of ``data_dir/test``, matched by file
  name (a mask is ``None`` without a mask folder), each pair and mask on
  one voxel grid: checked from the headers, before any training."""
  from megan_jax import io
  from megan_jax.errors import InputError
  test = os.path.join(data_dir, "test")
  sources = _files(os.path.join(test, "source"))
  targets = _files(os.path.join(test, "target"))
  mask_dir = os.path.join(test, "mask")
  masks = (_files(mask_dir) if os.path.isdir(mask_dir)
           else [None] * len(sources))
  names = [[os.path.basename(f) for f in files]
           for files in (sources, targets, masks if masks[:1] != [None]
                         else sources)]
  if not names[0] == names[1] == names[2]:
    raise InputError(
        f"{test}: source, target (and mask) files must pair by name; "
        f"source {names[0][:3]}, target {names[1][:3]}, mask "
        f"{names[2][:3]}{' ...' if len(names[0]) > 3 else ''}")
  for src, tgt, mask in zip(sources, targets, masks):
    shape, affine = io.nifti_geometry(src)
    for other, what in ((tgt, "target"), (mask, "mask")):
      if other is not None:
        io.check_same_grid(f"{what} {other}", *io.nifti_geometry(other),
                           shape, affine, ref=f"source {src}")
  return sources, targets, masks


def _files(folder: str) -> list[str]:
  from megan_jax import dataset
  return dataset.list_volumes(folder)


def training_settings(c) -> dict:
  """The config fields besides the widths that set what a run learns."""
  return {"lr": c.optim.lr, "dropout": c.model.dropout,
          "l1_weight": c.loss.l1_weight, "gan": c.loss.gan,
          "hr_condition": c.hr_condition,
          "hr_residual": bool(c.model.get("hr_residual", False)),
          "edge_gain": float(c.augment.get("edge_gain", 0.0))}


def _seam_boundaries(config, shape):
  """The finest scale's patch borders of MEGAN's cascade inside ``shape``
  (the scale is tiled on the even grid twice the previous scale, then
  cropped)."""
  from megan_jax import resample, tiling
  shapes = resample.scale_shapes(shape, config.num_hr_scales)
  even = tuple(2 * s for s in shapes[-2]) if len(shapes) > 1 else shape
  plan = tiling.make_plan(even, config.patch_size, config.border)
  return tuple(tuple(lo for lo, _ in ranges[1:] if lo < n)
               for ranges, n in zip(plan.keep_in_volume, shape))


def _unit(x, lo, hi):
  return np.clip((np.asarray(x, np.float32) - lo) / (hi - lo), 0.0, 1.0)


def main(argv=None) -> int:
  args = parse_args(argv)
  import jax
  from megan_jax import (baselines, edges, grid, infer, io, metrics, paired,
                         train)
  from megan_jax.errors import InputError

  out = args.out or os.path.join("runs", f"table1-{args.task}")
  made = []  # folders this run made: removed if a failure leaves them empty
  try:  # both usable before any work (the results come last)
    for flag, folder in (("--out", out), ("--results", args.results)):
      made += io.make_folder(folder, flag)
  except InputError as e:
    print(f"table1: error: {e}", file=sys.stderr)
    io.remove_empty_folders(made)
    return 2
  progress = not args.no_progress
  t_start = time.perf_counter()
  try:
    # The config first (a bad one, before minutes of data generation).
    config = _config(args, os.path.join(args.data or os.path.join(
        out, "data"), "train", "target"))
    if args.data is None:
      print(f"[table1] paired benchmark {args.task!r} -> {out}/data",
            file=sys.stderr)
      manifest = paired.write_split(args.task, os.path.join(out, "data"),
                                    n_train=args.n_train, n_test=args.n_test,
                                    seed=args.seed, spacing=args.spacing,
                                    max_side=args.max_side)
      data_dir = os.path.join(out, "data")
      description = manifest.get("description", "")
    else:
      data_dir, description = args.data, f"user data in {args.data}"
    sources, targets, masks = _test_pairs(data_dir)
    if config.edges.use_label:
      raise InputError("table1 compares methods without label masks: pass "
                       "--config.edges.use_label=False")

    # --- training ---------------------------------------------------------
    timings = {}
    t0 = time.perf_counter()
    train.train(config, os.path.join(out, "megan"), progress=progress)
    timings["train_megan_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    baselines.train_patch_gan(config, os.path.join(out, "patch_gan"),
                              progress=progress)
    timings["train_patch_gan_s"] = time.perf_counter() - t0

    # --- evaluation -------------------------------------------------------
    megan = infer.load(os.path.join(out, "megan"))
    megan.keep_scales = True
    patch_gan = baselines.PatchGan.load(os.path.join(out, "patch_gan"))
    # Compile outside the timings: the generators' shapes are fixed by the
    # config (LR grid, patch batch), the edge kernels by each test volume's
    # working shape (per scale for MEGAN, the whole for the patch GAN).
    warm = np.random.default_rng(0).uniform(-1, 1, (24, 24, 24))
    megan.translate_normalised(warm.astype(np.float32), progress=False)
    patch_gan.translate_normalised(warm.astype(np.float32))
    if edges.ENGINE == "jax":
      for shape in {grid.to_working(io.load_nifti(sp), config).volume.data
                    .shape for sp in sources}:
        megan.plan(shape)
        edges.compile_canny(shape, patch_gan.config.edges.sigma)
    per = {m: [] for m in METHODS}
    montage = None
    pred_dir = os.path.join(out, "pred")
    os.makedirs(pred_dir, exist_ok=True)
    for i, (sp, tp, mp) in enumerate(zip(sources, targets, masks)):
      src, tgt = io.load_nifti(sp), io.load_nifti(tp)
      mask = None if mp is None else io.load_nifti(mp, what="mask").data > 0.5
      if src.data.shape != tgt.data.shape:
        raise InputError(f"{sp}: shape {src.data.shape} differs from the "
                         f"target's {tgt.data.shape}")
      name = os.path.basename(sp).split(".")[0]
      print(f"[table1] {i + 1}/{len(sources)} {name}", file=sys.stderr)
      preds, secs = {}, {}
      t0 = time.perf_counter()
      preds["megan"] = megan.translate_volume(src, progress=progress)
      secs["megan"] = time.perf_counter() - t0
      t0 = time.perf_counter()
      # The cascade ran on the working grid (orientation, spacing): the
      # LR output is upsampled there and put back on the input's grid.
      work = grid.to_working(src, config)
      lr = megan.scale_outputs["scales"]["lr"]
      up = work.restore(baselines.upsample_lr(lr, work.volume.data.shape))
      preds["small_gan_upsampled"] = megan.intensity.denormalise(up)
      secs["small_gan_upsampled"] = (megan.timings["edges_lr"]
                                     + megan.timings["lr"]
                                     + time.perf_counter() - t0)
      t0 = time.perf_counter()
      preds["patch_gan"] = patch_gan.translate(src)
      secs["patch_gan"] = time.perf_counter() - t0
      if not args.no_nlm:
        lo, hi = float(src.data.min()), float(src.data.max())
        den, secs["nlm"] = baselines.nlm(_unit(src.data, lo, hi))
        preds["nlm"] = den * (hi - lo) + lo
      preds["input"], secs["input"] = src.data, 0.0
      # Every method is scored on the target's range mapped to [0, 1] (then
      # clipped to it: `_unit`).
      lo, hi = float(tgt.data.min()), float(tgt.data.max())
      target01 = _unit(tgt.data, lo, hi)
      # Patch borders are where the patches were: on the working grid. When
      # that is the input's own grid (the embedded benchmark), score seams;
      # after reorienting or resampling they are not on voxel borders.
      on_grid = (work.transform is None
                 and work.volume.data.shape == src.data.shape)
      megan_grid = _seam_boundaries(config, src.data.shape)
      for m, y in preds.items():
        y01 = _unit(y, lo, hi)
        score = metrics.evaluate(y01, target01, mask)
        # The patch GAN's own grid; MEGAN's for the others (a control).
        score["seam"] = (None if not on_grid else
                         metrics.seam_score(y01, plan=patch_gan.plan)
                         if m == "patch_gan" else
                         metrics.seam_score(y01, boundaries=megan_grid))
        score["seconds"] = secs[m]
        per[m].append({"subject": name, **score})
        if m != "input":
          io.save_nifti(os.path.join(pred_dir, f"{name}_{m}.nii.gz"),
                        np.asarray(y, np.float32), src.affine, src.header)
      if montage is None:
        montage = {"input": _unit(src.data, lo, hi)}
        for m in METHODS[:-1]:
          if m in preds:
            montage[m] = _unit(preds[m], lo, hi)
        montage["target"] = target01
    # --- results ----------------------------------------------------------
    keys = ("ssim", "psnr", "mae", "mse", "seam", "seconds")
    methods = {}
    for m in METHODS:
      if not per[m]:
        continue
      methods[m] = {k: None if any(r[k] is None for r in per[m]) else
                    float(np.mean([r[k] for r in per[m]])) for k in keys}
      methods[m]["per_subject"] = per[m]
    c = config
    result = {
        "meta": {
            "task": args.task, "data": description,
            "jax_version": jax.__version__, "backend": jax.default_backend(),
            "device": jax.devices()[0].device_kind,
            "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "config": args.config, "steps_per_scale": c.steps,
            "widths": {"ngf": c.model.ngf, "ndf": c.model.ndf,
                       "n_blocks": c.model.n_blocks,
                       "lr_generator": c.model.lr_generator,
                       "patch_size": c.patch_size, "border": c.border,
                       "lr_size": c.lr_size, "num_hr_scales": c.num_hr_scales,
                       "hr_batch_size": c.train.hr_batch_size},
            "training": training_settings(c),
            "spacing": c.data.spacing,
            "shape": list(io.load_nifti(sources[0]).data.shape),
            "n_train": len(_files(c.data.path)), "n_test": len(sources),
            "seed": args.seed, "metric_region": "test mask" if masks[0]
            else "whole volume", **{k: round(v, 1) for k, v in
                                    timings.items()},
            "wall_s": round(time.perf_counter() - t_start, 1),
        },
        "methods": methods,
        "paper": PAPER.get(args.task),
    }
    os.makedirs(args.results, exist_ok=True)
    stem = os.path.join(args.results, f"table1-{args.task}")
    io.write_text(stem + ".json", json.dumps(result, indent=2))
    io.write_text(stem + ".md", markdown(result))
    figure(montage, stem + ".png", title=f"{args.task}: "
           f"{os.path.basename(sources[0]).split('.')[0]} (test)")
  except InputError as e:
    print(f"table1: error: {e}", file=sys.stderr)
    io.remove_empty_folders(made)
    return 2
  print(markdown(result))
  print(f"[table1] wrote {stem}.json, .md, .png in "
        f"{time.perf_counter() - t_start:.0f} s", file=sys.stderr)
  return 0


def figure(volumes: dict, path: str, title: str = "") -> None:
  """One column per method (input | methods | target), rows the axial and
  coronal planes through the centre, grey scale [0, 1] for all; written
  atomically as PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from megan_jax import io
  names = list(volumes)
  fig, axes = plt.subplots(2, len(names), figsize=(2.2 * len(names), 4.6),
                           squeeze=False)
  for j, name in enumerate(names):
    v = np.asarray(volumes[name])
    planes = (v[:, :, v.shape[2] // 2], v[:, v.shape[1] // 2, :])
    for i, plane in enumerate(planes):
      ax = axes[i, j]
      ax.imshow(plane.T, cmap="gray", vmin=0.0, vmax=1.0, origin="lower",
                interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(LABELS.get(name, name).replace(" + ", " +\n"),
                     fontsize=9)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  with io.atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=110)
  plt.close(fig)


def markdown(result: dict) -> str:
  """The results as a markdown table (ours, then the paper's where known)."""
  meta = result["meta"]
  lines = [f"Task `{meta['task']}`: {meta['n_train']} train / "
           f"{meta['n_test']} test volumes of {'×'.join(map(str, meta['shape']))}"
           f" at {meta['spacing']} mm; {meta['steps_per_scale']} steps per "
           f"scale; ngf {meta['widths']['ngf']}, ndf {meta['widths']['ndf']}; "
           f"{meta['backend']} ({meta['device']}); metrics inside the "
           f"{meta['metric_region']}.", "",
           "| method | SSIM | PSNR (dB) | MAE | MSE | seam | s / volume |",
           "|---|---|---|---|---|---|---|"]
  for m, r in result["methods"].items():
    lines.append(f"| {LABELS[m]} | {r['ssim']:.3f} | {r['psnr']:.1f} | "
                 f"{r['mae']:.3f} | {r['mse']:.4f} | "
                 f"{'–' if r['seam'] is None else format(r['seam'], '.2f')} | "
                 f"{r['seconds']:.1f} |")
  paper = result.get("paper")
  if paper:
    lines += ["", f"Paper ({paper['task']}):", "",
              "| method | SSIM | PSNR (dB) | MAE | MSE |", "|---|---|---|---|---|"]
    for m in METHODS:
      if m in paper:
        r = paper[m]
        fmt = lambda k, f: (f"{r[k]:{f}}" if k in r else "–")
        lines.append(f"| {LABELS[m]} | {fmt('ssim', '.3f')} | "
                     f"{fmt('psnr', '.1f')} | {fmt('mae', '.3f')} | "
                     f"{fmt('mse', '.3f')} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  sys.exit(main())
