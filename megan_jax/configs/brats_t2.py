"""Brain MRI as in the paper's BRATS experiments: 155×240×240, LR 64 + 2 HR."""
from megan_jax.configs import default


# The ``arg``s get_config takes: none (``--config NAME:ARG`` is refused).
VARIANTS = ()


def get_config(arg=None):
  c = default.get_config()
  c.name = "brats_t2"
  c.data.path = ""  # a folder of T2 volumes: --config.data.path=/data/brats/t2
  c.num_hr_scales = 2  # 39x60x60 -> 78x120x120 -> 155x240x240
  c.edges.use_label = True  # tumour masks written onto the sketch
  c.data.label_suffix = "_seg"
  return c
