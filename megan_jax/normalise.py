"""Intensity scaling to the networks' [-1, 1] and back.

MRI has no absolute scale, so the default is robust percentile clipping
(``percentiles=(0, 99.5)``: the minimum, usually the background, maps to -1,
and a few bright outliers do not squash the rest). CT has one: a window in
Hounsfield units (``window=(-1024, 600)``, say) maps the same tissue to the same
value in every scan. Metrics use [0, 1] (``to_unit``).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from megan_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class Normaliser:
  """Maps intensities ``[lo, hi]`` linearly onto [-1, 1] (clipping outside)."""
  lo: float
  hi: float

  def __post_init__(self):
    if not np.isfinite([self.lo, self.hi]).all() or not self.hi > self.lo:
      raise InputError(f"intensity range [{self.lo:g}, {self.hi:g}] is empty "
                       "or not finite")

  def normalise(self, x):
    """Scanner intensities → [-1, 1] float32 (numpy or jax)."""
    scale = 2.0 / (self.hi - self.lo)
    y = (x - self.lo) * scale - 1.0
    return y.clip(-1.0, 1.0).astype(np.float32)

  def denormalise(self, y):
    """[-1, 1] → scanner intensities (the inverse inside the range)."""
    return ((y + 1.0) * (0.5 * (self.hi - self.lo)) + self.lo).astype(
        np.float32)

  def to_dict(self) -> dict:
    return {"lo": float(self.lo), "hi": float(self.hi)}


def fit_normaliser(volume: np.ndarray, *,
                   percentiles: tuple[float, float] = (0.0, 99.5),
                   window: tuple[float, float] | None = None,
                   path: str | None = None) -> Normaliser:
  """Chooses the intensity range of a volume.

  Args:
    volume: the 3D array.
    percentiles: lower and upper percentile clipped to -1 and 1 (ignored when
      ``window`` is given).
    window: a fixed (lo, hi) window, e.g. Hounsfield units for CT.
    path: named in the error message.

  Returns:
    A ``Normaliser``.
  """
  name = f"image {path}" if path else "image"
  vmin, vmax = float(np.min(volume)), float(np.max(volume))  # NaN spreads
  if not (np.isfinite(vmin) and np.isfinite(vmax)):
    raise InputError(f"{name}: has non-finite voxels (NaN or inf)")
  if window is not None:
    lo, hi = (float(w) for w in window)
    if hi > lo and (vmax <= lo or vmin >= hi):  # it would be one value
      raise InputError(
          f"{name}: no voxel inside the intensity window [{lo:g}, {hi:g}] "
          f"(its values span [{vmin:g}, {vmax:g}]); check data.window")
  else:
    p_lo, p_hi = percentiles
    if not 0 <= p_lo < p_hi <= 100:
      raise InputError(f"percentiles {percentiles}: need 0 <= low < high <= 100")
    lo, hi = (float(v) for v in np.percentile(volume, [p_lo, p_hi]))
    if hi <= lo:  # a mostly-constant volume: fall back to the full range
      lo, hi = vmin, vmax
  if not hi > lo:
    raise InputError(f"{name}: intensity range [{lo:g}, {hi:g}] is empty "
                     "(constant image)")
  return Normaliser(lo, hi)


def normalise(volume: np.ndarray, **kwargs) -> tuple[np.ndarray, Normaliser]:
  """Returns ``(volume in [-1, 1], the Normaliser that inverts it)``."""
  norm = fit_normaliser(volume, **kwargs)
  return norm.normalise(volume), norm


def to_unit(y):
  """[-1, 1] → [0, 1], the range metrics are computed on."""
  return (y + 1.0) * 0.5


def from_unit(u):
  """[0, 1] → [-1, 1]."""
  return u * 2.0 - 1.0
