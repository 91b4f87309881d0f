"""Synthetic volumes the tests share (``import synthetic``: pytest puts this
folder on ``sys.path``)."""
import numpy as np


def blob(shape=(30, 37, 26), seed=0, centre_shift=(0.0, 0.0, 0.0)):
  """A noisy two-level ellipsoid filling ``shape`` (intensities 0..~290):
  bright shell, brighter core, N(0, 3) noise, clipped at 0. ``centre_shift``
  moves the centre by that fraction of each half-axis (an asymmetric volume,
  so a flip or permutation changes it)."""
  rng = np.random.default_rng(seed)
  z, y, x = np.indices(shape)
  c = np.array(shape) / 2
  o = c * (1.0 + np.asarray(centre_shift))
  r = np.sqrt(((z - o[0]) / c[0]) ** 2 + ((y - o[1]) / c[1]) ** 2
              + ((x - o[2]) / c[2]) ** 2)
  vol = 200.0 * (r < 0.8) + 80.0 * (r < 0.4) + rng.normal(0, 3, shape)
  return np.clip(vol, 0, None).astype(np.float32)
