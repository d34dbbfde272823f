"""Training progress on the console: a tqdm bar on a terminal, one plain line per logging step
otherwise (a log file on a TPU VM would get tqdm's `\\r` updates as one long line); and the
resolved config, printed at the start of a run and saved in its workdir as config.json."""
from __future__ import annotations

import json
import sys
import time

import tqdm
from etils import epath


def _duration(seconds: float) -> str:
  seconds = int(max(0, seconds))
  h, rest = divmod(seconds, 3600)
  return f'{h}:{rest // 60:02d}:{rest % 60:02d}' if h else f'{rest // 60:02d}:{rest % 60:02d}'


class Progress:
  """update(n) after each step; log(step, loss, examples_per_sec) at each logging step;
  write(text) prints above the bar; close() at the end. Silent where `enabled` is False
  (processes other than 0). `plain` defaults to stdout not being a terminal."""

  def __init__(self, total: int, initial: int, *, enabled: bool = True,
               plain: bool | None = None, stream=None):
    self.total, self.enabled = total, enabled
    self.stream = stream or sys.stdout
    self.plain = (not self.stream.isatty()) if plain is None else plain
    self._start_time, self._start_step = time.perf_counter(), initial
    self._bar = None
    if enabled and not self.plain:
      self._bar = tqdm.tqdm(total=total, initial=initial, dynamic_ncols=True, desc='train',
                            file=self.stream)

  def update(self, n: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(n)

  def log(self, step: int, loss: float, examples_per_sec: float) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.set_postfix(loss=f'{loss:.3f}', refresh=False)
      return
    done = step - self._start_step
    elapsed = time.perf_counter() - self._start_time
    eta = elapsed / done * (self.total - step) if done > 0 else 0.0
    print(f'step {step}/{self.total}  loss {loss:.4f}  {examples_per_sec:.1f} examples/s  '
          f'elapsed {_duration(elapsed)}  ETA {_duration(eta)}', file=self.stream, flush=True)

  def write(self, text: str) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(text, file=self.stream)
    else:
      print(text, file=self.stream, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def save_config(config, workdir: str, *, enabled: bool = True, show: bool = True) -> None:
  """Prints the resolved config (on process 0) and writes WORKDIR/config.json atomically."""
  if not enabled:
    return
  text = json.dumps(config.to_dict(), indent=1, sort_keys=True)
  if show:
    print(f'config ({workdir}/config.json):\n{text}', flush=True)
  path = epath.Path(workdir) / 'config.json'
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(text)
  tmp.replace(path)
