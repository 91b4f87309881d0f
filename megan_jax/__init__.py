"""megan_jax: memory-efficient multi-scale GANs for full-resolution 3D domain translation."""
__version__ = "0.1.0"
