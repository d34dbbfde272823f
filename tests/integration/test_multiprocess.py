"""Multi-process training: 2 jax processes x 4 CPU devices on loopback, as on a 2-host pod.

Both processes run the real entry point (`python -m clusterstm_jax.train ... --num_processes=2
--process_id=i --coordinator_address=127.0.0.1:PORT`), CPU collectives over gloo. Each reads only
its half of every global batch (the pipeline shards by process_index) and the step assembles the
global batch from the process-local rows. The run halts at step 3 (checkpoint: sharded state plus
one data-iterator state per process), is started again, resumes and finishes at step 6 with the
zero-shot evaluation.

The reference is the same entry point in this one process with 8 devices, fed the same global
batches: the per-process loaders of a 2-process run, concatenated in process order (process p's
rows sit on its devices, which come p-th in the mesh). Losses must match step for step.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from clusterstm_jax import loop
from clusterstm_jax.data import pipeline
from tests import helpers

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.multiprocess]

NUM_PROCESSES = 2
TIMEOUT_S = 600  # per launch of both processes (a compile and an evaluation on a busy machine)
EXIT_GRACE_S = 60  # a process that raised may hang at exit, waiting for its peer
# The smoke config without the teacher (random masking, no MRM: a teacher would be trained first)
# and with the VTC loss only: the compile is half as long, and tests/integration/test_sharding.py
# covers the whole loss on 8 devices. What is under test here is the multi-host machinery.
CONFIG = 'configs/pretrain.py:' + helpers.TEACHERLESS
OVERRIDES = {**helpers.NO_MRM, 'loss_weights.vtm': 0.0, 'loss_weights.mlm': 0.0}


def _tail(path, n=3000):
  with open(path, errors='replace') as f:
    return f.read()[-n:]


def _raised(err_path) -> bool:
  with open(err_path, errors='replace') as f:
    return 'Traceback (most recent call last)' in f.read()


def _free_port() -> int:
  """A loopback port free now (the OS picks it), for the coordinator of one launch."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env() -> dict:
  """The processes' environment: 4 CPU devices each (replacing conftest's 8), gloo collectives.

  Every wait that can be set from here is generous: XLA's CPU collectives wait TIMEOUT_S (their
  default rendezvous limit is 40 s), jax.distributed.initialize 300 s (train.py's default).
  One cannot: gloo connects the processes' devices on the first collective of each device group
  with a fixed 30 s limit, so the processes must reach it within 30 s of each other. Hence no
  persistent compilation cache: a process that loads a program from it while its peer compiles
  arrives minutes apart (cache keys differ between the processes here, and only process 0
  writes, so even a fresh shared cache does it on the resumed launch). Without one, both compile
  the same program side by side and arrive together. A gloo timeout is named in the failure.
  """
  xla_flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
               if not f.startswith(('--xla_force_host_platform_device_count',
                                    '--xla_cpu_collective_'))]
  xla_flags += ['--xla_force_host_platform_device_count=4',
                f'--xla_cpu_collective_timeout_seconds={TIMEOUT_S}',
                f'--xla_cpu_collective_call_terminate_timeout_seconds={TIMEOUT_S}']
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo',
             XLA_FLAGS=' '.join(xla_flags), PYTHONUNBUFFERED='1')
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  return env


def _kill(p: subprocess.Popen) -> None:
  if p.poll() is None:
    try:
      os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  p.wait()


