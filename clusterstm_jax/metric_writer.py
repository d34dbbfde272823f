"""Run logs: TensorBoard events (tensorboardX) and `metrics.jsonl` in the workdir, process 0 only.

The workdir may be local or remote (gs://, through etils.epath): object stores cannot append, so
there `metrics.jsonl` is rewritten whole at each write (a few hundred rows per run).

A resumed run opens it with `start_step` (the restored step): rows of later steps, written
before the run stopped and about to be written again by the replayed steps, are dropped (the file
is rewritten through a temporary file and a rename), and TensorBoard gets `purge_step`, so
neither shows a step twice. So do the final evaluation's rows at `start_step` (re-evaluated).
"""
from __future__ import annotations

import json
from typing import Mapping

import jax
import numpy as np
from etils import epath


class MetricWriter:
  def __init__(self, workdir: str, enabled: bool | None = None, *,
               start_step: int | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    self._rows = None  # remote workdirs: every line, rewritten on each write
    self._last = {}  # key -> its latest value in the file (train loss of a completed run)
    if self.enabled:
      root = epath.Path(workdir)
      root.mkdir(parents=True, exist_ok=True)
      self._path = root / 'metrics.jsonl'
      kept = self._keep_rows(start_step)
      # The event writer is made at the first write: importing tensorboardX imports torch where
      # it is installed (~3 s here), which would otherwise delay a relaunch's first step.
      self._tb_args = (str(root / 'tb'), None if start_step is None else start_step + 1)
      if '://' in str(workdir):
        self._rows = kept
      else:
        self._jsonl = open(self._path, 'a')

  def _keep_rows(self, start_step: int | None) -> list[str]:
    """The file's rows up to `start_step` (all when None), rewritten if some were dropped; a
    torn last line (a kill mid-write) is dropped too."""
    if not self._path.exists():
      return []
    lines, kept = self._path.read_text().splitlines(), []
    for line in lines:
      try:
        row = json.loads(line)
      except ValueError:
        continue
      if start_step is not None and (row['step'] > start_step or (
          row['step'] == start_step and any(k.startswith('eval/') for k in row))):
        continue
      kept.append(line)
      self._last.update(row)
    if len(kept) != len(lines):
      tmp = self._path.with_name(self._path.name + '.tmp')
      tmp.write_text(''.join(l + '\n' for l in kept))
      tmp.replace(self._path)
    return kept

  def last(self, key: str):
    """The latest value of `key` written (this run or before it), None if never."""
    return self._last.get(key)

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: float(np.asarray(v)) for k, v in metrics.items()}
    if self._tb is None:
      from tensorboardX import SummaryWriter  # lazy: only process 0 writes, at its first row
      path, purge = self._tb_args
      self._tb = SummaryWriter(path, purge_step=purge)
    for k, v in clean.items():
      self._tb.add_scalar(k.replace('@', '_at_'), v, step)  # TensorBoard tag charset
    self._last.update(clean)
    line = json.dumps({'step': int(step), **clean})
    if self._rows is not None:
      self._rows.append(line)
      self._path.write_text('\n'.join(self._rows) + '\n')
    else:
      self._jsonl.write(line + '\n')
      self._jsonl.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self.enabled:
      if self._jsonl is not None:
        self._jsonl.close()
