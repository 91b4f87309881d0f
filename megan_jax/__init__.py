"""megan_jax: memory-efficient multi-scale GANs for full-resolution 3D domain translation."""
__version__ = "0.1.0"


def load(workdir, *, devices=None, batch_size=None, dtype="float32",
         which="best"):
  """A translator of a trained run: ``megan_jax.load(run).translate(x)``.

  ``x`` may be a path, a nibabel image or a numpy array; see
  ``megan_jax.infer.Translator.translate``. ``which``: the ``"best"``
  generators (lowest validation L1) or the ``"latest"``; the other
  arguments as ``megan_jax.infer.load``.
  """
  from megan_jax import infer
  return infer.load(workdir, devices=devices, batch_size=batch_size,
                    dtype=dtype, which=which)
