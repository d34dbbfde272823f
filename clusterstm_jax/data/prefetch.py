"""Overlapping the input pipeline with the step: a checkpointable prefetching iterator, and the
number of grain worker processes a host's cores allow.

`Prefetch` runs a grain iterator `depth` batches ahead in a background thread and puts each
batch on the devices there (the host-to-device copy overlaps the step too). It records the
wrapped iterator's state after every batch it makes and hands out, with each batch, the state
after it: `get_state()` is the position of the last batch the loop took, never of the batches
still queued, so a checkpoint saved at step s resumes at batch s + 1 exactly (orbax's grain
handler calls get_state/set_state with bytes, as on grain's own iterator). The batches come out
in the wrapped iterator's order: prefetching changes when a batch is made, not which.
"""
from __future__ import annotations

import os
import queue
import threading
from typing import Any, Callable

_END = object()


def host_cores() -> int:
  """CPU cores this process may run on (the affinity mask; os.cpu_count() where unknown)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def auto_worker_count(cores: int | None = None, *, reserved: int = 2, cap: int = 32) -> int:
  """grain worker processes for `cores` host cores: all but `reserved` (the training process's
  Python thread, the prefetch thread and the runtime's own), at most `cap`; 0 (decoding in the
  prefetch thread) on hosts with `reserved` cores or fewer."""
  cores = host_cores() if cores is None else cores
  return max(0, min(cap, cores - reserved))


def resolve_worker_count(worker_count: int) -> int:
  """config.data.worker_count: -1 = auto_worker_count(), else the count itself."""
  return auto_worker_count() if worker_count == -1 else worker_count


class Prefetch:
  """`depth` batches of `iterator` made ahead in a thread, each passed through `put` there
  (e.g. onto the mesh). depth 0: made on demand in the caller's thread (no thread at all).

  An error in the thread is raised by the next() that would have returned its batch. The
  thread starts at the first next(): set_state() before it (a restore) costs nothing.
  """

  def __init__(self, iterator, put: Callable[[Any], Any] = lambda b: b, depth: int = 2):
    if depth < 0:
      raise ValueError(f'prefetch depth must be >= 0, got {depth}')
    self._it, self._put, self._depth = iterator, put, depth
    self._state = None  # bytes after the last batch handed out; None = the iterator's own
    self._queue: queue.Queue | None = None
    self._thread: threading.Thread | None = None
    self._stop = threading.Event()

  @property
  def depth(self) -> int:
    return self._depth

  def __iter__(self):
    return self

  def __next__(self):
    if self._depth == 0:
      batch = next(self._it)
      self._state = None
      return self._put(batch)
    if self._thread is None:
      self._start()
    item = self._queue.get()
    if item is _END:
      self._queue.put(_END)  # every later next() stops too
      raise StopIteration
    if isinstance(item, BaseException):
      raise item
    batch, self._state = item
    return batch

  def _start(self):
    if self._state is None:  # the position before the first batch the thread makes
      self._state = self._it.get_state()
    self._stop.clear()
    self._queue = queue.Queue(maxsize=self._depth)
    self._thread = threading.Thread(target=self._fill, name='prefetch', daemon=True)
    self._thread.start()

  def _offer(self, item) -> bool:
    """Queues `item` unless stopped; False once stopped."""
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _fill(self):
    try:
      while not self._stop.is_set():
        try:
          batch = next(self._it)
        except StopIteration:
          self._offer(_END)
          return
        if not self._offer((self._put(batch), self._it.get_state())):
          return
    except BaseException as e:  # pylint: disable=broad-except  # re-raised by next()
      self._offer(e)

  def close(self) -> None:
    """Stops the thread and drops its queued batches: the wrapped iterator goes back to the
    last batch handed out, so a next() after close() makes the same batch as without it."""
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread, self._queue = None, None
      self._it.set_state(self._state)
      self._state = None

  def get_state(self) -> bytes:
    return self._it.get_state() if self._state is None else self._state

  def start_prefetch(self) -> None:
    """What orbax's grain handler calls after a restore: grain starts its worker processes."""
    if hasattr(self._it, 'start_prefetch'):
      self._it.start_prefetch()

  def set_state(self, state: bytes) -> None:
    """Drops the queued batches and moves the wrapped iterator to `state`."""
    self.close()
    self._it.set_state(state)
    self._state = None
