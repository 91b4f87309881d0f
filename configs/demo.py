"""See megan_jax/configs/demo.py (configs live in the package so an installed
`megan` finds them)."""
from megan_jax.configs.demo import VARIANTS, get_config  # noqa: F401
