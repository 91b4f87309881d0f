"""Benchmarks of megan_jax (not part of the installed package).

``python -m benchmarks.memory``: device memory of one training step of MEGAN
and of 3D DCGAN / Pix2Pix / PGGAN baselines against the volume side length
(the paper's Fig. 4).
"""
