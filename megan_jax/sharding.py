"""Explicit placement: a 1-D device mesh with a "data" axis.

Batches (of volumes in training, of patches in inference) are split over the
"data" axis; parameters are replicated. ``jax.jit`` then runs each device on
its slice (the current JAX way to write what ``pmap`` did). Inference's patch
batch is a multiple of the device count, and its last batch is filled up by
repeating the last patch (the repeats are dropped), so every device gets an
equal slice; a training batch that does not divide evenly is replicated
(``shard_batch``).

Several processes (multi-host): ``initialize_distributed`` joins the job,
after which ``jax.devices()`` (and so ``make_mesh()``) spans every process. A
host array cannot be ``device_put`` onto other processes' devices, so
``global_batch`` and ``global_replicate`` build global arrays with each
process filling only its own devices; ``broadcast_from_0`` sends process 0's
host values (e.g. what it read from disk) to the others.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from megan_jax.errors import InputError

DATA = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over ``devices`` (default: every device of every process;
  one ``jax.Device`` stands for a list of it)."""
  devices = as_devices(devices)
  return Mesh(np.array(jax.devices() if devices is None else devices),
              (DATA,))


def as_devices(devices) -> list[jax.Device] | None:
  """``devices`` as a list of ``jax.Device`` (None stays None: all of
  them); anything else, or an empty list, is an ``InputError``."""
  if devices is None:
    return None
  if isinstance(devices, jax.Device):
    return [devices]
  if isinstance(devices, (str, bytes)) or not hasattr(devices, "__iter__"):
    raise InputError(f"devices: a list of jax.Device (from jax.devices()), "
                     f"got {type(devices).__name__} {devices!r}")
  devices = list(devices)
  wrong = [d for d in devices if not isinstance(d, jax.Device)]
  if wrong:
    raise InputError(f"devices: a list of jax.Device (from jax.devices()), "
                     f"got {type(wrong[0]).__name__} {wrong[0]!r} in it")
  if not devices:
    raise InputError("devices: an empty list (give None for all devices)")
  twice = [d for i, d in enumerate(devices) if d in devices[:i]]
  if twice:  # a mesh of [d0, d0] failed later, inside JAX's device_put
    raise InputError(f"devices: {twice[0]} is listed twice")
  return devices


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


# ---------------------------------------------------------------------------
# Several processes (multi-host)
# ---------------------------------------------------------------------------
# ``initialize_distributed`` reads these when it is given no arguments and no
# cluster is detected (a hand-started job; the local launcher passes all three
# as arguments instead).
ENV_REQUEST = "MEGAN_DISTRIBUTED"
ENV_COORDINATOR = "MEGAN_COORDINATOR"
ENV_NUM_PROCESSES = "MEGAN_NUM_PROCESSES"
ENV_PROCESS_ID = "MEGAN_PROCESS_ID"

BROADCAST_CHUNK_BYTES = 1 << 26  # bounds the device memory of a broadcast


def distributed_requested(environ=None) -> bool:
  """Whether the environment asks for a multi-process run
  (``MEGAN_DISTRIBUTED=1``)."""
  environ = os.environ if environ is None else environ
  return environ.get(ENV_REQUEST, "").strip().lower() in ("1", "true", "yes")


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None, *,
                           local_device_ids: Sequence[int] | None = None,
                           timeout_s: int = 300) -> tuple[int, int]:
  """Joins this process to a multi-process JAX job (``jax.distributed``).

  Must run before anything touches a device. Without arguments JAX detects
  the cluster (SLURM: one process per task, the coordinator on the first
  node; also Open MPI, ...); outside a cluster the ``MEGAN_COORDINATOR``
  (``host:port``), ``MEGAN_NUM_PROCESSES`` and ``MEGAN_PROCESS_ID``
  environment variables are used. Afterwards ``jax.devices()`` lists every
  process's devices, and a ``Translator`` spreads its patches over all of
  them. Calling it again is a no-op.

  Args:
    coordinator_address: ``host:port`` of process 0's coordinator service.
    num_processes: processes in the job.
    process_id: this process's index, ``0 <= process_id < num_processes``.
    local_device_ids: the GPUs this process uses (default: all it sees, or
      the cluster's assignment).
    timeout_s: how long to wait for every process to join.

  Returns:
    ``(jax.process_index(), jax.process_count())``.
  """
  if jax.distributed.is_initialized():
    return jax.process_index(), jax.process_count()
  env = os.environ
  coordinator_address = coordinator_address or env.get(ENV_COORDINATOR)
  def env_int(name, low):
    try:
      value = int(env[name])
    except ValueError:
      value = None
    if value is None or value < low:
      raise InputError(f"{name}={env[name]!r}: expected an integer >= {low}")
    return value
  if num_processes is None and env.get(ENV_NUM_PROCESSES):
    num_processes = env_int(ENV_NUM_PROCESSES, 1)
  if process_id is None and env.get(ENV_PROCESS_ID):
    process_id = env_int(ENV_PROCESS_ID, 0)
  # Collectives between CPU devices of different processes need a transport;
  # gloo is jax 0.10's default, set explicitly because older releases
  # defaulted to none (the first cross-process step then fails). GPUs use
  # NCCL whatever this says.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               local_device_ids=local_device_ids,
                               initialization_timeout=timeout_s)
  except ValueError as e:  # nothing detected and nothing given
    raise InputError(
        f"distributed: {e}; outside a cluster (SLURM, Open MPI, ...) set "
        f"{ENV_COORDINATOR}=host:port, {ENV_NUM_PROCESSES} and "
        f"{ENV_PROCESS_ID}") from None
  return jax.process_index(), jax.process_count()


