"""Host-side thread pools for the numpy / scipy work that releases the GIL
(the patch cut and stitch, the edge filters)."""
import concurrent.futures
import functools

import numpy as np


@functools.lru_cache(maxsize=None)
def pool(workers: int, kind: str) -> concurrent.futures.ThreadPoolExecutor:
  """``workers`` threads for one ``kind`` of work. Kinds get separate pools,
  so work of one kind may wait on work of another without a deadlock."""
  return concurrent.futures.ThreadPoolExecutor(
      workers, thread_name_prefix=f"megan-{kind}")


def in_parts(fn, count: int, parts: int, kind: str) -> None:
  """Calls ``fn(lo, hi)`` on ``parts`` contiguous parts of ``range(count)``:
  one on this thread, the others on `pool` ``kind``. Returns when all are
  done; the first exception (this thread's first) is raised."""
  parts = max(1, min(parts, count))
  if parts == 1:
    fn(0, count)
    return
  bounds = np.linspace(0, count, parts + 1).astype(int).tolist()
  futures = [pool(parts - 1, kind).submit(fn, lo, hi)
             for lo, hi in zip(bounds[1:-1], bounds[2:])]
  try:
    fn(bounds[0], bounds[1])
  finally:
    for f in futures:
      f.result()
