"""Training data: target-domain volumes, their scale pyramid and edge sketches.

A dataset is a folder (or a text file listing paths, one a line) of NIfTI
volumes of the *target* domain; ``mni152`` names the embedded template. Each
volume is normalised to [-1, 1], reduced to every scale (``resample.pyramid``)
and sketched (``edges.canny_3d``) once; the arrays are cached on disk as
``.npy`` files and memory-mapped, so an epoch never recomputes Canny and a
large dataset need not fit in RAM. The cache key covers the file (path, size,
mtime) and every config field that changes the arrays.

Sampling is plain numpy with a generator seeded by ``(seed, scale, step)``, so
the batch of step N is the same whether or not the run was resumed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Sequence

import numpy as np

from megan_jax import edges as edges_lib
from megan_jax import io, resample
from megan_jax.errors import InputError
from megan_jax.normalise import fit_normaliser

CACHE_VERSION = 4  # 3: a label's classes alike on every scale; 4: area
# averaging where data.spacing shrinks an axis 2.5x or more


@dataclasses.dataclass(frozen=True)
class Subject:
  """One training volume at every scale (arrays may be memory-mapped).

  Attributes:
    name: file name (or "mni152").
    images: per scale, coarsest first, ``[D, H, W]`` in [-1, 1].
    edges: per scale, the edge sketch in [0, 1] (label written on if used).
    lr_input: the LR generator's input, the sketch at twice the LR
      resolution padded to ``(2 * lr_size)³``.
    lr_target: the scale-0 image padded to ``lr_size³``.
    foreground: per scale, flat indices (int32) of foreground voxels, for
      patch sampling in proportion to the foreground.
    intensity: ``[lo, hi]``, the intensities mapped to -1 and 1.
  """
  name: str
  images: list[np.ndarray]
  edges: list[np.ndarray]
  lr_input: np.ndarray
  lr_target: np.ndarray
  foreground: list[np.ndarray]
  intensity: np.ndarray


def list_volumes(path: str, label_suffix: str = "") -> list[str]:
  """The NIfTI files named by a folder, a list file, or "mni152".

  With ``label_suffix`` (e.g. "_seg"), files whose name ends in it before
  the extension are labels of the others (``x_seg.nii.gz`` of ``x.nii.gz``),
  not volumes, and are left out. In a list file, lines starting with ``#``
  are comments. Hidden files (``.name``: a killed writer's ``.tmp-*``,
  macOS's ``._*``) are not volumes.
  """
  from megan_jax.data import MNI152_NAME
  if path == MNI152_NAME:
    return [MNI152_NAME]
  if not path:
    raise InputError("dataset: no path given (set --config.data.path=FOLDER)")
  if os.path.isdir(path):
    files = sorted(os.path.join(path, f) for f in os.listdir(path)
                   if io.is_nifti_path(f) and not f.startswith("."))
  elif os.path.isfile(path) and not io.is_nifti_path(path):
    base = os.path.dirname(os.path.abspath(path))
    try:
      files = [os.path.join(base, line) for line in io.read_list_file(path)]
    except (UnicodeDecodeError, ValueError):
      raise InputError(f"dataset {path}: neither a NIfTI file (.nii, "
                       ".nii.gz) nor a text list of paths") from None
  elif os.path.isfile(path):
    files = [path]
  else:
    raise InputError(f"dataset {path}: no such folder or file")
  if label_suffix:
    files = [f for f in files
             if not _split_nifti(f)[0].endswith(label_suffix)]
  if not files:
    raise InputError(f"dataset {path}: holds no .nii or .nii.gz volumes"
                     + (f" (besides {label_suffix} labels)"
                        if label_suffix else ""))
  return files


def _split_nifti(path: str) -> tuple[str, str]:
  """``"a/x.nii.gz"`` → ``("a/x", ".nii.gz")`` (any letter case)."""
  for ext in (".nii.gz", ".nii"):
    if path.lower().endswith(ext):
      return path[:-len(ext)], path[-len(ext):]
  return os.path.splitext(path)


def label_path(path: str, suffix: str) -> str | None:
  """``x.nii.gz`` → ``x{suffix}.nii.gz`` when ``suffix`` is set."""
  if not suffix or path == "mni152":
    return None
  base, ext = _split_nifti(path)
  return base + suffix + ext


def _load_volume(path: str, config, label_file: str | None = None
                 ) -> tuple[io.Volume, np.ndarray | None]:
  """The volume at ``path`` and its label (when ``label_file`` is given) on
  the run's working grid (``grid.to_working``: orientation, spacing)."""
  from megan_jax import data, grid
  if path == data.MNI152_NAME:  # its resampling is cached (demo, tests)
    vol = data.mni152("t1", config.data.spacing or None)
  else:
    vol = io.load_nifti(path, allow_constant=False)
  label = None
  if label_file is not None:
    if not os.path.lexists(label_file):
      raise InputError(
          f"label {label_file}: no such file (with edges.use_label and "
          f"data.label_suffix every volume needs its label; {path} has none)")
    lab = io.load_nifti(label_file, what="label", allow_constant=True)
    io.check_same_grid(f"label {label_file}", lab.data.shape, lab.affine,
                       vol.data.shape, vol.affine, ref=f"volume {path}")
    label = lab.data > 0.5
  try:
    work = grid.to_working(vol, config, label)
  except InputError as e:
    raise InputError(f"dataset volume {path}: {e}") from None
  return work.volume, work.label


def preprocess(image: np.ndarray, config, label: np.ndarray | None = None,
               *, foreground: bool = True,
               sketch_executor=None, device=None) -> dict[str, np.ndarray]:
  """Pyramid and sketches of one normalised volume (pure numpy, no I/O).

  Args:
    image: ``[D, H, W]`` in [-1, 1] at full resolution.
    config: the run's config (geometry and edge fields).
    label: optional mask at full resolution, written onto every sketch.
    foreground: also list the foreground voxels (for training's patch
      sampling; inference skips them: at 1024³ they would take gigabytes).
    sketch_executor: optional `concurrent.futures.Executor`: the sketches
      of scales 2..n are submitted to it and come back as Futures of the
      same arrays, so a caller can generate the coarser scales meanwhile
      (inference does; scales 0 and 1, the LR input's, are computed here).
    device: where the sketches' "jax" engine runs (`edges.canny_3d`).

  Returns:
    A dict of arrays: ``image_k``, ``edges_k`` (and ``fg_k``) for every scale k,
    ``lr_input`` and ``lr_target``.
  """
  n = config.num_hr_scales
  shapes = resample.scale_shapes(image.shape, n)
  from megan_jax import state as state_lib
  resample.check_lr_size(shapes[0], config.lr_size,
                         state_lib.lr_size_multiple(config))
  images = resample.pyramid(image, n)
  labels = None
  if label is not None:
    # Nonzero = inside, every class alike (as add_label): a class value
    # (BRATS' 4, say) must not weigh more in the area average below.
    labels = [(np.asarray(label) != 0).astype(np.float32)]
    for _ in range(n):
      labels.insert(0, resample.downsample2(labels[0]))
    labels = [lab > 0.5 for lab in labels]

  def sketch(img, lab):
    s = edges_lib.canny_3d(img, sigma=config.edges.sigma,
                           low_threshold=config.edges.low,
                           high_threshold=config.edges.high, device=device)
    return s if lab is None else edges_lib.add_label(s, lab)

  out = {}
  for k, img in enumerate(images):
    out[f"image_{k}"] = np.asarray(img, np.float32)
    lab = None if labels is None else labels[k]
    if sketch_executor is not None and k >= 2:
      out[f"edges_{k}"] = sketch_executor.submit(sketch, img, lab)
    else:
      out[f"edges_{k}"] = sketch(img, lab)
    if not foreground:
      continue
    fg = np.flatnonzero(img.ravel() > config.data.foreground).astype(np.int32)
    if fg.size == 0:  # nothing above the threshold: sample uniformly
      fg = np.arange(img.size, dtype=np.int32)
    out[f"fg_{k}"] = fg
  # The LR input: the sketch at twice the LR resolution. With an HR scale it
  # is scale 1's own sketch (finer edges survive); else scale 0 upsampled.
  if n >= 1:
    fine = out["edges_1"]
  else:
    fine = sketch(resample.upsample2(images[0]),
                  None if labels is None else
                  resample.nearest_upsample2(labels[0]) > 0.5)
  out["lr_input"], _ = resample.lr_pad(fine, config.lr_size, factor=2,
                                       pad_value=0.0)
  out["lr_target"], _ = resample.lr_pad(images[0], config.lr_size)
  return out


def _cache_key(path: str, config) -> str:
  if os.path.exists(path):
    st = os.stat(path)
    ident = [os.path.abspath(path), st.st_size, st.st_mtime_ns]
    lpath = label_path(path, config.data.label_suffix)
    if config.edges.use_label and lpath and os.path.exists(lpath):
      lst = os.stat(lpath)  # a changed label file is a new sketch too
      ident += [os.path.abspath(lpath), lst.st_size, lst.st_mtime_ns]
  else:
    ident = [path]
  fields = {
      "v": CACHE_VERSION, "file": ident,
      "data": config.data.to_dict(), "edges": config.edges.to_dict(),
      "n": config.num_hr_scales, "lr": config.lr_size,
      "engine": edges_lib.ENGINE,  # the engines differ by rounding
  }
  blob = json.dumps(fields, sort_keys=True, default=str).encode()
  return hashlib.sha1(blob).hexdigest()[:16]


def load_subject(path: str, config, cache_dir: str | None = None) -> Subject:
  """Loads (from the cache when it is there) one volume's training arrays."""
  n = config.num_hr_scales
  names = ([f"{kind}_{k}" for k in range(n + 1)
            for kind in ("image", "edges", "fg")]
           + ["lr_input", "lr_target", "intensity"])
  folder = None
  if cache_dir:
    folder = os.path.join(cache_dir, _cache_key(path, config))
    if all(os.path.exists(os.path.join(folder, f + ".npy")) for f in names):
      arrays = {f: np.load(os.path.join(folder, f + ".npy"), mmap_mode="r")
                for f in names}
      return _subject(path, arrays, n)
  lpath = label_path(path, config.data.label_suffix)
  use_label = config.edges.use_label and lpath is not None
  vol, label = _load_volume(path, config, lpath if use_label else None)
  window = tuple(config.data.window) or None
  norm = fit_normaliser(vol.data, percentiles=tuple(config.data.percentiles),
                        window=window, path=path)
  try:
    arrays = preprocess(norm.normalise(vol.data), config, label)
  except InputError as e:  # e.g. the config's LR grid is too small for it
    raise InputError(f"dataset volume {path}: {e}") from None
  arrays["intensity"] = np.array([norm.lo, norm.hi], np.float64)
  if folder is not None:
    os.makedirs(folder, exist_ok=True)
    for f in names:  # each file atomically: a killed run leaves no half file
      with io.atomic_path(os.path.join(folder, f + ".npy"), ".npy") as tmp:
        np.save(tmp, arrays[f])
    arrays = {f: np.load(os.path.join(folder, f + ".npy"), mmap_mode="r")
              for f in names}
  return _subject(path, arrays, n)


def _subject(path: str, arrays: dict, n: int) -> Subject:
  return Subject(
      name=os.path.basename(path),
      images=[arrays[f"image_{k}"] for k in range(n + 1)],
      edges=[arrays[f"edges_{k}"] for k in range(n + 1)],
      lr_input=arrays["lr_input"], lr_target=arrays["lr_target"],
      foreground=[arrays[f"fg_{k}"] for k in range(n + 1)],
      intensity=np.asarray(arrays["intensity"]))


def load_dataset(path: str, config, cache_dir: str | None = None,
                 progress: bool = False) -> list[Subject]:
  """All volumes of a dataset (see ``list_volumes``), preprocessed."""
  files = list_volumes(path, config.data.label_suffix)
  if progress:
    from tqdm import tqdm
    files = tqdm(files, desc="preprocess", unit="vol", leave=False)
  return [load_subject(f, config, cache_dir) for f in files]


# ---------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------
def crop(volume: np.ndarray, start: Sequence[int], size: int,
         pad_value: float) -> np.ndarray:
  """``volume[start : start + size]`` per axis, background where outside."""
  out = np.full((size,) * 3, pad_value, np.float32)
  src, dst = [], []
  for s, length in zip(start, volume.shape):
    lo, hi = max(s, 0), min(s + size, length)
    if hi <= lo:
      return out
    src.append(slice(lo, hi))
    dst.append(slice(lo - s, hi - s))
  out[tuple(dst)] = volume[tuple(src)]
  return out


def step_rng(seed: int, scale: int, step: int, stream: int = 0
             ) -> np.random.Generator:
  """The sampling generator of one step: the same on resume. ``stream``
  separates other uses (1 = the fixed validation patches)."""
  return np.random.default_rng([seed, scale, step, stream])


def sample_hr_batch(subjects: Sequence[Subject], scale: int, batch_size: int,
                    patch_size: int, rng: np.random.Generator,
                    uniform_fraction: float = 0.0) -> dict[str, np.ndarray]:
  """Training patches of HR scale ``scale`` (>= 1), centred on foreground.

  The output patch starts at an even ``s = 2c`` (so its previous-scale patch,
  starting at ``c`` in the previous volume padded by ``p/4``, is exactly
  centred on it), with ``c`` chosen so the patch is centred on a foreground
  voxel of the previous scale drawn uniformly: patches are sampled in
  proportion to the foreground. A ``uniform_fraction`` of the patches is
  centred anywhere instead, so the generator also sees empty background (at
  inference every patch of the grid is generated, the empty ones included).
  Starts run from 0 to inference's last, ``2 * coarse.shape - p``: every
  voxel is in some patch (an odd axis's last patch reaches one voxel past
  the volume, padded: the target with -1, the sketch with 0, as inference
  pads it).

  Returns:
    ``prev``, ``edges``, ``target``: ``[B, p, p, p, 1]`` float32 each; the
    conditioning uses the *real* previous-scale volume (augmented later).
  """
  p = patch_size
  prev, edge, target = [], [], []
  for _ in range(batch_size):
    sub = subjects[rng.integers(len(subjects))]
    fine, coarse = sub.images[scale], sub.images[scale - 1]
    if rng.random() < uniform_fraction:
      centre = tuple(int(rng.integers(n)) for n in coarse.shape)
    else:
      centre = np.unravel_index(int(rng.choice(sub.foreground[scale - 1])),
                                coarse.shape)
    # The last start is inference's last patch on its even grid (twice the
    # previous scale): on an odd axis it reaches past the volume (padded)
    # so that the last voxel is trained on too.
    cmax = [max(2 * length - p, 0) // 2 for length in coarse.shape]
    c = [int(np.clip(u - p // 4, 0, m)) for u, m in zip(centre, cmax)]
    s = [2 * ci for ci in c]
    target.append(crop(fine, s, p, -1.0))
    edge.append(crop(sub.edges[scale], s, p, 0.0))
    prev.append(crop(coarse, [ci - p // 4 for ci in c], p, -1.0))
  stack = lambda xs: np.stack(xs)[..., None]
  return {"prev": stack(prev), "edges": stack(edge), "target": stack(target)}


def sample_lr_batch(subjects: Sequence[Subject], batch_size: int,
                    rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Whole-volume LR pairs: ``edges`` ``[B, 2L, 2L, 2L, 1]``, ``target``
  ``[B, L, L, L, 1]``."""
  idx = rng.integers(len(subjects), size=batch_size)
  return {
      "edges": np.stack([subjects[i].lr_input for i in idx])[..., None],
      "target": np.stack([subjects[i].lr_target for i in idx])[..., None],
  }
