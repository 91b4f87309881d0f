"""Explicit placement: a 1-D device mesh with a "data" axis.

Batches (of volumes in training, of patches in inference) are split over the
"data" axis; parameters are replicated. ``jax.jit`` then runs each device on
its slice (the current JAX way to write what ``pmap`` did). A batch whose size
is not a multiple of the device count is padded and unpadded
(``pad_to_devices``), so every device gets an equal slice.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over ``devices`` (default: every device of every process)."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.array(devices), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def replicate(tree, mesh: Mesh):
  """Places every leaf of ``tree`` on all devices of ``mesh``."""
  return jax.device_put(tree, replicated(mesh))


def shard_batch(batch, mesh: Mesh):
  """Splits each leaf's leading axis over the mesh; a batch that does not
  divide evenly is replicated instead (training batches are small)."""
  n = mesh.devices.size
  def put(x):
    x = np.asarray(x)
    spec = batch_sharded(mesh) if x.shape[0] % n == 0 else replicated(mesh)
    return jax.device_put(x, spec)
  return jax.tree.map(put, batch)


def pad_to_devices(x: np.ndarray, n_devices: int) -> tuple[np.ndarray, int]:
  """Pads the leading axis to a multiple of ``n_devices`` (repeating the last
  item); returns ``(padded, original_length)``."""
  n = x.shape[0]
  extra = (-n) % n_devices
  if extra == 0:
    return x, n
  return np.concatenate([x, np.repeat(x[-1:], extra, axis=0)]), n
