"""Run logs: TensorBoard events (tensorboardX) and `metrics.jsonl` in the workdir, process 0 only.

The workdir may be local or remote (gs://, through etils.epath): object stores cannot append, so
there `metrics.jsonl` is rewritten whole at each write (a few hundred rows per run).
"""
from __future__ import annotations

import json
from typing import Mapping

import jax
import numpy as np
from etils import epath


class MetricWriter:
  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    self._rows = None  # remote workdirs: every line, rewritten on each write
    if self.enabled:
      root = epath.Path(workdir)
      root.mkdir(parents=True, exist_ok=True)
      from tensorboardX import SummaryWriter  # imported lazily: only process 0 writes
      self._tb = SummaryWriter(str(root / 'tb'))
      self._path = root / 'metrics.jsonl'
      if '://' in str(workdir):
        self._rows = self._path.read_text().splitlines() if self._path.exists() else []
      else:
        self._jsonl = open(self._path, 'a')

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: float(np.asarray(v)) for k, v in metrics.items()}
    for k, v in clean.items():
      self._tb.add_scalar(k.replace('@', '_at_'), v, step)  # TensorBoard tag charset
    line = json.dumps({'step': int(step), **clean})
    if self._rows is not None:
      self._rows.append(line)
      self._path.write_text('\n'.join(self._rows) + '\n')
    else:
      self._jsonl.write(line + '\n')
      self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      if self._jsonl is not None:
        self._jsonl.close()
