"""Array aliases and the axis convention.

Volumes are ``[D, H, W]`` arrays in nibabel's voxel order (only ``io.py``
knows that it is nibabel's ``i, j, k``). Network tensors are channels-last:
``[B, D, H, W, C]``. Intensities are in [-1, 1] for the networks, background
-1; metrics use [0, 1].
"""
from typing import Any

import numpy as np

Array = Any  # a jax.Array or a numpy.ndarray
Shape3 = tuple[int, int, int]
PRNGKey = Any

BACKGROUND = -1.0  # network intensity of empty space; patches are padded with it


def as_shape3(shape) -> Shape3:
  """Returns ``shape`` as a tuple of three Python ints, or raises ValueError
  (sizes that are not whole numbers too: they were truncated)."""
  given = shape
  try:
    values = np.atleast_1d(np.asarray(shape))
    ok = (values.ndim == 1 and values.dtype.kind in "iuf"
          and bool(np.all(np.mod(values, 1) == 0)))
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(f"expected a 3D shape of positive whole sizes, got "
                     f"{given!r}")
  shape = tuple(int(s) for s in values)
  if len(shape) == 1:
    shape = shape * 3
  if len(shape) != 3 or min(shape) < 1:
    raise ValueError(f"expected a 3D shape of positive sizes, got {shape}")
  return shape
