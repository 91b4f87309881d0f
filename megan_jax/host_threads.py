"""Host-side thread pools for the numpy / scipy work that releases the GIL
(the patch cut and stitch, the edge filters)."""
import concurrent.futures
import functools
import threading

import numpy as np


@functools.lru_cache(maxsize=None)
def pool(workers: int, kind: str) -> concurrent.futures.ThreadPoolExecutor:
  """``workers`` threads for one ``kind`` of work. Kinds get separate pools,
  so work of one kind may wait on work of another without a deadlock."""
  return concurrent.futures.ThreadPoolExecutor(
      workers, thread_name_prefix=_prefix(kind))


def _prefix(kind: str) -> str:
  return f"megan-{kind}_"  # ThreadPoolExecutor appends the thread number


def in_parts(fn, count: int, parts: int, kind: str) -> None:
  """Calls ``fn(lo, hi)`` on ``parts`` contiguous parts of ``range(count)``:
  one on this thread, the others on `pool` ``kind``. Returns when all are
  done; the first exception (this thread's first) is raised.

  Called from a worker of pool ``kind`` itself (``fn`` of a `map_patches`
  that runs another one), it runs every part on this thread: waiting on
  its own pool, whose workers may all be waiting likewise, could deadlock.
  """
  parts = max(1, min(parts, count))
  if threading.current_thread().name.startswith(_prefix(kind)):
    parts = 1
  if parts == 1:
    fn(0, count)
    return
  bounds = np.linspace(0, count, parts + 1).astype(int).tolist()
  futures = [pool(parts - 1, kind).submit(fn, lo, hi)
             for lo, hi in zip(bounds[1:-1], bounds[2:])]
  first = None
  try:
    fn(bounds[0], bounds[1])
  except BaseException as e:  # this thread's error goes first
    first = e
  for f in futures:  # every part is waited for, whatever failed
    try:
      f.result()
    except BaseException as e:
      first = first or e
  if first is not None:
    raise first
