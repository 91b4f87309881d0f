"""See megan_jax/configs/brats_t2.py (configs live in the package so an installed
`megan` finds them)."""
from megan_jax.configs.brats_t2 import VARIANTS, get_config  # noqa: F401
