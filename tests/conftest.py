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
# Commands run in subprocesses share it (and leave ~/.cache alone).
os.environ.setdefault("MEGAN_COMPILE_CACHE", _cache)


import pytest  # noqa: E402


def make_random_run(workdir: str, spec: str = "demo:smoke") -> str:
  """A run folder with random-initialised checkpoints of every scale: what
  inference needs, without the minutes of training."""
  from megan_jax import configs
  from megan_jax import state as state_lib
  config = configs.get_config(spec)
  state_lib.save_config(workdir, config)
  state_lib.save_intensity(workdir, (0.0, 255.0))
  for i, name in enumerate(state_lib.scale_names(config)):
    kind = "lr" if name == "lr" else "hr"
    st = state_lib.create_state(jax.random.key(i), config, kind)
    ck = state_lib.Checkpoints(workdir, name)
    ck.save_latest(0, st)
    ck.wait()
    ck.close()
  return workdir


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
  """One random-initialised ``demo:smoke`` run shared by the tests."""
  return make_random_run(str(tmp_path_factory.mktemp("run")))
