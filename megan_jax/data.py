"""Embedded data: the MNI152 2009a template shipped inside nilearn's wheel.

nilearn carries the ICBM 2009 symmetric template (T1 and grey/white matter
probability maps, 197×233×189 at 1 mm) as package data. We read those files
straight from the installed package, without importing nilearn (whose import
pulls in pandas and scikit-learn) and without any download.
"""
from __future__ import annotations

import functools
import importlib.util
import numbers
import os

import numpy as np
import scipy.ndimage as ndi

from megan_jax.errors import InputError
from megan_jax.io import Volume, load_nifti

_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
MNI152_NAME = "mni152"  # what CLI commands accept in place of an input path


def mni152_path(kind: str = "t1") -> str:
  """Path of the template file (``kind`` in t1, gm, wm) inside nilearn."""
  if kind not in _FILES:
    raise ValueError(f"unknown MNI152 map {kind!r}; choose from {sorted(_FILES)}")
  spec = importlib.util.find_spec("nilearn")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "the embedded MNI152 template comes with the 'nilearn' package; "
        "install it (pip install nilearn)")
  root = list(spec.submodule_search_locations)[0]
  path = os.path.join(root, "datasets", "data", _FILES[kind])
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: not in this nilearn install")
  return path


@functools.lru_cache(maxsize=8)
def _load(kind: str, spacing: float | None) -> Volume:
  vol = load_nifti(mni152_path(kind))
  if spacing is None or spacing == 1.0:
    return vol
  return resample_spacing(vol, spacing)


def mni152(kind: str = "t1", spacing: float | None = None) -> Volume:
  """The MNI152 template map ``kind`` (t1, gm, wm) as a ``Volume``.

  Args:
    kind: "t1" (intensities 0..255), "gm" or "wm" (probabilities ×255).
    spacing: isotropic voxel size in mm (default 1 mm, the file's own).
  """
  if spacing is not None and not (isinstance(spacing, numbers.Real)
                                  and not isinstance(spacing, bool)
                                  and 0 < spacing < float("inf")):
    raise InputError(f"spacing {spacing!r}: a voxel size in mm, > 0 (or "
                     "None for the file's 1 mm)")
  vol = _load(kind, None if spacing is None else float(spacing))
  # The cache holds one copy; callers get their own arrays (and header) to
  # modify.
  return Volume(vol.data.copy(), vol.affine.copy(),
                None if vol.header is None else vol.header.copy(), vol.path)


SPACING_RTOL = 0.02  # voxel sizes this close to the target are left alone


def spacing_shape(shape, affine, spacing: float) -> tuple[int, int, int]:
  """The shape of a volume resampled to isotropic ``spacing`` mm (its own
  shape when every voxel size is within ``SPACING_RTOL`` of ``spacing``)."""
  zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
  if np.allclose(zooms, spacing, rtol=SPACING_RTOL, atol=0):
    return tuple(int(n) for n in shape)
  out = np.maximum(1, np.round(np.array(shape) * zooms / spacing))
  return tuple(int(n) for n in out)


AREA_FROM = 2.5  # `resample_spacing`'s shrink factor for area averaging


def resample_spacing(vol: Volume, spacing: float, order: int = 1) -> Volume:
  """Resamples an (axis-aligned) volume to isotropic ``spacing`` mm.

  Keeps the world position of the first voxel's corner and updates the
  affine's scale; the header's zooms follow the new affine on save. An
  axis that shrinks ``AREA_FROM`` times or more is area-averaged (each new
  voxel the volume-weighted mean of the old ones it covers):
  interpolation there would read 2 of every 3 or more voxels (0.5 mm
  noise at 4 mm kept 8x the area mean's standard deviation). The rest is
  ``ndi.zoom`` (spline ``order``, voxel corners aligned), which at 2x is
  the area mean too; a nominal 2x whose voxel counts round (the demo's
  197 -> 98 at 1 -> 2 mm) stays as before.
  """
  from megan_jax.resample import _area_matrix
  zooms = np.sqrt((vol.affine[:3, :3] ** 2).sum(axis=0))
  shape = np.array(spacing_shape(vol.data.shape, vol.affine, spacing))
  if tuple(shape) == vol.data.shape:  # already (close to) that spacing
    return vol
  real = shape / np.array(vol.data.shape)  # the factor actually applied
  data = vol.data
  for a in sorted((a for a in range(3)
                   if AREA_FROM * shape[a] <= data.shape[a]),
                  key=lambda a: real[a]):  # the largest shrink first
    w = _area_matrix(data.shape[a], int(shape[a])).astype(np.float32)
    data = np.moveaxis(np.tensordot(w, np.asarray(data, np.float32),
                                    axes=([1], [a])), 0, a)
  rest = shape / np.array(data.shape)
  if (rest != 1).any():
    data = ndi.zoom(data, rest, order=order, grid_mode=True, mode="nearest")
  affine = vol.affine.copy()
  affine[:3, :3] = vol.affine[:3, :3] / real[None, :]
  # grid_mode: voxel corners stay put, so centres shift by half a new voxel.
  corner = vol.affine[:3, :3] @ np.full(3, -0.5) + vol.affine[:3, 3]
  affine[:3, 3] = corner - affine[:3, :3] @ np.full(3, -0.5)
  header = vol.header.copy() if vol.header is not None else None
  if header is not None:
    header.set_data_shape(data.shape)
    header.set_zooms(tuple(float(z) for z in zooms / real))
  return Volume(np.ascontiguousarray(data, np.float32), affine, header, None)


def brain_mask(spacing: float | None = None, threshold: float = 0.1
               ) -> np.ndarray:
  """A brain mask of the template: grey + white matter above ``threshold``,
  closed and hole-filled so the ventricles (CSF) are inside."""
  gm = mni152("gm", spacing).data / 255.0
  wm = mni152("wm", spacing).data / 255.0
  mask = (gm + wm) > threshold
  mask |= ndi.binary_closing(mask, iterations=2)  # closing erodes the image border
  return ndi.binary_fill_holes(mask)


def t2_like(spacing: float | None = None) -> Volume:
  """A T2-like contrast of the template, made from its tissue maps.

  CSF bright, grey matter intermediate, white matter dark (the reverse of
  T1's order), on the template's grid: the same anatomy in another domain,
  the demo's translation source (its ground truth is the template's T1).
  """
  t1 = mni152("t1", spacing)
  gm = mni152("gm", spacing).data / 255.0
  wm = mni152("wm", spacing).data / 255.0
  inside = brain_mask(spacing)
  csf = np.clip(inside.astype(np.float32) - gm - wm, 0.0, 1.0)
  t2 = 900.0 * csf + 520.0 * gm + 260.0 * wm
  t2 = ndi.gaussian_filter(t2, 0.5) * inside
  return Volume(t2.astype(np.float32), t1.affine, t1.header, None)
