"""The ``megan`` command line: a thin layer over the library.

Every command checks its inputs before doing any work. A problem a user can
fix is one line on stderr (``megan: error: <file>: <problem>``), exit status
2, no traceback, and no output file left behind.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from typing import Callable, Sequence

from megan_jax.errors import InputError

PROG = "megan"


def _int_at_least(low: int, text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
  if value < low:
    raise argparse.ArgumentTypeError(f"{text!r} must be >= {low}")
  return value


def _batch_size(text: str):
  """``--batch-size``: a positive integer or ``auto``."""
  if text == "auto":
    return text
  try:
    return _int_at_least(1, text)
  except argparse.ArgumentTypeError:
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a positive integer or 'auto'") from None


def _seed(text: str) -> int:
  """``--mask-augment``: a non-negative integer (numpy's seeds)."""
  return _int_at_least(0, text)


def _sigma(text: str) -> float:
  """``--sigma``: a finite, non-negative number of voxels."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
  if not 0 <= value <= MAX_SIGMA:
    raise argparse.ArgumentTypeError(
        f"{text!r} must be between 0 and {MAX_SIGMA:g} voxels")
  return value


# Beyond this the smoothing has flattened any volume's edges away (and its
# kernel, 8 sigma wide, costs minutes).
MAX_SIGMA = 32.0


def _png_path(out: str) -> str:
  """``x.nii.gz`` → ``x.png``: the montage written next to a NIfTI output."""
  base = out[:-7] if out.lower().endswith(".nii.gz") else os.path.splitext(out)[0]
  return base + ".png"


def load_input(path: str, *, what: str = "input", spacing: float | None = None,
               allow_constant: bool = False):
  """Loads a NIfTI path, or the embedded template when ``path`` is "mni152"."""
  from megan_jax import data, io
  if path == data.MNI152_NAME:
    return data.mni152("t1", spacing)
  return io.load_nifti(path, what=what, allow_constant=allow_constant)


def load_label(path: str | None, image, *, what: str = "mask"):
  """Loads an optional label mask and checks it lies on ``image``'s voxel
  grid (``io.Volume``: same shape and affine)."""
  if path is None:
    return None
  from megan_jax import io
  vol = io.load_nifti(path, what=what, allow_constant=True)
  io.check_same_grid(f"{what} {path}", vol.data.shape, vol.affine,
                     image.data.shape, image.affine)
  return vol.data > 0.5


# ---------------------------------------------------------------------------
# megan edges
# ---------------------------------------------------------------------------
def _add_edges(sub):
  p = sub.add_parser(
      "edges", help="3D Canny edge sketch of a volume (the generators' input)",
      description="Writes the gradient-weighted 3D Canny edge sketch of IN to "
      "OUT (same affine and header) and a PNG montage of three orthogonal "
      "slices next to it. IN may be 'mni152' for the embedded template. As "
      "in training and translation, IN is first scaled to [-1, 1] (clipped "
      "at --percentiles, or at --window for CT), so a few bright outliers "
      "do not set the largest gradient and wipe out the real edges.")
  p.add_argument("-i", "--input", required=True, metavar="IN",
                 help="NIfTI volume (.nii/.nii.gz), or 'mni152'")
  p.add_argument("-o", "--output", required=True, metavar="OUT",
                 help="output .nii/.nii.gz (must not exist as an input)")
  p.add_argument("--mask", metavar="MASK",
                 help="label mask (e.g. a tumour; voxels > 0.5 are inside) "
                 "written onto the sketch")
  p.add_argument("--sigma", type=_sigma, default=1.0,
                 help="Gaussian smoothing in voxels (default 1.0, at most "
                 f"{MAX_SIGMA:g})")
  p.add_argument("--low", type=float, default=0.1,
                 help="low hysteresis threshold, fraction of the max gradient")
  p.add_argument("--high", type=float, default=0.2,
                 help="high hysteresis threshold, fraction of the max gradient")
  p.add_argument("--percentiles", nargs=2, type=float, default=(0.0, 99.5),
                 metavar=("LO", "HI"), help="intensity percentiles mapped to "
                 "-1 and 1 (default 0 99.5, as data.percentiles)")
  p.add_argument("--window", nargs=2, type=float, metavar=("LO", "HI"),
                 help="a fixed intensity window instead, e.g. Hounsfield "
                 "units for CT (as data.window)")
  p.add_argument("--engine", choices=("jax", "numpy"), default=None,
                 help="what computes smoothing, gradients and suppression: "
                 "jitted JAX slabs on the default device, or scipy on host "
                 "threads (default: jax)")
  p.add_argument("--no-png", action="store_true", help="skip the PNG montage")
  p.set_defaults(func=cmd_edges)


def cmd_edges(args) -> int:
  from megan_jax import edges, io, writers
  from megan_jax.normalise import normalise
  io.check_output_path(args.output, [args.input, args.mask])
  if not args.no_png and os.path.isdir(_png_path(args.output)):
    raise InputError(f"montage {_png_path(args.output)}: is a folder "
                     "(or use --no-png)")
  if not 0 <= args.low <= args.high < 1:
    raise InputError(f"--low {args.low:g} / --high {args.high:g}: need "
                     "0 <= low <= high < 1")
  lo, hi = args.percentiles
  if not 0 <= lo < hi <= 100:
    raise InputError(f"--percentiles {lo:g} {hi:g}: need 0 <= LO < HI <= 100")
  if args.window is not None and not (
      math.isfinite(args.window[0]) and math.isfinite(args.window[1])
      and args.window[0] < args.window[1]):
    raise InputError(f"--window {args.window[0]:g} {args.window[1]:g}: need "
                     "finite LO < HI")
  vol = load_input(args.input)
  label = load_label(args.mask, vol)
  # The sketch the networks see: of the scaled volume (dataset, infer).
  scaled, _ = normalise(vol.data, percentiles=tuple(args.percentiles),
                        window=None if args.window is None
                        else tuple(args.window), path=args.input)
  try:
    sketch = edges.canny_3d(scaled, sigma=args.sigma,
                            low_threshold=args.low, high_threshold=args.high,
                            engine=args.engine)
  except InputError as e:  # e.g. a volume one voxel thin
    raise InputError(f"input {args.input}: {e}") from None
  if label is not None:
    sketch = edges.add_label(sketch, label)
  image = None if args.no_png else writers.montage(
      {"input": scaled, "edges": sketch * 2.0 - 1.0})
  io.save_nifti(args.output, sketch, vol.affine, vol.header,
                inputs=[args.input, args.mask])
  if image is not None:
    png = _png_path(args.output)
    try:
      writers.write_png(png, image)
    except BaseException:  # both files or neither
      with contextlib.suppress(OSError):
        os.remove(args.output)
      raise
  print(f"wrote {args.output}")
  if image is not None:
    print(f"wrote {png}")
  return 0


# ---------------------------------------------------------------------------
# megan demo
# ---------------------------------------------------------------------------
def _add_demo(sub):
  p = sub.add_parser(
      "demo", help="train and translate on the embedded MNI152 template",
      description="The main job on embedded data (nothing is downloaded): "
      "trains the demo config on the MNI152 T1 template (the target domain), "
      "then translates a T2-like contrast made from the template's tissue "
      "maps (the source) into T1, and writes source.nii.gz, "
      "translated.nii.gz, target.nii.gz, brain_mask.nii.gz (where it "
      "scores), montage.png and metrics.json.")
  p.add_argument("--out", default="megan-demo", help="output folder")
  p.add_argument("--steps", type=int, default=None,
                 help="training steps per scale (default: the demo config's)")
  p.add_argument("--train", action="store_true",
                 help="retrain even if OUT/run holds a finished run")
  p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
  from megan_jax import demo, io
  if args.steps is not None and args.steps < 1:
    raise InputError(f"--steps {args.steps}: must be >= 1")
  if os.path.exists(args.out) and not os.path.isdir(args.out):
    raise InputError(f"output folder {args.out}: exists and is not a folder")
  run = os.path.join(args.out, "run")
  if os.path.exists(run) and not os.path.isdir(run):
    raise InputError(f"run folder {run}: exists and is not a folder")
  made = io.make_folder(args.out, "output folder")
  try:
    summary = demo.run(args.out, steps=args.steps, retrain=args.train)
  except BaseException:  # a failure, Ctrl-C: no empty folder left behind
    io.remove_empty_folders(made)
    raise
  if summary["reused_run"]:
    print(f"reused the finished run in {os.path.join(args.out, 'run')} "
          f"({summary['steps']} steps per scale; --train retrains)")
  for key in ("source", "translated", "target", "brain_mask", "montage",
              "metrics"):
    print(f"wrote {summary[key]}")
  print("metrics (translated vs the template's T1, in [0, 1]): " + ", ".join(
      f"{k} {v:.4f}" for k, v in summary["scores"].items()))
  return 0


# ---------------------------------------------------------------------------
# megan translate
# ---------------------------------------------------------------------------
def _add_translate(sub):
  p = sub.add_parser(
      "translate", help="translate volumes with a trained run",
      description="Translates IN with the generators of a trained run "
      "(--workdir) into OUT, with IN's shape, affine and header. Several "
      "inputs (or the NIfTI files of a folder IN) go into the folder OUT "
      "under their own file names, through "
      "networks compiled once. Patches are spread over every device; a "
      "killed run continues where it stopped when started again with the "
      "same arguments.")
  p.add_argument("-i", "--input", required=True, nargs="+", metavar="IN",
                 help="source volume(s) (.nii/.nii.gz), a folder of them, "
                 "or 'mni152'; @LIST reads them from a text file, one per "
                 "line")
  p.add_argument("-o", "--output", required=True, metavar="OUT",
                 help="output .nii/.nii.gz; a folder for several inputs "
                 "(created if missing; also for one input when OUT is a "
                 "folder or ends in '/')")
  p.add_argument("--workdir", required=True, help="a trained run's folder")
  p.add_argument("--mask", nargs="+", metavar="MASK",
                 help="label mask written onto the sketches (e.g. a "
                 "tumour; voxels > 0.5 are inside); one per input")
  p.add_argument("--mask-augment", type=_seed, default=None, metavar="SEED",
                 help="scale (±15 %%) and mirror the mask at random first: "
                 "a new lesion placement per seed (the paper's augmentation)")
  p.add_argument("--skip-existing", action="store_true",
                 help="leave outputs that already exist alone (rerunning a "
                 "batch)")
  p.add_argument("--batch-size", type=_batch_size, default=None,
                 help="patches per batch, or 'auto': the largest that fits "
                 "the device memory (default: the run's config)")
  p.add_argument("--dtype", default="float32",
                 choices=("float32", "bf16", "bfloat16"),
                 help="compute dtype (bf16: parameters cast once; it pays "
                 "on GPUs, and on CPUs with bf16 instructions only)")
  p.add_argument("--plan", action="store_true",
                 help="print per scale the shape, patches, batch shape, "
                 "compiled device memory and host memory, then exit")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  p.set_defaults(func=cmd_translate)


def _output_name(path: str) -> str:
  """The output file name for an input in a batch: its own name."""
  from megan_jax import data
  return "mni152.nii.gz" if path == data.MNI152_NAME else os.path.basename(
      os.path.normpath(path))


def expand_input_folders(inputs: Sequence[str]) -> list[str]:
  """``inputs`` with each folder replaced by the NIfTI files in it (sorted
  by name; hidden ones left out), as `megan evaluate` takes folders. A
  folder with none is an `InputError`."""
  from megan_jax import data
  out = []
  for inp in inputs:
    if inp == data.MNI152_NAME or not os.path.isdir(inp):
      out.append(inp)
      continue
    names = _nifti_files(inp)
    if not names:
      raise InputError(f"input {inp}: a folder holding no .nii or .nii.gz "
                       "files")
    out += [os.path.join(inp, n) for n in names]
  return out


def _nifti_files(folder: str) -> list[str]:
  """The names of the NIfTI files in ``folder`` (not hidden ones, not
  folders), sorted."""
  from megan_jax import io
  return sorted(f for f in os.listdir(folder)
                if io.is_nifti_path(f) and not f.startswith(".")
                and os.path.isfile(os.path.join(folder, f)))


def translate_jobs(inputs: Sequence[str], output: str,
                   masks: Sequence[str] | None = None
                   ) -> list[tuple[str, str, str | None]]:
  """``(input, output, mask)`` per input of ``megan translate``, checked
  before any work: one mask per input, outputs that neither collide nor
  overwrite an input. Several inputs (or an ``output`` that is a folder or
  ends in a separator, or an input that is a folder: its NIfTI files, see
  `expand_input_folders`) write into the folder ``output``."""
  from megan_jax import data
  is_folder = [i != data.MNI152_NAME and os.path.isdir(i) for i in inputs]
  masks = list(masks or [])
  if masks and len(masks) != len(inputs):
    raise InputError(f"--mask: {len(masks)} mask(s) for {len(inputs)} "
                     "inputs; give one per input (a folder of masks for a "
                     "folder input)")
  masks = masks or [None] * len(inputs)
  if any(is_folder):  # a folder's masks: a folder, matched by file name
    pairs = []
    for inp, mask, folder in zip(inputs, masks, is_folder):
      if not folder:
        pairs.append((inp, mask))
        continue
      if mask is not None and not os.path.isdir(mask):
        raise InputError(f"--mask {mask}: input {inp} is a folder; give a "
                         "folder of masks, named as its files")
      for f in expand_input_folders([inp]):
        m = None if mask is None else _same_name(mask, os.path.basename(f))
        if m is not None and not os.path.isfile(m):
          raise InputError(f"mask {m}: no such file (for the input {f})")
        pairs.append((f, m))
    inputs, masks = [p[0] for p in pairs], [p[1] for p in pairs]
  folders = any(is_folder)
  to_folder = (len(inputs) > 1 or folders or os.path.isdir(output)
               or output.endswith(("/", os.sep)))
  if not to_folder:
    return [(inputs[0], output, masks[0])]
  if os.path.exists(output) and not os.path.isdir(output):
    raise InputError(f"output {output}: exists and is not a folder (several "
                     "inputs are written into a folder)")
  if (not os.path.isdir(output)
      and output.lower().endswith((".nii", ".nii.gz"))):
    raise InputError(f"output {output}: {len(inputs)} input(s) go into a "
                     "folder, and this is a NIfTI file name; give a folder")
  outs, seen = [], {}
  for inp in inputs:
    name = _output_name(inp)
    if name in seen:
      raise InputError(f"inputs {seen[name]} and {inp}: the same file name, "
                       f"so the same output in {output}")
    seen[name] = inp
    outs.append(os.path.join(output, name))
  return list(zip(inputs, outs, masks))


def cmd_translate(args) -> int:
  made = []  # the folders this command made for the output, deepest first
  code = None
  try:
    code = _translate(args, made)
  finally:
    if code != 0:  # failed: leave no empty folder behind
      with contextlib.suppress(OSError):
        for folder in made:
          os.rmdir(folder)  # only if empty
  return code


def _translate(args, made: list) -> int:
  import numpy as np
  from megan_jax import infer, sharding
  jobs = translate_jobs(args.input, args.output, args.mask)
  if args.mask_augment is not None and not args.mask:
    raise InputError("--mask-augment: needs --mask")
  error = None
  try:
    geometry = _check_translate_jobs(args, jobs, made)
  except (InputError, OSError) as e:
    error = e
  sharding.agree(error, "megan translate's inputs and outputs")
  # A list file out of step between nodes, say: each process would run
  # another job (a hang in a collective). Paths may differ (node-local
  # copies); each input's voxels, grid and mask are compared as it runs.
  sharding.assert_same_parts({
      "the number of inputs and which have a mask":
          json.dumps([mask is not None for _, _, mask in jobs]),
      # (the batch size and dtype: by the Translator, as resolved)
      "--mask-augment, --skip-existing or --plan":
          json.dumps([args.mask_augment, args.skip_existing, args.plan])},
      "megan translate")
  translator = infer.load(args.workdir, batch_size=args.batch_size,
                          dtype=args.dtype)
  report = translator.is_writer  # of several processes, process 0 reports
  plans, shapes, error = {}, {}, None
  for inp, _, _ in jobs:
    try:
      shape = shapes[inp] = infer.working_shape(translator.config,
                                                geometry[inp])
      if shape not in plans:
        plans[shape] = translator.plan(shape)
    except InputError as e:  # e.g. too large for the run's LR scale
      zooms = np.linalg.norm(geometry[inp][1][:3, :3], axis=0)
      error = InputError(
          f"input {inp} ({'x'.join(map(str, geometry[inp][0]))} voxels of "
          f"{'x'.join(f'{z:.3g}' for z in zooms)} mm): {e}")
      break
  sharding.agree(error, "megan translate's plan")
  if args.plan:
    if report:
      for inp, _, _ in jobs:
        if len(jobs) > 1:
          print(f"{inp}:")
        for r in plans[shapes[inp]]:
          print(r.line())
    for reports in plans.values():  # what the run would refuse: said now
      translator.check_device_memory(reports)
    return 0
  for reports in plans.values():
    translator.check_device_memory(reports)
  failed = []
  for i, (inp, out, mask) in enumerate(jobs):
    tag = f"[{i + 1}/{len(jobs)}] " if len(jobs) > 1 else ""
    exists = args.skip_existing and os.path.exists(out)
    if args.skip_existing and translator.multiprocess:
      exists = bool(translator._shared_int(exists))  # process 0 decides
    if exists:
      if report:
        print(f"{tag}skipped {out} (exists)")
      continue
    try:
      infer.translate_file(translator, inp, out, mask,
                           progress=not args.quiet,
                           mask_augment_seed=args.mask_augment)
    except KeyboardInterrupt:
      if report and infer.workspace_has_batches(out):
        _end_progress_bars()
        print(f"{PROG}: the batches done for {out} are kept in "
              f"{infer.workspace_path(out)}; the same command resumes",
              file=sys.stderr)
      raise
    except (InputError, OSError) as e:
      if len(jobs) == 1 or not sharding.is_agreed(e):
        raise  # (of several processes, this one alone: the job ends)
      failed.append(inp)  # the others go on; the exit status says so
      _end_progress_bars()
      line = os_error_line(e) if isinstance(e, OSError) else str(e)
      print(f"{PROG}: error: {line}", file=sys.stderr)
      continue
    if report:  # in a multi-process job only process 0 writes
      print(f"{tag}wrote {out}")
  if failed:
    print(f"{PROG}: error: {len(failed)} of {len(jobs)} inputs failed: "
          f"{', '.join(failed)}", file=sys.stderr)
    return 2
  return 0


def _check_translate_jobs(args, jobs, made: list) -> dict:
  """Every input's header (no voxels) and mask grid, and every output path,
  checked before any work; makes the output folder (noted in ``made``).
  Returns ``{input: (shape, affine)}``."""
  from megan_jax import data, io
  if not os.path.isdir(args.workdir):
    raise InputError(f"workdir {args.workdir}: " + (
        "not a folder" if os.path.exists(args.workdir) else "no such folder"))
  geometry = {}
  for inp, _, mask in jobs:
    if inp == data.MNI152_NAME:
      t1 = data.mni152("t1")
      geometry[inp] = (t1.data.shape, t1.affine)
    else:
      geometry[inp] = io.nifti_geometry(inp, what="input")
    if mask is not None:
      io.check_same_grid(f"mask {mask}", *io.nifti_geometry(mask, what="mask"),
                         *geometry[inp], ref="input")
  if not args.plan:
    if jobs[0][1] != args.output:  # into the folder OUT
      try:
        folder = os.path.abspath(args.output)
        while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
          made.append(folder)
          folder = os.path.dirname(folder)
        os.makedirs(args.output, exist_ok=True)
      except OSError as e:
        raise InputError(f"output {args.output}: cannot make the folder "
                         f"({e.strerror})") from None
    every_input = [p for job in jobs for p in (job[0], job[2])]
    for _, out, _ in jobs:
      io.check_output_path(out, every_input)
  return geometry


# ---------------------------------------------------------------------------
# megan train
# ---------------------------------------------------------------------------
def _add_train(sub):
  p = sub.add_parser(
      "train", help="train the cascade's GANs (resumes automatically)",
      description="Trains MEGAN's GANs on a folder of target-domain volumes "
      "(config data.path; 'mni152' = the embedded template). Every scale "
      "trains on its own; a killed run resumes from its latest checkpoint "
      "when started again with the same --workdir. Override config fields "
      "with --config.FIELD=VALUE, e.g. --config.steps=1000 --config.seed=1.")
  p.add_argument("--config", default="demo",
                 help="config file (configs/demo.py) or built-in name "
                 "(demo, default, brats_t2, copd_ct); NAME:ARG passes ARG")
  p.add_argument("--workdir", required=True,
                 help="run folder: checkpoints, logs, montages, cache")
  p.add_argument("--scale", default="all",
                 help="which scale to train: lr, 1 (or hr1), 2, ... or all "
                 "(default)")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
  from megan_jax import configs, train
  from megan_jax import state as state_lib
  config = configs.get_config(args.config)
  configs.apply_overrides(config, args.overrides)
  name = args.config.partition(":")[0]
  try:  # (train checks it too) here to name the user's file
    state_lib.check_config(config)
  except InputError as e:
    if name in configs.BUILTIN:
      raise
    raise InputError(f"{e} (the config of {name}" + (
        ", with the overrides)" if args.overrides else ")")) from None
  if os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
    raise InputError(f"workdir {args.workdir}: exists and is not a folder")
  before = {s: state_lib.checkpointed_step(args.workdir, s)
            for s in state_lib.scale_names(config)}
  states = train.train(config, args.workdir, args.scale,
                       progress=not args.quiet)
  if all(before.get(s) == config.steps for s in states):
    print(f"{', '.join(states)} in {args.workdir}: already trained to "
          f"{config.steps} steps, nothing to do (more --config.steps goes on)")
  else:
    print(f"trained {', '.join(states)} in {args.workdir}")
  return 0


# ---------------------------------------------------------------------------
# megan evaluate
# ---------------------------------------------------------------------------
def _add_evaluate(sub):
  p = sub.add_parser(
      "evaluate", help="SSIM, PSNR, MAE, MSE of a prediction against a target",
      description="Scores PRED against TARGET on intensities in [0, 1] (both "
      "mapped with the target's range, or --range LO HI, e.g. a CT window in "
      "HU, and clipped), over the whole volume or inside --mask; prints JSON. "
      "PRED and TARGET may be folders: files are matched by name (.nii and "
      ".nii.gz alike), each is "
      "scored, and the mean and standard deviation over them are added. "
      "A non-finite value (the PSNR of identical volumes is infinite) is "
      "written as null.")
  p.add_argument("--pred", required=True,
                 help="predicted volume (.nii/.nii.gz), or a folder of them")
  p.add_argument("--target", required=True,
                 help="ground truth (.nii/.nii.gz), or a folder of them")
  p.add_argument("--mask", help="evaluate inside this mask only (voxels > "
                 "0.5; with folders: one mask for all, or a folder matched by "
                 "name)")
  p.add_argument("--range", nargs=2, type=float, metavar=("LO", "HI"),
                 help="intensities mapped to 0 and 1 (default: each target's "
                 "min and max)")
  p.add_argument("--out", metavar="JSON", help="also write the JSON here")
  p.set_defaults(func=cmd_evaluate)


def score_pair(pred_path: str, target_path: str, mask_path: str | None = None,
               value_range=None) -> dict:
  """``megan evaluate`` of one prediction: SSIM, PSNR, MAE, MSE in [0, 1]."""
  from megan_jax import io, metrics
  from megan_jax.normalise import Normaliser, to_unit
  pred = io.load_nifti(pred_path, what="prediction")
  target = io.load_nifti(target_path, what="target", allow_constant=False)
  io.check_same_grid(f"prediction {pred_path}", pred.data.shape, pred.affine,
                     target.data.shape, target.affine, ref="target")
  mask = load_label(mask_path, target)
  if mask is not None and not mask.any():
    raise InputError(f"mask {mask_path}: selects no voxels")
  if value_range is not None:
    lo, hi = value_range
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
      raise InputError(f"--range {lo:g} {hi:g}: must be finite with HI > LO")
  else:
    lo, hi = float(target.data.min()), float(target.data.max())
  norm = Normaliser(lo, hi)
  try:
    scores = metrics.evaluate(to_unit(norm.normalise(pred.data)),
                              to_unit(norm.normalise(target.data)), mask)
  except InputError as e:  # e.g. smaller than the SSIM window
    raise InputError(f"prediction {pred_path}: {e}") from None
  return {"pred": pred_path, "target": target_path, "mask": mask_path,
          "range": [lo, hi], **scores}


def _evaluate_pairs(args) -> list[tuple[str, str, str | None]]:
  """(prediction, target, mask) for files, or for folders matched by name."""
  if not os.path.isdir(args.pred):
    if os.path.isdir(args.target):
      if not os.path.lexists(args.pred):  # a typo: say so, not the kinds
        raise InputError(f"prediction {args.pred}: no such file or folder")
      raise InputError(f"target {args.target}: a folder, but --pred is not")
    return [(args.pred, args.target, args.mask)]
  if not os.path.isdir(args.target):
    raise InputError(f"target {args.target}: not a folder, but --pred is")
  names = _nifti_files(args.pred)
  if not names:
    raise InputError(f"prediction {args.pred}: holds no .nii or .nii.gz files")
  pairs, used = [], {}
  for name in names:
    target = _same_name(args.target, name)
    if not os.path.exists(target):
      raise InputError(f"target {target}: no such file (for the prediction "
                       f"{os.path.join(args.pred, name)})")
    if target in used:  # a.nii and a.nii.gz beside each other
      raise InputError(f"target {target}: matched by two predictions, "
                       f"{used[target]} and {os.path.join(args.pred, name)}")
    used[target] = os.path.join(args.pred, name)
    mask = args.mask
    if mask is not None and os.path.isdir(mask):
      mask = _same_name(args.mask, name)
    pairs.append((os.path.join(args.pred, name), target, mask))
  return pairs


def _same_name(folder: str, name: str) -> str:
  """``folder/name``, or where that is missing the one file of the same name
  with the other NIfTI ending (``.nii`` / ``.nii.gz``: `megan translate`
  keeps each input's)."""
  path = os.path.join(folder, name)
  if os.path.exists(path):
    return path
  stem = name[:-7] if name.lower().endswith(".nii.gz") else name[:-4]
  found = [os.path.join(folder, stem + end) for end in (".nii.gz", ".nii")
           if os.path.exists(os.path.join(folder, stem + end))]
  return found[0] if len(found) == 1 else path


def _finite_or_null(x):
  if isinstance(x, float):
    return x if math.isfinite(x) else None
  if isinstance(x, dict):
    return {k: _finite_or_null(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_finite_or_null(v) for v in x]
  return x


def cmd_evaluate(args) -> int:
  import numpy as np
  from megan_jax import io
  if args.out is not None and not args.out.lower().endswith(".json"):
    raise InputError(f"--out {args.out}: name must end in .json")
  pairs = _evaluate_pairs(args)
  if args.out is not None:
    if any(io.same_file(args.out, p) for pair in pairs for p in pair if p):
      raise InputError(f"--out {args.out}: is an input; refusing to "
                       "overwrite it")
    if os.path.isdir(args.out):
      raise InputError(f"--out {args.out}: is a folder")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
      raise InputError(f"--out {args.out}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
      raise InputError(f"--out {args.out}: folder {folder} is not writable")
  rows = [score_pair(*pair, args.range) for pair in pairs]
  if os.path.isdir(args.pred):
    keys = [k for k in rows[0] if isinstance(rows[0][k], float)]
    with np.errstate(invalid="ignore"):  # inf - inf: an identical pair
      result = {"pred": args.pred, "target": args.target, "mask": args.mask,
                "range": args.range or "each target's min and max",
                "count": len(rows),
                "mean": {k: float(np.mean([r[k] for r in rows]))
                         for k in keys},
                "std": {k: float(np.std([r[k] for r in rows])) for k in keys},
                "subjects": rows}
  else:
    result = rows[0]
  # Strict JSON: a non-finite number (the PSNR of identical images is
  # infinite) is written as null.
  text = json.dumps(_finite_or_null(result), indent=2, allow_nan=False)
  if args.out is not None:
    io.write_text(args.out, text + "\n")
  print(text)
  return 0


_COMMANDS: Sequence[Callable] = (_add_demo, _add_edges, _add_evaluate,
                                  _add_train, _add_translate)


MAX_LIST_DEPTH = 8  # @FILE inside @FILE, at most this deep


def expand_arg_files(argv: Sequence[str], depth: int = 0) -> list[str]:
  """``argv`` with each ``@FILE`` replaced by FILE's lines, one argument
  each (surrounding blanks stripped; blank lines and ``#`` comments
  skipped, as in training list files; a line may be ``@OTHER`` in turn).
  Relative paths in FILE are taken from the current folder, as on the
  command line. A missing, unreadable or empty FILE is an `InputError`
  naming it (argparse's own @ reading printed usage and a raw errno, and
  an empty list only "expected at least one argument")."""
  out = []
  for arg in argv:
    if not arg.startswith("@") or arg == "@":
      out.append(arg)
      continue
    path = arg[1:]
    if depth >= MAX_LIST_DEPTH:
      raise InputError(f"list file {path}: @ lists nested more than "
                       f"{MAX_LIST_DEPTH} deep")
    from megan_jax import io  # only here: --help stays fast
    try:
      args = io.read_list_file(path)
    except UnicodeDecodeError:
      raise InputError(f"list file {path}: not UTF-8 text") from None
    except OSError as e:
      raise InputError(f"list file {path}: {e.strerror or e}") from None
    if not args:
      raise InputError(f"list file {path}: no entries (only blank or # "
                       "lines)")
    out += expand_arg_files(args, depth + 1)
  return out


def build_parser() -> argparse.ArgumentParser:
  from megan_jax import __version__
  parser = argparse.ArgumentParser(
      prog=PROG,
      description="megan_jax: memory-efficient multi-scale GAN translation of "
      "full-resolution 3D medical images. An argument @FILE stands for the "
      "lines of FILE, one argument per line (blank and # lines skipped; "
      "e.g. -i @inputs.txt).")
  parser.add_argument("--version", action="version",
                      version=f"%(prog)s {__version__}")
  parser.add_argument("--distributed", action="store_true",
                      help="translate as one of several processes of a "
                      "JAX job, 'megan translate' only "
                      "(jax.distributed; SLURM is detected, else MEGAN_COORDINATOR, "
                      "MEGAN_NUM_PROCESSES, MEGAN_PROCESS_ID; also MEGAN_DISTRIBUTED=1)")
  sub = parser.add_subparsers(title="commands", dest="command",
                              metavar="COMMAND")
  sub.required = True
  for add in _COMMANDS:
    add(sub)
  return parser


COMPILE_CACHE_ENV = "MEGAN_COMPILE_CACHE"


def compile_cache_dir(env=os.environ) -> str | None:
  """Where the command line keeps XLA's compiled programs between runs
  (JAX's persistent compilation cache): ``$MEGAN_COMPILE_CACHE``, else
  ``$XDG_CACHE_HOME/megan_jax/xla`` (``~/.cache/...``); None when
  ``MEGAN_COMPILE_CACHE`` is 0/off or JAX's own ``JAX_COMPILATION_CACHE_DIR``
  decides."""
  setting = env.get(COMPILE_CACHE_ENV, "")
  if env.get("JAX_COMPILATION_CACHE_DIR") or setting.lower() in (
      "0", "off", "false", "no"):
    return None
  if setting:
    return setting
  root = env.get("XDG_CACHE_HOME") or os.path.join(
      os.path.expanduser("~"), ".cache")
  return os.path.join(root, "megan_jax", "xla")


def _use_compile_cache() -> None:
  """A second ``megan translate`` of the same run skips most compiling
  (paper widths on 2 CPU cores: ``--plan`` 22.0 → 9.2 s, README). Left
  alone when the process has a cache already (a library user's, the
  tests')."""
  import jax
  folder = compile_cache_dir()
  if folder is None or jax.config.jax_compilation_cache_dir:
    return
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError:
    return  # no cache, no harm: everything compiles as without one
  if os.access(folder, os.W_OK | os.X_OK):
    jax.config.update("jax_compilation_cache_dir", folder)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def os_error_line(e: OSError) -> str:
  """One line for an ``OSError``: the file(s) it names and the reason."""
  names = [str(n) for n in (e.filename, e.filename2) if n is not None]
  reason = e.strerror or str(e)
  return f"{' -> '.join(names)}: {reason}" if names else reason


def _end_progress_bars() -> None:
  """Closes the progress bars an error left open, so that its message starts
  a line of its own rather than trailing the bar's."""
  std = sys.modules.get("tqdm.std")  # not imported: no bar was shown
  if std is not None:
    for bar in list(getattr(std.tqdm, "_instances", ())):
      bar.close()


def _multiprocess() -> bool:
  """Whether this process is one of several of a ``jax.distributed`` job."""
  if "jax" not in sys.modules:  # not imported: not joined either
    return False
  from megan_jax import sharding
  return sharding.is_multiprocess()


def _leave_now(code: int) -> None:
  """Ends a failed process of a multi-process job at once. A normal exit
  would wait at ``jax.distributed``'s shutdown barrier (minutes) for the
  others, which may be waiting for this one in a collective; exiting lets
  the launcher stop them (``srun --kill-on-bad-exit``, the local launcher)."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
  code, agreed = _main(argv)
  if code and _multiprocess() and not agreed:
    _leave_now(code)
  # A failure every process met together (`sharding.agree`): all are here,
  # so the normal exit's shutdown barrier passes at once.
  return code


def _main(argv: Sequence[str] | None) -> tuple[int, bool]:
  """``(exit status, whether a failure was met by every process)``."""
  parser = build_parser()
  # --config.FIELD=VALUE overrides are free-form; argparse sees the rest.
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    argv = expand_arg_files(argv)
  except InputError as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2, True
  overrides = [a for a in argv if a.startswith("--config.")]
  args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
  if overrides and args.command != "train":
    parser.error(f"{overrides[0]}: config overrides are for 'megan train'")
  args.overrides = overrides
  from megan_jax import sharding
  try:
    _use_compile_cache()
    if args.distributed or sharding.distributed_requested():
      if args.command != "translate":  # the others would deadlock or clash
        raise InputError(
            f"megan {args.command}: runs as one process; --distributed "
            f"(or {sharding.ENV_REQUEST}=1) is for 'megan translate' only")
      sharding.initialize_distributed()
    code = int(args.func(args) or 0)
    # with several inputs, a failed one was met by all (else raised)
    return code, True
  except InputError as e:
    _end_progress_bars()
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2, sharding.is_agreed(e)
  except OSError as e:  # a folder that cannot be made, a full disk, ...
    _end_progress_bars()
    print(f"{PROG}: error: {os_error_line(e)}", file=sys.stderr)
    return 2, sharding.is_agreed(e)
  except KeyboardInterrupt:
    _end_progress_bars()
    print(f"{PROG}: interrupted", file=sys.stderr)
    return 130, False
  except Exception:  # a bug: its traceback, then out at once
    if not _multiprocess():
      raise
    import traceback
    traceback.print_exc()
    _leave_now(1)


if __name__ == "__main__":
  sys.exit(main())
