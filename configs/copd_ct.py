"""See megan_jax/configs/copd_ct.py (configs live in the package so an installed
`megan` finds them)."""
from megan_jax.configs.copd_ct import VARIANTS, get_config  # noqa: F401