def is_local(mesh: Mesh) -> bool:
  """Whether this process owns every device of ``mesh`` (always so in a
  single-process run)."""
  me = jax.process_index()
  return all(d.process_index == me for d in mesh.devices.flat)


def global_replicate(tree, mesh: Mesh):
  """``replicate`` for a mesh over several processes: every process passes
  the same host values and fills its own devices (``jax.device_put`` would
  compare the values across processes, one collective per leaf)."""
  rep = replicated(mesh)
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, rep, lambda idx: x[idx])
  return jax.tree.map(put, tree)


def global_batch(shape: Sequence[int], mesh: Mesh,
                 rows: Callable[[np.ndarray], np.ndarray], indices: np.ndarray):
  """A batch split over the mesh's "data" axis, built from host data by each
  process for its own devices only.

  Args:
    shape: the global batch shape; ``shape[0] == len(indices)``, a multiple
      of the mesh size.
    mesh: a 1-D mesh, possibly over several processes.
    rows: ``rows(ids)`` returns the batch items for ``ids``, a slice of
      ``indices`` (here: patch numbers), as an array ``[len(ids), ...]``.
    indices: what the batch's items are.

  Returns:
    A ``jax.Array`` sharded like ``batch_sharded(mesh)``.
  """
  return jax.make_array_from_callback(
      tuple(shape), batch_sharded(mesh), lambda idx: rows(indices[idx[0]]))


def local_value(x) -> np.ndarray:
  """The host value of a replicated array (whichever processes it spans)."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(x.addressable_data(0))


def broadcast_from_0(x, chunk_bytes: int = BROADCAST_CHUNK_BYTES) -> np.ndarray:
  """Process 0's ``x`` on every process (others pass an array of the same
  shape and dtype, whose values are ignored).

  A large array (a resumed scale's volume) goes in slabs along its first axis,
  so the broadcast never needs more than ``chunk_bytes`` per device. Values
  arrive exactly (the others contribute zeros to a sum; so a -0.0 arrives as
  0.0).
  """
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x
  from jax.experimental import multihost_utils
  if x.ndim == 0 or x.nbytes <= chunk_bytes:
    return np.array(multihost_utils.broadcast_one_to_all(x))  # writable
  step = max(1, chunk_bytes // max(1, x[0].nbytes))
  return np.concatenate([
      np.asarray(multihost_utils.broadcast_one_to_all(x[i:i + step]))
      for i in range(0, x.shape[0], step)])


def assert_same_on_all(x, what: str) -> None:
  """Raises ``InputError`` naming ``what`` unless every process has the same
  ``x`` (e.g. the same checkpoints)."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils
  x = np.asarray(x)
  every = np.asarray(multihost_utils.process_allgather(x))
  if not (every == x[None]).all():
    error = InputError(f"{what}: differs between the processes of this job "
                       "(each must read the same files)")
    error.agreed = True  # every process sees the same values
    raise error


def assert_same_parts(parts: dict, what: str) -> None:
  """Raises an ``InputError`` (``agreed``) naming the ``parts`` whose
  values differ between the processes (each value: a string, compared by
  its SHA-256). Every process of the job must call it with the same keys;
  one process: nothing is compared."""
  if jax.process_count() == 1:
    return
  names = list(parts)
  digests = np.stack([np.frombuffer(hashlib.sha256(
      str(parts[n]).encode()).digest()[:16], np.uint8) for n in names])
  every = process_values(digests)  # [processes, parts, 16]
  differ = [n for i, n in enumerate(names)
            if not (every[:, i] == digests[i][None]).all()]
  if differ:
    error = InputError(f"{what}: not the same on every process of this "
                       f"job: {'; '.join(differ)} (each must read the same "
                       "files and be given the same arguments)")
    error.agreed = True
    raise error


def agree(error: BaseException | None, what: str) -> None:
  """Makes a failure on some processes a failure on all, so that none goes
  on to wait in a collective for one that left: every process calls it with
  the error it met (or None); where there was one it is raised, elsewhere an
  ``InputError`` saying ``what`` failed on which process. Either is marked
  ``agreed`` (``is_agreed``): every process knows, so a caller may go on
  (to the next input) or exit normally. One process: raises ``error``."""
  failed = np.flatnonzero(process_values(np.int32(error is not None)))
  if error is None and failed.size:
    error = InputError(f"{what}: failed on process "
                       f"{', '.join(map(str, failed))} (see its message)")
  if error is not None:
    with contextlib.suppress(AttributeError):  # exceptions with __slots__
      error.agreed = True
    raise error


def is_multiprocess() -> bool:
  """Whether this process is one of several of a ``jax.distributed`` job
  (without starting a backend where it has joined none)."""
  return jax.distributed.is_initialized() and jax.process_count() > 1


def is_agreed(error: BaseException) -> bool:
  """Whether every process of the job met ``error`` together (``agree``);
  in a single-process job, always."""
  return not is_multiprocess() or getattr(error, "agreed", False)


def process_values(x) -> np.ndarray:
  """Every process's ``x`` (same shape and dtype on each), stacked:
  ``[process_count, *x.shape]``; ``x[None]`` in a single-process job."""
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x[None]
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x)).reshape(
      (jax.process_count(),) + x.shape)