def launch(workdir, data_dir, *args, log_dir, tag):
  """Runs the train CLI as NUM_PROCESSES processes; fails with their stderr tails on error."""
  port = _free_port()
  env = _env()
  overrides = [f'--config.{k}={v}' for k, v in OVERRIDES.items()]
  procs, logs = [], []
  for i in range(NUM_PROCESSES):
    cmd = [sys.executable, '-m', 'clusterstm_jax.train', f'--config={CONFIG}',
           f'--workdir={workdir}', f'--config.data.data_dir={data_dir}', *overrides, *args,
           f'--num_processes={NUM_PROCESSES}', f'--process_id={i}',
           f'--coordinator_address=127.0.0.1:{port}']
    out, err = (os.path.join(log_dir, f'{tag}_{i}.{s}') for s in ('out', 'err'))
    logs.append((out, err))
    with open(out, 'w') as fo, open(err, 'w') as fe:
      # Own process group: a failure kills the process and anything it started.
      procs.append(subprocess.Popen(cmd, cwd=helpers.REPO, env=env, stdout=fo, stderr=fe,
                                    start_new_session=True))
  started = time.monotonic()
  deadline = time.monotonic() + TIMEOUT_S
  raised_at = {}
  problem = None
  try:
    while any(p.poll() is None for p in procs):
      now = time.monotonic()
      failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
      if failed:  # the other one would wait for its peer until the coordinator times out
        problem = f'process {failed[0]} exited with {procs[failed[0]].returncode}'
        break
      for i, (p, (_, err)) in enumerate(zip(procs, logs)):
        if i not in raised_at and p.poll() is None and _raised(err):
          raised_at[i] = now
      hung = [i for i, t in raised_at.items() if now - t > EXIT_GRACE_S]
      if hung:
        problem = f'process {hung[0]} raised and did not exit'
        break
      if now > deadline:
        problem = f'timed out after {TIMEOUT_S}s'
        break
      time.sleep(1.0)
    else:
      if any(p.returncode for p in procs):
        problem = f'exit codes {[p.returncode for p in procs]}'
  finally:
    for p in procs:  # only the processes this test started (and their children)
      _kill(p)
  if problem:
    tails = '\n'.join(f'--- process {i} (exit {p.returncode}) stderr: {err} ---\n{_tail(err)}\n'
                      f'--- process {i} stdout: {out} ---\n{_tail(out, 1000)}'
                      for i, (p, (out, err)) in enumerate(zip(procs, logs)))
    if any('Gloo context initialization failed' in _tail(err, 100000) for _, err in logs):
      problem += (' (gloo: one process reached a collective over 30 s after its peer, '
                  'see _env)')
    pytest.fail(f'{tag}: {problem} after {time.monotonic() - started:.0f}s\n{tails}')
  return [_tail(out, 10000) for out, _ in logs]


class _Concatenated:
  """The 2-process global batch in one process: process p's loader's rows, in process order."""

  def __init__(self, loaders):
    self._iters = [iter(loader) for loader in loaders]

  def __iter__(self):
    return self

  def __next__(self):
    parts = [next(it) for it in self._iters]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self):  # checkpointed by the reference run
    return json.dumps([it.get_state().decode() for it in self._iters]).encode()

  def set_state(self, state):  # data/prefetch.Prefetch rewinds to the last batch taken
    for it, s in zip(self._iters, json.loads(state)):
      it.set_state(s.encode())


def reference_losses(data_dir, workdir, monkeypatch):
  make = pipeline.make_train_loader

  def two_process_batches(*args, process_index, process_count, **kwargs):
    assert (process_index, process_count) == (0, 1)
    return _Concatenated([make(*args, process_index=p, process_count=NUM_PROCESSES, **kwargs)
                          for p in range(NUM_PROCESSES)])

  config = helpers.smoke_config(helpers.TEACHERLESS, data_dir=data_dir, **OVERRIDES)
  with monkeypatch.context() as m:
    m.setattr(pipeline, 'make_train_loader', two_process_batches)
    results = loop.run(config, workdir)
  return helpers.losses(workdir), results


def test_two_processes_train_resume_and_match_one_process(tmp_path, monkeypatch):
  data_dir = str(tmp_path / 'data')
  # The tiny split, built once before any process starts.
  pipeline.get_source(helpers.smoke_config(helpers.TEACHERLESS, data_dir=data_dir).data, 'train')
  ref, ref_results = reference_losses(data_dir, str(tmp_path / 'reference'), monkeypatch)
  assert sorted(ref) == list(range(1, 7))

  workdir = str(tmp_path / 'multi')
  stdout = launch(workdir, data_dir, '--config.halt_at_step=3', log_dir=tmp_path, tag='first')
  assert 'halted at step 3' in stdout[0]
  assert sorted(helpers.losses(workdir)) == [1, 2, 3]
  ckpts = os.path.join(workdir, 'checkpoints')
  assert '3' in os.listdir(ckpts)
  data_states = sorted(f for f in os.listdir(os.path.join(ckpts, '3', 'data'))
                       if f.startswith('process_'))
  assert data_states == ['process_0-of-2.json', 'process_1-of-2.json']  # one per process

  launch(workdir, data_dir, log_dir=tmp_path, tag='resume')
  got = helpers.losses(workdir)
  assert sorted(got) == list(range(1, 7))
  for s in ref:
    assert got[s] == pytest.approx(ref[s], rel=1e-5, abs=1e-6), (s, got[s], ref[s])

  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  assert results['step'] == 6
  # Every test clip encoded exactly once across the two processes: the same retrieval table.
  for k, v in ref_results.items():
    if k.startswith('zeroshot_'):
      assert results[k] == pytest.approx(v, abs=1e-6), k

