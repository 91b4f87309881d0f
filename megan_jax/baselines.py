"""The paper's baselines (Table 1), on the same data and step budget as MEGAN.

* **patch-wise GAN** (`PatchGan`): the HR generator trained on
  full-resolution patches from the edges alone (no previous scale:
  ``hr_condition="none"``), tiled and stitched exactly as MEGAN's scales
  (valid centres, no blending). Without the coarse context every patch
  guesses its grey values on its own: seams and inconsistent contrast.
* **small GAN + upsampling** (`upsample_lr`): MEGAN's own scale-0 output
  (the whole volume at the LR size) trilinearly upsampled to full size:
  consistent but blurred.
* **non-local means** (`nlm`) of the input, with its run time.
* the input as is.
"""
from __future__ import annotations

import copy
import time

import jax
import jax.numpy as jnp
import numpy as np

from megan_jax import edges as edges_lib
from megan_jax import resample, sharding
from megan_jax import state as state_lib
from megan_jax import tiling
from megan_jax.errors import InputError
from megan_jax.normalise import Normaliser, fit_normaliser


def patch_gan_config(config):
  """``config`` for the patch-wise GAN: the finest HR scale's generator sees
  the edges only."""
  c = copy.deepcopy(config)
  c.hr_condition = "none"
  if "hr_residual" in c.model:  # nothing to add the output to
    c.model.hr_residual = False
  c.name = f"{config.get('name', 'run')}-patch-gan"
  return c


def train_patch_gan(config, workdir: str, *, progress: bool = True):
  """Trains the patch-wise GAN of ``config``'s data in ``workdir``: only the
  finest scale (full resolution), ``config.steps`` steps, edges only.
  Resumes like any run. Returns the final ``GanState``."""
  from megan_jax import train
  c = patch_gan_config(config)
  states = train.train(c, workdir, scales=str(c.num_hr_scales),
                       progress=progress)
  return states[f"hr{c.num_hr_scales}"]


