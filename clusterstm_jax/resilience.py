"""What keeps a run's work safe: workdir checks and lock, preemption signals, the finite guard.

  check_workdir(path)    a workdir that is a file or cannot be written: one UserError line, before
                         anything is created;
  WorkdirLock(path)      `<workdir>/run.lock` (host, pid, process start time) while a run uses the
                         workdir: a second run there stops with an error naming the first; a lock
                         whose process is gone (same host) is stale and taken over;
  Preemption()           SIGTERM / SIGINT become a request, never an exception raised wherever
                         the program happens to be (an import, a dataset build, an Orbax save):
                         the step loop stops at the next step boundary after saving a checkpoint
                         there (a request during start-up: after the first step) and the run exits
                         with EXIT_PREEMPTED (75, EX_TEMPFAIL: launch/watch.sh relaunches). A
                         second signal stops at once without saving (KeyboardInterrupt).
  first_non_finite(...)  which of the steps since the last check had a non-finite metric (the
                         train step's on-device `finite` flag, fetched on log/checkpoint steps).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time

import jax
import numpy as np

from clusterstm_jax import interrupts
from clusterstm_jax.errors import Preempted, UserError


# ----------------------------------------------------------------------------- workdir
def check_workdir(workdir: str) -> None:
  """A workdir that is a file, or whose nearest existing parent cannot be written, is an error
  (checked before the run creates anything). Remote (gs://) workdirs are not checked here."""
  if '://' in workdir:
    return
  path = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f'workdir {workdir} is a file, not a directory')
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise UserError(f'workdir {workdir}: {existing} is a file, not a directory')
  if not os.access(existing, os.W_OK | os.X_OK):
    raise UserError(f'workdir {workdir} is not writable ({existing} is read-only)')


def _start_time(pid: int) -> str | None:
  """The process's start time in clock ticks since boot (Linux), None where unknown: with the
  pid it tells a live run from a new process that got the same pid after a reboot."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive(pid: int, start: str | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  now = _start_time(pid)
  return start is None or now is None or now == start


class WorkdirLock:
  """`<workdir>/run.lock` while this process runs in `workdir` (local workdirs, process 0).

  Creates the workdir (process 0); a run that fails before writing anything into a workdir it
  created removes it again, so a bad input leaves nothing behind.

  Created with O_EXCL, so of two runs starting together exactly one gets it. A lock of a
  process that no longer exists on this host is stale: taken over with a warning. A lock from
  another host cannot be checked: an error that says to remove it if no run is active.
  """
  NAME = 'run.lock'

  def __init__(self, workdir: str, *, report=print):
    self.workdir = workdir
    self.path = os.path.join(os.path.abspath(os.path.expanduser(workdir)), self.NAME)
    self.report = report
    self.held = False
    self.created = None  # the topmost directory this lock created

  def __enter__(self):
    if jax.process_index() != 0:
      return self
    if '://' in self.workdir:
      from etils import epath  # lazy: remote workdirs only
      epath.Path(self.workdir).mkdir(parents=True, exist_ok=True)
      return self
    root = os.path.dirname(self.path)
    top = root
    while not os.path.exists(os.path.dirname(top)):
      top = os.path.dirname(top)
    if not os.path.exists(root):
      os.makedirs(root, exist_ok=True)
      self.created = top
    me = {'host': socket.gethostname(), 'pid': os.getpid(), 'start': _start_time(os.getpid()),
          'since': time.strftime('%Y-%m-%d %H:%M:%S')}
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        self._check_existing()
        continue  # stale: removed, try once more
      with os.fdopen(fd, 'w') as f:
        json.dump(me, f)
      self.held = True
      return self
    raise UserError(f'could not take the lock {self.path} (another run took it meanwhile)')

  def _check_existing(self) -> None:
    try:
      with open(self.path) as f:
        other = json.load(f)
      host, pid = other['host'], int(other['pid'])
    except (OSError, ValueError, KeyError, TypeError):
      other, host, pid = None, None, None
    if other is not None and host != socket.gethostname():
      raise UserError(f'workdir {self.workdir} is in use by pid {pid} on host {host} (since '
                      f'{other.get("since")}); if no run is active there, remove {self.path}')
    if other is not None and pid != os.getpid() and _alive(pid, other.get('start')):
      raise UserError(f'workdir {self.workdir} is in use by another run (pid {pid}, since '
                      f'{other.get("since")}); wait for it or stop it first')
    why = 'unreadable' if other is None else f'pid {pid} is gone'
    self.report(f'warning: removing the stale lock {self.path} ({why})')
    with contextlib.suppress(FileNotFoundError):
      os.remove(self.path)

  def __exit__(self, exc_type, exc, tb):
    if self.held:
      with contextlib.suppress(FileNotFoundError):
        os.remove(self.path)
      self.held = False
    if exc_type is not None and self.created:  # failed before writing: leave nothing
      path = os.path.dirname(self.path)
      with contextlib.suppress(OSError):  # not empty: the run wrote something, kept
        while True:
          os.rmdir(path)
          if path == self.created:
            break
          path = os.path.dirname(path)


# ----------------------------------------------------------------------------- preemption
class Preemption:
  """SIGTERM/SIGINT handling of a run (see the module docstring). Installed by `loop.run` on the
  main thread; elsewhere (tools, threads) `active()` is an inert instance.

  Multi-process runs: JAX's preemption sync point handles SIGTERM (jax.distributed installs its
  notifier; every process gets the same stop step); SIGINT sets a local flag that the processes
  agree on by a one-int allgather on log and checkpoint steps only.
  """

  def __init__(self):
    self.signal_name: str | None = None
    self._previous = {}

  def install(self) -> 'Preemption':
    if threading.current_thread() is not threading.main_thread():
      return self
    signums = [signal.SIGINT] + ([signal.SIGTERM] if jax.process_count() == 1 else [])
    for signum in signums:
      self._previous[signum] = signal.signal(signum, self._handle)
    if interrupts.PENDING and self.signal_name is None:  # came while the program was importing
      self.signal_name = interrupts.PENDING[0]
    return self

  def uninstall(self) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.signal_name is not None:  # a second signal: stop now, without saving
      raise KeyboardInterrupt(f'{name} received twice')
    self.signal_name = name
    # os.write, not print: the handler may run in the middle of a print (tqdm) to the same stream
    os.write(2, f'\n{name} received: stopping at the next step boundary after saving a '
                'checkpoint (send it again to stop at once, without saving)\n'.encode())

  def raise_if_requested(self) -> None:
    """Preempted for a request that came after the loop's last poll (a phase boundary)."""
    if self.signal_name is not None:
      raise Preempted(f'{self.signal_name} received')

  def stop_requested(self, step: int, sync_step: bool) -> bool:
    """Whether every process stops after `step`. `sync_step` (the same on every process: a log
    or checkpoint step) allows the one collective of multi-process runs."""
    if jax.process_count() == 1:
      return self.signal_name is not None
    from jax.experimental import multihost_utils  # lazy: multi-process runs only
    stop = bool(multihost_utils.reached_preemption_sync_point(step))
    if sync_step:
      flags = multihost_utils.process_allgather(np.int32(self.signal_name is not None))
      stop = stop or bool(np.any(flags))
    return stop


