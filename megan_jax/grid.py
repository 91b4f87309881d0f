"""The working grid: the voxel order and spacing the cascade sees.

A volume comes in the file's voxel order and voxel size. Before training or
translating, it is brought onto the run's working grid in two steps, each a
config field:

1. **Orientation** (``data.orientation``, e.g. ``"RAS"``): the voxel axes are
   permuted and flipped (no interpolation) so that the first runs to the
   Right, the second to the Anterior, the third to the Superior, whatever
   order the scanner stored them in. Networks that learn anatomy see it the
   same way up in every volume. ``""`` keeps each file's own order.
2. **Spacing** (``data.spacing``): resampled to that isotropic voxel size
   (``data.resample_spacing``); ``0`` keeps it.

``Working.restore`` takes an array on the working grid back to the input's
grid (the spacing undone by trilinear resizing, then the axes put back), so a
translation is written with the input's shape, affine and header.
"""
from __future__ import annotations

import dataclasses

import nibabel.orientations as nio
import numpy as np

from megan_jax import resample
from megan_jax.errors import InputError
from megan_jax.io import Volume

_PAIRS = ("LR", "PA", "IS")


def check_orientation(codes) -> str:
  """``codes`` normalised ("ras" → "RAS"; "" or "none" → ""), or an
  ``InputError`` unless it names each of the three axis pairs once."""
  codes = str(codes or "").strip().upper()
  if codes in ("", "NONE"):
    return ""
  if len(codes) != 3 or sorted(
      next((i for i, p in enumerate(_PAIRS) if c in p), 9) for c in codes
  ) != [0, 1, 2]:
    raise InputError(
        f"config data.orientation {codes!r}: expected three letters, one of "
        "each of L/R, A/P, S/I (e.g. RAS or LPS), or '' to keep each file's "
        "voxel order")
  return codes


def orientation_transform(affine, codes: str) -> np.ndarray | None:
  """The nibabel ``ornt`` transform from ``affine``'s voxel order to
  ``codes``, or None when the axes already run that way (or ``codes`` is "").
  Oblique affines go to the closest orientation (nibabel's
  ``io_orientation``)."""
  codes = check_orientation(codes)
  if not codes:
    return None
  start = nio.io_orientation(np.asarray(affine))
  t = nio.ornt_transform(start, nio.axcodes2ornt(tuple(codes)))
  if (t == [[0, 1], [1, 1], [2, 1]]).all():
    return None
  return t


def reorient(vol: Volume, codes: str) -> tuple[Volume, np.ndarray | None]:
  """``vol`` with its voxel axes in the order ``codes`` names (affine updated
  so every voxel keeps its world position), and the transform applied (None,
  and ``vol`` itself, when nothing moves)."""
  t = orientation_transform(vol.affine, codes)
  if t is None:
    return vol, None
  data = np.ascontiguousarray(nio.apply_orientation(vol.data, t))
  affine = vol.affine @ nio.inv_ornt_aff(t, vol.data.shape)
  return Volume(data, affine, None, vol.path), t


@dataclasses.dataclass(frozen=True)
class Working:
  """A volume (and its optional label) on the working grid, and how to go
  back to the input's grid."""
  volume: Volume
  label: np.ndarray | None
  oriented_shape: tuple[int, int, int]
  transform: np.ndarray | None  # ornt from the input's axes, None = same

  def restore(self, y: np.ndarray) -> np.ndarray:
    """An array on the working grid → on the input's grid."""
    y = np.asarray(y)
    if y.shape != self.volume.data.shape:  # resized silently before
      raise ValueError(f"restore: expected an array on the working grid, "
                       f"{tuple(self.volume.data.shape)}; got {y.shape}")
    if y.shape != self.oriented_shape:
      y = np.asarray(resample.resize(y, self.oriented_shape, "linear"))
    if self.transform is not None:
      y = np.ascontiguousarray(
          nio.apply_orientation(y, invert_transform(self.transform)))
    return y


def invert_transform(t: np.ndarray) -> np.ndarray:
  """The ``ornt`` transform that undoes ``t`` (``t[i]`` = [new axis of input
  axis i, ±1])."""
  inv = np.empty_like(np.asarray(t, float))
  for i, (j, flip) in enumerate(np.asarray(t)):
    inv[int(j)] = [i, flip]
  return inv


def working_shape(config, vol: Volume | tuple) -> tuple[int, int, int]:
  """The shape the cascade runs at for ``vol`` (nothing resampled), a
  ``Volume`` or its ``(shape, affine)`` (``io.nifti_geometry``)."""
  from megan_jax import data
  shape, affine = ((vol.data.shape, vol.affine) if isinstance(vol, Volume)
                   else vol)
  shape = tuple(int(n) for n in shape)
  t = orientation_transform(affine, config.data.orientation)
  if t is not None:
    affine = affine @ nio.inv_ornt_aff(t, shape)
    shape = tuple(shape[int(i)] for i in np.argsort(t[:, 0]))
  if config.data.spacing:
    shape = data.spacing_shape(shape, affine, config.data.spacing)
  return check_size(tuple(int(n) for n in shape), config)


def check_size(shape, config) -> tuple[int, int, int]:
  """``shape`` (the working grid's) if the cascade can run on it: every
  scale at least 2 voxels per axis, and scale 0 (``ceil(shape / 2**n)``)
  within ``lr_size`` (checked before resampling to it: a tiny spacing
  would otherwise allocate terabytes first)."""
  n = int(config.get("num_hr_scales", 0))  # a data-only config: 0
  need = 2 ** n + 1
  at = f" at {config.data.spacing:g} mm" if config.data.spacing else ""
  if min(shape) < need:
    raise InputError(
        f"its working grid{at} is {'x'.join(map(str, shape))} voxels; "
        f"{n} HR scale(s) need at least {need} per axis")
  if config.get("lr_size"):
    try:
      from megan_jax import state as state_lib
      resample.check_lr_size(
          resample.scale_shapes(shape, n)[0], config.lr_size,
          state_lib.lr_size_multiple(config) if "model" in config else 1)
    except InputError as e:
      raise InputError(f"its working grid{at} is "
                       f"{'x'.join(map(str, shape))} voxels: {e}") from None
  return tuple(shape)


def to_working(vol: Volume, config, label: np.ndarray | None = None
               ) -> Working:
  """``vol`` (and ``label``, a mask on ``vol``'s grid) on the working grid
  of ``config``: reoriented to ``data.orientation``, then resampled to
  ``data.spacing``. The label follows (the same axis moves, then trilinear
  resizing > 0.5)."""
  from megan_jax import data
  if label is not None and label.shape != vol.data.shape:
    raise InputError(
        f"mask: shape {'x'.join(map(str, label.shape))} differs from the "
        f"input's {'x'.join(map(str, vol.data.shape))}")
  work, t = reorient(vol, config.data.orientation)
  if t is not None and label is not None:
    label = np.ascontiguousarray(nio.apply_orientation(label, t))
  oriented = tuple(int(n) for n in work.data.shape)
  if config.data.spacing:
    check_size(data.spacing_shape(oriented, work.affine, config.data.spacing),
               config)  # before resampling to it
    work = data.resample_spacing(work, config.data.spacing)
    if label is not None and label.shape != work.data.shape:
      label = np.asarray(resample.resize(
          label.astype(np.float32), work.data.shape)) > 0.5
  check_size(work.data.shape, config)
  return Working(work, label, oriented, t)
