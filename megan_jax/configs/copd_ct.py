"""Thorax CT as in the paper's COPD experiments: 512³, LR 64 + 3 HR scales."""
from megan_jax.configs import default


# The ``arg``s get_config takes: none (``--config NAME:ARG`` is refused).
VARIANTS = ()


def get_config(arg=None):
  c = default.get_config()
  c.name = "copd_ct"
  c.data.path = ""  # a folder of soft-kernel (B20f) CTs
  c.data.window = (-1024.0, 1024.0)  # Hounsfield units onto [-1, 1]
  c.data.foreground = -0.9
  c.num_hr_scales = 3  # 64 -> 128 -> 256 -> 512
  return c
