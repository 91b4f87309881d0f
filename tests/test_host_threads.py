"""Host thread pools: parts cover the range once, errors propagate, and a
worker that starts work of its own kind does not wait on its own pool."""
import threading

import numpy as np
import pytest

from megan_jax import host_threads


@pytest.mark.parametrize("count,parts", [(10, 3), (2, 5), (1, 1), (7, 7)])
def test_parts_cover_the_range_once(count, parts):
  hits = np.zeros(count, int)
  lock = threading.Lock()

  def fn(lo, hi):
    with lock:
      hits[lo:hi] += 1

  host_threads.in_parts(fn, count, parts, "test-cover")
  np.testing.assert_array_equal(hits, 1)


def test_worker_exception_propagates():
  def fn(lo, hi):
    if lo > 0:
      raise RuntimeError("worker failed")

  with pytest.raises(RuntimeError, match="worker failed"):
    host_threads.in_parts(fn, 4, 2, "test-error")


def test_this_threads_exception_goes_first_and_every_part_is_waited_for():
  # A worker's error was raised over this thread's (the docstring's order).
  finished = []

  def fn(lo, hi):
    if lo == 0:
      raise ValueError("this thread's part")
    threading.Event().wait(0.05)
    finished.append(lo)
    raise RuntimeError("a worker's part")

  with pytest.raises(ValueError, match="this thread's part"):
    host_threads.in_parts(fn, 4, 2, "test-error-order")
  assert finished == [2]  # waited for, though this thread failed first


def test_nested_same_kind_runs_inline_without_deadlock():
  # Two workers of pool "test-nest" (size 1) both start nested work of the
  # same kind. Waiting on the pool would hang: its only worker is busy
  # running the outer part. Inline, every inner part runs once.
  inner_threads = []
  lock = threading.Lock()

  def inner(lo, hi):
    with lock:
      inner_threads.append((threading.current_thread().name, lo, hi))

  def outer(lo, hi):
    host_threads.in_parts(inner, 4, 2, "test-nest")

  done = threading.Event()

  def run():
    host_threads.in_parts(outer, 2, 2, "test-nest")
    done.set()

  t = threading.Thread(target=run, daemon=True)
  t.start()
  assert done.wait(20), "nested in_parts of one kind deadlocked"
  # The pool worker ran its nested call inline, as one part (0, 4); the
  # caller's nested call split in two as usual.
  assert sorted((lo, hi) for _, lo, hi in inner_threads) == [(0, 2), (0, 4),
                                                             (2, 4)]
  assert any(n.startswith("megan-test-nest_") and (lo, hi) == (0, 4)
             for n, lo, hi in inner_threads)
