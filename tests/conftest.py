"""Test-session settings: CPU, and one XLA compilation cache for the session.

Many tests compile the same small networks; the persistent cache (in a
temporary folder, fresh each session) turns the repeats into look-ups.
"""
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from hypothesis import settings  # noqa: E402

# The same examples on every run: CI must not turn red by chance.
settings.register_profile("megan", derandomize=True, deadline=None,
                          print_blob=True)
settings.load_profile("megan")

_cache = tempfile.mkdtemp(prefix="megan-jax-xla-cache-")
jax.config.update("jax_compilation_cache_dir", _cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
