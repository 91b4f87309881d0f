"""A seeded paired benchmark built from the real MNI152 template.

Translation in this library trains on target-domain volumes only, but
measuring it needs source/target pairs of the same anatomy. Real paired data
(BRATS, CT kernels) cannot ship with the package, so we make subjects from the
embedded MNI152 template (``data.mni152``: ICBM 2009a nonlinear symmetric T1,
grey and white matter maps, as shipped in nilearn's wheel):

* anatomy: one smooth random elastic deformation plus a small random affine
  (rotation up to ±5°, scale ±5 % per axis) per subject, applied identically
  to the T1, GM and WM maps and the brain mask (linear interpolation);
* ``"t1t2"``: source = the deformed T1, skull-stripped with the deformed brain
  mask (the template is already brain-only, as BRATS images are), times a
  smooth bias field (±15 %), plus 1 % noise; target = a T2-like contrast made
  from the deformed tissue maps the way ``data.t2_like`` does, times another
  bias field. Evaluation mask: the deformed brain.
* ``"kernel"`` (the paper's CT reconstruction-kernel task): target = the
  deformed T1, lightly smoothed (the "smooth kernel"); source = the same
  volume high-pass boosted plus spatially correlated noise (the "sharp
  kernel"). Evaluation mask: the deformed head (the template's foreground).

Every random draw comes from ``numpy.random.default_rng`` seeded by
``(seed, subject index, stream)``: a subject's anatomy depends only on
``(seed, index)``, the same for both tasks and whatever else is generated, and
the smooth fields live on a fixed world-space grid, so the anatomy is the same
at every spacing up to resampling. Volumes are cropped to a fixed box around
the template's brain (+ ``MARGIN_MM``), each side capped at ``max_side``
voxels, with the affine moved to the crop's first voxel so NIfTIs stay in
world space.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re

import numpy as np
import scipy.ndimage as ndi

from megan_jax import data, io

TASKS = ("t1t2", "kernel")

MARGIN_MM = 8.0           # crop margin around the template's brain box
ELASTIC_SIGMA_MM = 10.0   # smoothness of the elastic displacement
ELASTIC_MAX_MM = 3.5      # largest displacement length
ELASTIC_STEP_MM = 2.5     # grid the displacement noise is drawn on
MAX_ROTATION_DEG = 5.0
MAX_SCALE = 0.05
BIAS_SIGMA_MM = 30.0      # smoothness of the multiplicative bias fields
BIAS_AMPLITUDE = 0.15     # bias = exp(±log(1 + amplitude))
BIAS_STEP_MM = 7.5
T1_NOISE = 0.01           # t1t2 source noise std, fraction of the T1 range
KERNEL_SMOOTH = 0.5       # target's Gaussian sigma (voxels)
KERNEL_BOOST = 1.5        # source = x + boost * (x - gaussian(x, KERNEL_SIGMA))
KERNEL_SIGMA = 1.0
KERNEL_NOISE_SIGMA = 0.7  # correlation length of the source noise (voxels)
KERNEL_NOISE = 0.035      # its std, fraction of the intensity range

MANIFEST = "manifest.json"
_MANIFEST_VERSION = 1
_FOLDERS = {"train": ("source", "target"),
            "test": ("source", "target", "mask")}
_SUBJECT_FILE = re.compile(r"sub-\d+\.nii\.gz")

# Stream ids: anatomy streams (0, k) are shared by every task.
_ELASTIC, _AFFINE = (0, 0), (0, 1)


@dataclasses.dataclass(eq=False)
class PairedSubject:
  """One synthetic subject: two contrasts of the same anatomy.

  Attributes:
    source: the volume to translate, float32 ``[D, H, W]``.
    target: its ground truth in the target domain, same grid and affine.
    mask: bool ``[D, H, W]``, the evaluation region (brain for t1t2, head for
      kernel).
    name: ``sub-XXX`` with the subject index.
  """
  source: io.Volume
  target: io.Volume
  mask: np.ndarray
  name: str


# --------------------------------------------------------------------------
# Template, crop box, fixed world grid
# --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Template:
  t1: np.ndarray      # [D, H, W] float32, 0..255
  gm: np.ndarray      # probabilities 0..1
  wm: np.ndarray
  brain: np.ndarray   # float32 0/1, interpolated when warped
  head: np.ndarray
  affine: np.ndarray
  header: object


def _check_spacing(spacing) -> float:
  spacing = float(spacing)
  if not np.isfinite(spacing) or spacing <= 0:
    raise ValueError(f"spacing must be a positive number of mm, got {spacing}")
  return spacing


def _check_max_side(max_side) -> int | None:
  if max_side is None:
    return None
  if isinstance(max_side, bool) or int(max_side) != max_side or max_side < 8:
    raise ValueError(f"max_side must be an integer >= 8 or None, "
                     f"got {max_side!r}")
  return int(max_side)


@functools.lru_cache(maxsize=4)
def _template(spacing: float) -> _Template:
  t1 = data.mni152("t1", spacing)
  gm = data.mni152("gm", spacing).data / 255.0
  wm = data.mni152("wm", spacing).data / 255.0
  brain = data.brain_mask(spacing)
  # The template T1 is brain-only; its foreground (hole-filled) is the head.
  head = ndi.binary_fill_holes((t1.data > 0.02 * t1.data.max()) | brain)
  arrays = [t1.data, gm, wm, brain, head]
  arrays = [a.astype(np.float32) for a in arrays]
  for a in arrays:  # shared by every subject: nobody may write into them
    a.setflags(write=False)
  return _Template(*arrays, affine=t1.affine, header=t1.header)


@functools.lru_cache(maxsize=8)
def _crop_box(spacing: float, max_side: int | None) -> tuple[slice, ...]:
  tpl = _template(spacing)
  idx = np.argwhere(tpl.brain > 0)
  margin = int(np.ceil(MARGIN_MM / spacing))
  shape = np.array(tpl.brain.shape)
  lo = np.maximum(idx.min(axis=0) - margin, 0)
  hi = np.minimum(idx.max(axis=0) + 1 + margin, shape)
  if max_side is not None:
    # Too long a side keeps its centre and loses the same on both ends.
    excess = np.maximum(hi - lo - max_side, 0)
    lo = lo + excess // 2
    hi = hi - (excess - excess // 2)
  return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def crop_box(spacing: float = 1.5, max_side: int | None = 128
             ) -> tuple[slice, slice, slice]:
  """The subjects' grid as slices of the template resampled to ``spacing``.

  The template's brain bounding box plus ``MARGIN_MM`` (clipped to the
  template), each side shortened symmetrically to at most ``max_side``.
  """
  return _crop_box(_check_spacing(spacing), _check_max_side(max_side))


def _world_grid(step: float, spacing: float):
  """A fixed world grid over the template's field of view (plus one step),
  snapped to multiples of ``step`` so it is the same at every spacing."""
  tpl = _template(spacing)
  corners = np.array([[-0.5, -0.5, -0.5], np.array(tpl.t1.shape) - 0.5])
  world = corners @ tpl.affine[:3, :3].T + tpl.affine[:3, 3]
  lo_mm, hi_mm = world.min(axis=0), world.max(axis=0)
  lo = (np.floor(lo_mm / step + 1e-3) - 1) * step
  hi = (np.ceil(hi_mm / step - 1e-3) + 1) * step
  n = np.round((hi - lo) / step).astype(int) + 1
  return lo, tuple(int(v) for v in n)


def _rng(seed: int, index: int, stream: tuple[int, int]
         ) -> np.random.Generator:
  return np.random.default_rng([seed, index, *stream])


def _smooth_fields(rng, count: int, n, step: float, sigma_mm: float
                   ) -> np.ndarray:
  """``count`` zero-mean Gaussian-filtered noise fields ``[count, *n]``."""
  noise = rng.standard_normal((count, *n))
  fields = np.stack([ndi.gaussian_filter(f, sigma_mm / step) for f in noise])
  return fields - fields.mean(axis=(1, 2, 3), keepdims=True)


def _sample(field: np.ndarray, lo: np.ndarray, step: float,
            points: np.ndarray) -> np.ndarray:
  """A world-grid field at world ``points`` ``[3, N]`` (linear)."""
  coords = (points - lo[:, None]) / step
  return ndi.map_coordinates(field, coords, order=1, mode="nearest")


# --------------------------------------------------------------------------
# Anatomy: the deformed template maps
# --------------------------------------------------------------------------

def _rotation(angles_deg: np.ndarray) -> np.ndarray:
  a, b, c = np.deg2rad(angles_deg)
  rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)],
                 [0, np.sin(a), np.cos(a)]])
  ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0],
                 [-np.sin(b), 0, np.cos(b)]])
  rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0],
                 [0, 0, 1]])
  return rz @ ry @ rx


@dataclasses.dataclass(frozen=True)
class _Anatomy:
  t1: np.ndarray      # [D, H, W] float32 on the crop grid
  gm: np.ndarray
  wm: np.ndarray
  brain: np.ndarray   # bool
  head: np.ndarray    # bool
  points: np.ndarray  # [3, D*H*W] world mm of the crop's voxels
  affine: np.ndarray
  header: object


def _anatomy(index: int, seed: int, spacing: float, max_side: int | None
             ) -> _Anatomy:
  tpl = _template(spacing)
  box = _crop_box(spacing, max_side)
  shape = tuple(s.stop - s.start for s in box)
  start = np.array([s.start for s in box], float)
  affine = tpl.affine.copy()
  affine[:3, 3] = tpl.affine[:3, :3] @ start + tpl.affine[:3, 3]
  header = tpl.header.copy() if tpl.header is not None else None
  if header is not None:
    header.set_data_shape(shape)

  grid = np.indices(shape, dtype=np.float64).reshape(3, -1)
  points = affine[:3, :3] @ grid + affine[:3, 3:4]  # world mm, [3, N]
  del grid

  # Output point x reads the template at c + M (x - c) + u(x): the subject
  # is the template pulled through a small affine and a smooth warp.
  lo, n = _world_grid(ELASTIC_STEP_MM, spacing)
  disp = _smooth_fields(_rng(seed, index, _ELASTIC), 3, n, ELASTIC_STEP_MM,
                        ELASTIC_SIGMA_MM)
  # Linear interpolation never exceeds the grid values, so this bounds |u|.
  disp *= ELASTIC_MAX_MM / np.sqrt((disp ** 2).sum(axis=0)).max()

  rng = _rng(seed, index, _AFFINE)
  angles = rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, 3)
  scales = rng.uniform(1 - MAX_SCALE, 1 + MAX_SCALE, 3)
  matrix = _rotation(angles) @ np.diag(scales)
  brain_idx = np.argwhere(tpl.brain > 0)
  centre_idx = (brain_idx.min(axis=0) + brain_idx.max(axis=0)) / 2
  centre = tpl.affine[:3, :3] @ centre_idx + tpl.affine[:3, 3]

  moved = matrix @ (points - centre[:, None]) + centre[:, None]
  for axis in range(3):
    moved[axis] += _sample(disp[axis], lo, ELASTIC_STEP_MM, points)
  inv = np.linalg.inv(tpl.affine)
  coords = inv[:3, :3] @ moved + inv[:3, 3:4]
  del moved

  def warp(vol):
    out = ndi.map_coordinates(vol, coords, order=1, mode="constant", cval=0.0)
    return out.reshape(shape).astype(np.float32)

  return _Anatomy(t1=warp(tpl.t1), gm=warp(tpl.gm), wm=warp(tpl.wm),
                  brain=warp(tpl.brain) > 0.5, head=warp(tpl.head) > 0.5,
                  points=points, affine=affine, header=header)


def _bias(seed: int, index: int, stream, spacing: float, points, shape
          ) -> np.ndarray:
  """A smooth multiplicative field between 1/(1+a) and 1+a, on the crop."""
  lo, n = _world_grid(BIAS_STEP_MM, spacing)
  field = _smooth_fields(_rng(seed, index, stream), 1, n, BIAS_STEP_MM,
                         BIAS_SIGMA_MM)[0]
  field /= np.abs(field).max()
  log_bias = np.log1p(BIAS_AMPLITUDE) * _sample(field, lo, BIAS_STEP_MM,
                                                points)
  return np.exp(log_bias).reshape(shape).astype(np.float32)


# --------------------------------------------------------------------------
# Subjects
# --------------------------------------------------------------------------

def _check_task(task: str) -> int:
  if task not in TASKS:
    raise ValueError(f"unknown paired task {task!r}; choose from {TASKS}")
  return TASKS.index(task) + 1  # 0 is the anatomy's stream


def _check_count(name: str, value, minimum: int = 0) -> int:
  if isinstance(value, bool) or int(value) != value or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return int(value)


def subject_name(index: int) -> str:
  return f"sub-{index:03d}"


def make_subject(task: str, index: int, *, seed: int = 0,
                 spacing: float = 1.5, max_side: int | None = 128
                 ) -> PairedSubject:
  """One synthetic subject of ``task`` (``"t1t2"`` or ``"kernel"``).

  Args:
    task: one of ``TASKS``.
    index: subject number (>= 0); with ``seed`` it fixes the anatomy.
    seed: benchmark seed (>= 0).
    spacing: isotropic voxel size in mm (1.5 for CPU runs, 1.0 on GPU).
    max_side: longest allowed side of the crop in voxels (None: the brain
      box plus margin, uncapped).

  Returns:
    A ``PairedSubject`` whose source, target and mask share one grid
    ``[D, H, W]`` and affine (world space of the template).

  Raises:
    ValueError: unknown task, negative index or seed, bad spacing/max_side.
  """
  stream = _check_task(task)
  index = _check_count("index", index)
  seed = _check_count("seed", seed)
  spacing = _check_spacing(spacing)
  max_side = _check_max_side(max_side)
  anat = _anatomy(index, seed, spacing, max_side)
  shape = anat.t1.shape
  t1_range = float(_template(spacing).t1.max())

  if task == "t1t2":
    brain = anat.brain.astype(np.float32)
    bias_s = _bias(seed, index, (stream, 0), spacing, anat.points, shape)
    bias_t = _bias(seed, index, (stream, 1), spacing, anat.points, shape)
    noise = _rng(seed, index, (stream, 2)).standard_normal(shape)
    source = anat.t1 * brain * bias_s
    source = np.maximum(source + T1_NOISE * t1_range * noise * brain, 0.0)
    # data.t2_like's recipe on the deformed tissue maps.
    csf = np.clip(brain - anat.gm - anat.wm, 0.0, 1.0)
    t2 = 900.0 * csf + 520.0 * anat.gm + 260.0 * anat.wm
    target = ndi.gaussian_filter(t2, 0.5) * brain * bias_t
    mask = anat.brain
  else:  # kernel
    x = anat.t1
    target = ndi.gaussian_filter(x, KERNEL_SMOOTH)
    sharp = x + KERNEL_BOOST * (x - ndi.gaussian_filter(x, KERNEL_SIGMA))
    noise = _rng(seed, index, (stream, 0)).standard_normal(shape)
    noise = ndi.gaussian_filter(noise, KERNEL_NOISE_SIGMA)
    # Filtering shrinks the std; rescale so the stated level is the real one.
    noise *= KERNEL_NOISE * t1_range / noise.std()
    source = sharp + noise
    mask = anat.head

  def vol(a):
    return io.Volume(np.asarray(a, np.float32), anat.affine.copy(),
                     anat.header.copy() if anat.header is not None else None)

  return PairedSubject(source=vol(source), target=vol(target),
                       mask=np.asarray(mask, bool), name=subject_name(index))


# --------------------------------------------------------------------------
# On disk
# --------------------------------------------------------------------------

def _params(task, seed, spacing, max_side, n_train, n_test) -> dict:
  return {"version": _MANIFEST_VERSION, "task": task, "seed": seed,
          "spacing": spacing, "max_side": max_side, "n_train": n_train,
          "n_test": n_test}


def _manifest_matches(out_dir: str, params: dict) -> dict | None:
  path = os.path.join(out_dir, MANIFEST)
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, ValueError):
    return None
  if not isinstance(manifest, dict):
    return None
  if any(manifest.get(k) != v for k, v in params.items()):
    return None
  try:
    files = [p for split in _FOLDERS for kind in _FOLDERS[split]
             for p in manifest[split][kind]]
  except (KeyError, TypeError):
    return None
  if not all(os.path.isfile(os.path.join(out_dir, p)) for p in files):
    return None
  return manifest


def write_split(task: str, out_dir: str | os.PathLike, *, n_train: int = 4,
                n_test: int = 2, seed: int = 0, spacing: float = 1.5,
                max_side: int | None = 128) -> dict:
  """Writes a train/test split of ``task`` as NIfTI files plus a manifest.

  Layout (``XXX`` = subject index; train subjects are 0..n_train-1, test
  subjects n_train..n_train+n_test-1, so test anatomy never appears in
  training)::

    out_dir/train/{source,target}/sub-XXX.nii.gz      float32
    out_dir/test/{source,target}/sub-XXX.nii.gz       float32
    out_dir/test/mask/sub-XXX.nii.gz                  uint8 evaluation mask
    out_dir/manifest.json

  The manifest holds the parameters, the common shape, and per split and
  kind the file paths relative to ``out_dir``. When a manifest with the same
  parameters exists and its files are present, it is returned without
  regenerating anything.

  Args:
    task: one of ``TASKS``.
    out_dir: folder to write (created if missing).
    n_train, n_test: numbers of subjects.
    seed, spacing, max_side: as for ``make_subject``.

  Returns:
    The manifest dict.
  """
  _check_task(task)
  n_train = _check_count("n_train", n_train)
  n_test = _check_count("n_test", n_test)
  if n_train + n_test == 0:
    raise ValueError("write_split needs at least one subject "
                     "(n_train=0, n_test=0)")
  seed = _check_count("seed", seed)
  spacing = _check_spacing(spacing)
  max_side = _check_max_side(max_side)
  out_dir = os.fspath(out_dir)
  params = _params(task, seed, spacing, max_side, n_train, n_test)
  found = _manifest_matches(out_dir, params)
  if found is not None:
    return found

  # No stale manifest may describe a half-rewritten folder.
  manifest_path = os.path.join(out_dir, MANIFEST)
  if os.path.exists(manifest_path):
    os.remove(manifest_path)
  for split, kinds in _FOLDERS.items():
    for kind in kinds:
      os.makedirs(os.path.join(out_dir, split, kind), exist_ok=True)

  splits = {"train": range(n_train), "test": range(n_train, n_train + n_test)}
  lists = {split: {kind: [] for kind in kinds}
           for split, kinds in _FOLDERS.items()}
  shape = None
  for split, indices in splits.items():
    for index in indices:
      sub = make_subject(task, index, seed=seed, spacing=spacing,
                         max_side=max_side)
      shape = list(sub.source.data.shape)
      arrays = {"source": (sub.source.data, np.float32),
                "target": (sub.target.data, np.float32),
                "mask": (sub.mask.astype(np.uint8), np.uint8)}
      for kind in _FOLDERS[split]:
        rel = f"{split}/{kind}/{sub.name}.nii.gz"
        array, dtype = arrays[kind]
        io.save_nifti(os.path.join(out_dir, rel), array, sub.source.affine,
                      sub.source.header, dtype=dtype)
        lists[split][kind].append(rel)

  # Subject files of an earlier, larger split would confuse folder globs.
  for split, kinds in _FOLDERS.items():
    for kind in kinds:
      keep = {os.path.basename(p) for p in lists[split][kind]}
      folder = os.path.join(out_dir, split, kind)
      for name in os.listdir(folder):
        if _SUBJECT_FILE.fullmatch(name) and name not in keep:
          os.remove(os.path.join(folder, name))

  manifest = dict(params)
  manifest.update({
      "shape": shape,
      "description": (
          f"Synthetic paired '{task}' benchmark: each subject is the real "
          "MNI152 template shipped with nilearn (ICBM 2009a nonlinear "
          "symmetric T1/GM/WM maps) under a seeded random elastic + affine "
          "deformation, rendered in a source and a target contrast of the "
          "same anatomy. The contrasts are synthetic, not scans. Paths are "
          "relative to this file's folder; test subjects are held out."),
      "train": {"subjects": [subject_name(i) for i in splits["train"]],
                **lists["train"]},
      "test": {"subjects": [subject_name(i) for i in splits["test"]],
               **lists["test"]},
  })
  with io.atomic_path(manifest_path, suffix=".json") as tmp:
    with open(tmp, "w") as f:
      json.dump(manifest, f, indent=2)
  return manifest
