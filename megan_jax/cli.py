"""The ``megan`` command line: a thin layer over the library.

Every command checks its inputs before doing any work. A problem a user can
fix is one line on stderr (``megan: error: <file>: <problem>``), exit status
2, no traceback, and no output file left behind.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from megan_jax.errors import InputError

PROG = "megan"


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


def load_label(path: str | None, shape, *, what: str = "mask"):
  """Loads an optional label mask and checks it matches ``shape``."""
  if path is None:
    return None
  from megan_jax import io
  vol = io.load_nifti(path, what=what, allow_constant=True)
  if vol.data.shape != tuple(shape):
    raise InputError(
        f"{what} {path}: shape {'x'.join(map(str, vol.data.shape))} differs "
        f"from the image's {'x'.join(map(str, shape))}")
  return vol.data > 0.5


# ---------------------------------------------------------------------------
# megan edges
# ---------------------------------------------------------------------------
def _add_edges(sub):
  p = sub.add_parser(
      "edges", help="3D Canny edge sketch of a volume (the generators' input)",
      description="Writes the gradient-weighted 3D Canny edge sketch of IN to "
      "OUT (same affine and header) and a PNG montage of three orthogonal "
      "slices next to it. IN may be 'mni152' for the embedded template.")
  p.add_argument("-i", "--input", required=True, metavar="IN",
                 help="NIfTI volume (.nii/.nii.gz), or 'mni152'")
  p.add_argument("-o", "--output", required=True, metavar="OUT",
                 help="output .nii/.nii.gz (must not exist as an input)")
  p.add_argument("--mask", metavar="MASK",
                 help="label mask (e.g. a tumour) written onto the sketch")
  p.add_argument("--sigma", type=float, default=1.0,
                 help="Gaussian smoothing in voxels (default 1.0)")
  p.add_argument("--low", type=float, default=0.1,
                 help="low hysteresis threshold, fraction of the max gradient")
  p.add_argument("--high", type=float, default=0.2,
                 help="high hysteresis threshold, fraction of the max gradient")
  p.add_argument("--no-png", action="store_true", help="skip the PNG montage")
  p.set_defaults(func=cmd_edges)


def cmd_edges(args) -> int:
  from megan_jax import edges, io, writers
  from megan_jax.normalise import normalise
  io.check_output_path(args.output, [args.input, args.mask])
  if not 0 <= args.low <= args.high:
    raise InputError(f"--low {args.low:g} / --high {args.high:g}: need "
                     "0 <= low <= high")
  vol = load_input(args.input)
  label = load_label(args.mask, vol.data.shape)
  sketch = edges.canny_3d(vol.data, sigma=args.sigma,
                          low_threshold=args.low, high_threshold=args.high)
  if label is not None:
    sketch = edges.add_label(sketch, label)
  io.save_nifti(args.output, sketch, vol.affine, vol.header,
                inputs=[args.input, args.mask])
  print(f"wrote {args.output}")
  if not args.no_png:
    png = _png_path(args.output)
    image, _ = normalise(vol.data)
    writers.montage({"input": image, "edges": sketch * 2.0 - 1.0}, png)
    print(f"wrote {png}")
  return 0


# ---------------------------------------------------------------------------
# megan demo
# ---------------------------------------------------------------------------
def _add_demo(sub):
  p = sub.add_parser(
      "demo", help="run the main job on the embedded MNI152 template",
      description="Runs MEGAN's pipeline on the embedded MNI152 template "
      "(nothing is downloaded). For now: the template at 2 mm, its edge "
      "sketch and a montage.")
  p.add_argument("--out", default="megan-demo", help="output folder")
  p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
  from megan_jax import data, edges, io, writers
  from megan_jax.normalise import normalise
  os.makedirs(args.out, exist_ok=True)
  if not os.access(args.out, os.W_OK):
    raise InputError(f"output folder {args.out}: not writable")
  vol = data.mni152("t1", spacing=2.0)
  image, _ = normalise(vol.data)
  sketch = edges.canny_3d(vol.data, mask=data.brain_mask(2.0))
  src = os.path.join(args.out, "source.nii.gz")
  out = os.path.join(args.out, "edges.nii.gz")
  io.save_nifti(src, vol.data, vol.affine, vol.header)
  io.save_nifti(out, sketch, vol.affine, vol.header)
  png = os.path.join(args.out, "montage.png")
  writers.montage({"source": image, "edges": sketch * 2.0 - 1.0}, png)
  for f in (src, out, png):
    print(f"wrote {f}")
  return 0


_COMMANDS: Sequence[Callable] = (_add_demo, _add_edges)


def build_parser() -> argparse.ArgumentParser:
  from megan_jax import __version__
  parser = argparse.ArgumentParser(
      prog=PROG,
      description="megan_jax: memory-efficient multi-scale GAN translation of "
      "full-resolution 3D medical images.")
  parser.add_argument("--version", action="version",
                      version=f"%(prog)s {__version__}")
  sub = parser.add_subparsers(title="commands", dest="command",
                              metavar="COMMAND")
  sub.required = True
  for add in _COMMANDS:
    add(sub)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    return int(args.func(args) or 0)
  except InputError as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"{PROG}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