class PatchGan:
  """Full-resolution patch-wise translation from edges alone.

  Args:
    config: the patch GAN's config (``hr_condition="none"``).
    g_params: the finest scale's generator variables.
    intensity: the target domain's ``(lo, hi)`` (``state.load_intensity``).
    batch_size: patches per generator call (default ``config.infer.batch_size``).
  """

  def __init__(self, config, g_params, *, intensity=None,
               batch_size: int | None = None):
    if config.hr_condition != "none":
      raise InputError(f"PatchGan: config hr_condition="
                       f"{config.hr_condition!r}, expected 'none'")
    self.config = config
    self.mesh = sharding.make_mesh()
    n_dev = self.mesh.devices.size
    bs = int(batch_size or config.infer.batch_size)
    self.batch_size = -(-bs // n_dev) * n_dev
    self.intensity = Normaliser(*(intensity or (0.0, 1.0)))
    self.params = sharding.replicate(g_params, self.mesh)
    g = state_lib.build_generator(config, "hr")
    self._fn = jax.jit(lambda params, x: g.apply(params, x, train=False)
                       .astype(jnp.float32))
    self.timings: dict[str, float] = {}
    self.plan: tiling.Plan | None = None

  @classmethod
  def load(cls, workdir: str, which: str = "best", **kwargs) -> "PatchGan":
    """The patch GAN trained in ``workdir`` (``train_patch_gan``)."""
    config = state_lib.load_config(workdir)
    name = f"hr{config.num_hr_scales}"
    try:
      gens = state_lib.restore_generators(workdir, which, scales=[name])[1]
    except InputError:
      raise InputError(
          f"workdir {workdir}: no checkpoint of scale {name}") from None
    return cls(config, gens[name][1],
               intensity=state_lib.load_intensity(workdir), **kwargs)

  def translate_normalised(self, image: np.ndarray) -> np.ndarray:
    """``[D, H, W]`` in [-1, 1] -> the translated volume in [-1, 1]."""
    c = self.config
    t0 = time.perf_counter()
    sketch = edges_lib.canny_3d(image, sigma=c.edges.sigma,
                                low_threshold=c.edges.low,
                                high_threshold=c.edges.high)
    self.timings = {"edges": time.perf_counter() - t0}
    t0 = time.perf_counter()
    plan = tiling.make_plan(image.shape, c.patch_size, c.border)
    out = np.zeros(image.shape, np.float32)
    batched = sharding.batch_sharded(self.mesh)
    B = self.batch_size
    for start in range(0, plan.num_patches, B):
      idx = np.arange(start, min(start + B, plan.num_patches))
      full = np.concatenate([idx, np.full(B - len(idx), idx[-1])])
      x = tiling.extract_batch(sketch, plan, full, pad_value=0.0)[..., None]
      gen = self._fn(self.params, jax.device_put(x, batched))
      tiling.stitch_into(out, np.asarray(gen)[: len(idx), ..., 0], plan, idx)
    self.timings["patches"] = time.perf_counter() - t0
    self.plan = plan
    return out

  def translate(self, x) -> np.ndarray:
    """Scanner intensities -> target intensities: a ``Volume`` (brought to
    the run's working grid, ``grid.to_working``, and the result put back on
    its own), or an array taken to be on the working grid already."""
    from megan_jax import grid, io
    c = self.config
    work = grid.to_working(x, c) if isinstance(x, io.Volume) else None
    data = np.asarray(work.volume.data if work else x, np.float32)
    norm = fit_normaliser(data, percentiles=tuple(c.data.percentiles),
                          window=tuple(c.data.window) or None)
    y = self.translate_normalised(norm.normalise(data))
    if work is not None:
      y = work.restore(y)
    return self.intensity.denormalise(np.clip(y, -1.0, 1.0))


def upsample_lr(lr_output: np.ndarray, shape) -> np.ndarray:
  """The small-GAN baseline: a scale-0 output (unpadded, ``[-1, 1]``)
  trilinearly upsampled to the full ``shape``, one ×2 step per scale on the
  cascade's own grid (``resample.scale_shapes``), so it stays aligned for
  sizes that are not multiples of the factor."""
  k = 0
  while tuple(resample.scale_shapes(shape, k)[0]) != tuple(lr_output.shape):
    k += 1
    if k > 16:
      raise InputError(f"upsample_lr: {tuple(lr_output.shape)} is no scale "
                       f"of {tuple(shape)}")
  shapes = resample.scale_shapes(shape, k)
  y = np.asarray(lr_output, np.float32)
  for s in shapes[1:]:
    y = np.asarray(resample.upsample2(y, s))
  return np.clip(y, -1.0, 1.0)


def noise_sigma(image: np.ndarray) -> float:
  """A robust estimate of white-noise std: the median absolute first
  difference along every axis (×1.4826 for a Gaussian, ÷√2 for the
  difference), over pairs of voxels strictly inside the image's range:
  a skull-stripped or windowed image is mostly exactly its minimum (or
  maximum), and those noiseless pairs would make the median 0. Where edges
  are rare the median ignores them; where they are not (a skull-stripped
  brain at 1.5 mm) it overestimates (~3× on the paired `t1t2` source: see
  the README's Table 1). (scikit-image's ``estimate_sigma`` would need
  PyWavelets.)"""
  image = np.asarray(image, np.float32)
  lo, hi = float(image.min()), float(image.max())
  inside = (image > lo) & (image < hi)
  diffs, every = [], []
  for a in range(image.ndim):
    d = np.abs(np.diff(image, axis=a))
    head = [slice(None)] * image.ndim
    tail = [slice(None)] * image.ndim
    head[a], tail[a] = slice(1, None), slice(None, -1)
    diffs.append(d[inside[tuple(head)] & inside[tuple(tail)]])
    every.append(d.ravel())
  diffs = np.concatenate(diffs)
  if diffs.size == 0:  # nothing strictly inside: a binary image
    diffs = np.concatenate(every)
  return float(1.4826 * np.median(diffs) / np.sqrt(2.0))


def nlm(image: np.ndarray, *, patch_size: int = 5, patch_distance: int = 6,
        h_factor: float = 0.8) -> tuple[np.ndarray, float]:
  """Non-local means (``skimage.restoration.denoise_nl_means``, 3D, fast
  mode) of a volume scaled to [0, 1], ``h = h_factor · sigma`` with the
  noise level ``sigma`` from `noise_sigma`.

  Returns:
    ``(denoised, seconds)``.
  """
  from skimage.restoration import denoise_nl_means
  image = np.asarray(image, np.float32)
  t0 = time.perf_counter()
  sigma = noise_sigma(image)
  out = denoise_nl_means(image, patch_size=patch_size,
                         patch_distance=patch_distance, h=h_factor * sigma,
                         sigma=sigma, fast_mode=True)
  return out.astype(np.float32), time.perf_counter() - t0
