"""SIGTERM/SIGINT in the first seconds of a run, while it is still importing jax and the rest.

`python -m clusterstm_jax.train` calls `install_early()` before its heavy imports: a signal then
is recorded here instead of raising inside whatever import is running (a library's bare
`except` once swallowed such a KeyboardInterrupt and the run went on to the end).
resilience.Preemption adopts a recorded signal when it takes over, so the run stops at its
first step boundary after saving and exits 75, like a signal that comes later. A second signal
before that exits at once (128 + signal number; nothing has been written yet).
No imports beyond the standard library: this must be cheap to import first.
"""
from __future__ import annotations

import os
import signal

PENDING: list[str] = []  # names of the signals recorded before resilience.Preemption took over


def _record(signum, frame):
  del frame
  name = signal.Signals(signum).name
  if PENDING:
    os._exit(128 + signum)  # a second signal during start-up: stop now (nothing to save yet)
  PENDING.append(name)
  os.write(2, f'\n{name} received while starting: the run stops at its first step boundary '
              'after saving (send it again to stop at once)\n'.encode())


def install_early() -> None:
  """Records SIGTERM/SIGINT from now on (main thread only; a no-op elsewhere)."""
  try:
    for signum in (signal.SIGTERM, signal.SIGINT):
      signal.signal(signum, _record)
  except ValueError:  # not the main thread (an embedding program): leave its handlers alone
    pass
