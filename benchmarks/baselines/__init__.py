"""3D GAN baselines for the memory benchmark (the paper's Fig. 4).

Each baseline is a generator/discriminator pair in Flax (channels-last
``[B, D, H, W, C]``) built from ``megan_jax.models.layers``, plus one shared
pix2pix-style training step (`common.make_train_step`) so that every model,
MEGAN included, is measured doing the same work: G forward, D forward and
backward on real and fake, D's Adam update, G's loss through D, G backward,
G's Adam update.

- `dcgan`: noise -> volume (conv-transpose G, strided-conv D).
- `pix2pix`: volume -> volume (U-Net G, PatchGAN D).
- `pggan`: the PGGAN networks at their final resolution (no growing).

`build(name, size, ...)` returns a `common.Baseline` for any of them.
"""
from benchmarks.baselines.common import (Baseline, abstract_batch,
                                         abstract_state, make_train_step,
                                         scaled)

NAMES = ("dcgan", "pix2pix", "pggan")


def build(name: str, size: int, *, width_scale: float = 1.0,
          impl: str = "plain") -> Baseline:
  """The baseline ``name`` producing/translating ``size``³ volumes.

  Args:
    name: one of `NAMES`.
    size: the volume side length (a power of two, >= 8; >= 16 for pix2pix).
    width_scale: multiplies every channel count (tests use tiny widths).
    impl: ``"plain"`` or ``"fast"`` convolutions (``megan_jax.models.layers``).

  Returns:
    A `Baseline`.
  """
  if name == "dcgan":
    from benchmarks.baselines import dcgan
    return dcgan.build(size, width_scale=width_scale, impl=impl)
  if name == "pix2pix":
    from benchmarks.baselines import pix2pix
    return pix2pix.build(size, width_scale=width_scale, impl=impl)
  if name == "pggan":
    from benchmarks.baselines import pggan
    return pggan.build(size, width_scale=width_scale, impl=impl)
  raise ValueError(f"baseline {name!r}: choose one of {', '.join(NAMES)}")


__all__ = ["Baseline", "NAMES", "abstract_batch", "abstract_state", "build",
           "make_train_step", "scaled"]