_ACTIVE: list[Preemption] = []


def active() -> Preemption:
  """The Preemption of the running `loop.run`, else an inert one (never signalled)."""
  return _ACTIVE[-1] if _ACTIVE else Preemption()


@contextlib.contextmanager
def handle_preemption():
  """Installs signal handling for the duration of a run (nested runs share the outer one)."""
  if _ACTIVE:
    yield _ACTIVE[-1]
    return
  p = Preemption().install()
  _ACTIVE.append(p)
  try:
    yield p
  finally:
    _ACTIVE.pop()
    p.uninstall()


# ----------------------------------------------------------------------------- finite guard
def first_non_finite(flags: list, steps: list[int]) -> int | None:
  """The first of `steps` whose on-device `finite` flag is false (one host fetch), else None."""
  if not flags:
    return None
  ok = np.asarray(jax.device_get(flags)).astype(bool)
  bad = np.flatnonzero(~ok)
  return steps[int(bad[0])] if bad.size else None


class FiniteGuard:
  """The train step's on-device `finite` flags (every metric and the params finite) since the
  last check; `check` fetches them at once and stops the run on the first false one, before
  that step's metrics are logged or its state saved, so every checkpoint holds finite values."""

  def __init__(self, ckpt_dir: str):
    self.ckpt_dir = ckpt_dir
    self.flags, self.steps = [], []
    self.last_ok = None  # the last step known finite

  def add(self, step: int, flag) -> None:
    self.flags.append(flag)
    self.steps.append(step)

  def check(self, manager, step: int) -> None:
    bad = first_non_finite(self.flags, self.steps)
    first_unchecked = self.steps[0] if self.steps else step
    self.flags, self.steps = [], []
    if bad is None:
      self.last_ok = step
      return
    manager.wait_until_finished()
    latest = manager.latest_step()
    where = (f'the last checkpoint, step {latest} in {self.ckpt_dir}, is finite (rerunning '
             'resumes from it and replays the same steps)' if latest is not None else
             'no checkpoint was saved')
    raise NonFiniteError(
        f'non-finite loss, gradients or parameters at step {bad} (checked steps '
        f'{first_unchecked}-{step}); nothing after step {bad - 1} was saved; {where}; lower '
        'optax.lr or check the data')


class NonFiniteError(UserError):
  """A train step produced a non-finite value (see FiniteGuard)."""
