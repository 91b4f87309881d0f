"""See megan_jax/configs/default.py (configs live in the package so an installed
`megan` finds them)."""
from megan_jax.configs.default import VARIANTS, get_config  # noqa: F401
