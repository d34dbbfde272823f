r"""Fault injection: a training command killed (-9, TERM, INT) at random moments and its latest
checkpoint corrupted, N times, then run to the end and compared with an uninterrupted run.

  python -m clusterstm_jax.tools.chaos --out=DIR [--faults=30] [--seed=0]
      [--train_args='--config=configs/pretrain.py:smoke,mask=random --config.loss_weights.mrm=0']

Runs `python -m clusterstm_jax.train TRAIN_ARGS` in DIR/reference without faults (its data and
teacher under DIR/reference too, so start-up, dataset build and teacher phases are hit), then the
same in DIR/chaos, where fault i is, in turn: kill -9, SIGTERM, SIGINT at a random moment of the
reference's duration, or a corruption of the latest checkpoint (truncated array file, missing
manifest.ocdbt, garbage _METADATA, garbage data/*.json, removed state/ or data/, a stray empty
step directory) between two runs. Per fault it records the phase it hit, the exit status and the
steps lost (the last logged step minus the checkpoint the next run resumes from). At the end the
chaos run is completed and compared with the reference: every metrics.jsonl row (all keys but
examples_per_sec, time/*) and the final table must be bitwise equal, with no step logged twice.
Prints a table (markdown) and exits 1 if any check fails.
"""
from __future__ import annotations

import glob
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time

from absl import flags

from clusterstm_jax import cli
from clusterstm_jax.errors import EXIT_PREEMPTED, UserError

FLAGS = flags.FLAGS
flags.DEFINE_string('out', None, 'Directory for the two runs (created; must not exist).',
                    required=True)
flags.DEFINE_integer('faults', 30, 'How many faults to inject.')
flags.DEFINE_integer('seed', 0, 'Random moments.')
flags.DEFINE_string('train_args', '--config=configs/pretrain.py:smoke,mask=random '
                    '--config.loss_weights.mrm=0 --config.total_steps=40 '
                    '--config.checkpoint_every_steps=5 --config.log_every_steps=1',
                    'Arguments of `python -m clusterstm_jax.train` (a --workdir and the data and '
                    'teacher dirs are added).')
flags.DEFINE_integer('timeout', 1800, 'Seconds one run may take.')
flags.DEFINE_string('reference', None, 'A finished reference (DIR/reference of an earlier chaos '
                    'run with the same --train_args) to reuse instead of running it again.')

KILLS = ('kill -9', 'SIGTERM', 'SIGINT')
SIGNALS = {'kill -9': signal.SIGKILL, 'SIGTERM': signal.SIGTERM, 'SIGINT': signal.SIGINT}


def _largest(pattern):
  files = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
  return max(files, key=os.path.getsize) if files else None


def _truncate(path):
  if path:
    os.truncate(path, os.path.getsize(path) // 2)


def _garbage(path):
  if path:
    with open(path, 'w') as f:
      f.write('{garbage')


CORRUPTIONS = {
    'truncated array file': lambda d: _truncate(_largest(f'{d}/state/**/d/*')),
    'missing manifest.ocdbt': lambda d: os.remove(f'{d}/state/manifest.ocdbt'),
    'garbage state/_METADATA': lambda d: _garbage(f'{d}/state/_METADATA'),
    'garbage data/*.json': lambda d: [_garbage(p) for p in glob.glob(f'{d}/data/*.json')],
    'removed state/': lambda d: shutil.rmtree(f'{d}/state'),
    'removed data/': lambda d: shutil.rmtree(f'{d}/data'),
    'stray empty step dir': lambda d: os.mkdir(os.path.join(
        os.path.dirname(d), str(int(os.path.basename(d)) + 1000))),
}


def _command(workdir):
  extra = [f'--workdir={workdir}/run', f'--config.data.data_dir={workdir}/data',
           f'--config.teacher.workdir={workdir}/teacher']
  return [sys.executable, '-m', 'clusterstm_jax.train', *shlex.split(FLAGS.train_args), *extra]


def _steps(ckpt_dir):
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())


def _rows(workdir):
  path = os.path.join(workdir, 'run', 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _phase(workdir, total, start_step):
  """What the run was doing, from what it had written (`start_step`: logged when it started)."""
  run, teacher = os.path.join(workdir, 'run'), os.path.join(workdir, 'teacher')
  if os.path.exists(os.path.join(run, 'results.json')):
    return 'after the end'
  now = max([r['step'] for r in _rows(workdir) if 'loss' in r] or [0])
  if now >= total:
    return 'final evaluation'
  if now > start_step:
    return 'training'
  if os.path.isdir(os.path.join(run, 'checkpoints')):
    return 'start-up (restore, compile)'
  if os.path.isdir(teacher) and not os.path.exists(os.path.join(teacher, 'export', 'config.json')):
    return 'teacher'
  if not glob.glob(os.path.join(workdir, 'data', 'shapes', '*', '[0-9]*')):
    return 'dataset build'
  return 'start-up'


def _start(workdir, log):
  # One compilation cache for all runs (a cached program is the same program: same numbers).
  cache = os.environ.get('JAX_COMPILATION_CACHE_DIR') or os.path.join(FLAGS.out, 'jax_cache')
  env = {**os.environ, 'JAX_COMPILATION_CACHE_DIR': cache,
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}
  return subprocess.Popen(_command(workdir), stdout=log, stderr=subprocess.STDOUT,
                          start_new_session=True, env=env)


def _run_to_end(workdir, log):
  proc = _start(workdir, log)
  return proc.wait(timeout=FLAGS.timeout)


def _total_steps(workdir):
  with open(os.path.join(workdir, 'run', 'results.json')) as f:
    return json.load(f)['step']


def _comparable(rows):
  # Wall-clock figures (examples/s, time to the first step of each start) differ by nature.
  return [{k: v for k, v in r.items() if k != 'examples_per_sec' and not k.startswith('time/')}
          for r in rows]


def schedule(n: int, rng: random.Random) -> list[tuple[str, str]]:
  """(fault, moment) for n faults: signals cycle kill -9, SIGTERM, SIGINT; every 4th fault is a
  corruption (cycling the kinds); the moments cycle start-up, a random training step, right
  after a checkpoint save; the last signal hits the final evaluation (nothing after it)."""
  out, moments = [], ('start-up', 'training', 'after a save', 'training')
  for i in range(n):
    if i % 4 == 3:
      out.append((list(CORRUPTIONS)[(i // 4) % len(CORRUPTIONS)], 'between runs'))
    else:
      out.append((KILLS[i % 3], moments[i % len(moments)]))
  signals = [j for j, (k, _) in enumerate(out) if k in KILLS]
  for j in signals[-1:] if n >= 6 else []:
    out[j] = (out[j][0], 'final evaluation')
  del rng
  return out


def _logged(workdir) -> int:
  return max([r['step'] for r in _rows(workdir) if 'loss' in r] or [0])


def _kill(i, kind, target, chaos, total, rng, log):
  """Starts the run and sends `kind` at `target`; returns the table row."""
  ckpts = os.path.join(chaos, 'run', 'checkpoints')
  start_step, start_ckpts = _logged(chaos), set(_steps(ckpts))
  step_goal = rng.randint(start_step + 1, max(start_step + 1, total - 2))
  early = rng.uniform(2.0, 20.0)
  proc = _start(chaos, log)
  t0 = time.time()
  while proc.poll() is None and time.time() - t0 < FLAGS.timeout:
    now = _logged(chaos)
    if target == 'start-up' and time.time() - t0 >= early:
      break
    if target == 'training' and now >= min(step_goal, total - 1):
      break
    if target == 'after a save' and set(_steps(ckpts)) - start_ckpts:
      break
    if target == 'final evaluation' and now >= total:
      time.sleep(rng.uniform(0.0, 1.0))
      break
    time.sleep(0.02)
  if proc.poll() is not None:
    return (i, kind, target, 'ended before the fault', proc.returncode, '-')
  phase = _phase(chaos, total, start_step)
  if kind == 'kill -9':
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: no builder worker survives
  else:
    proc.send_signal(SIGNALS[kind])
  rc = proc.wait(timeout=FLAGS.timeout)
  logged, saved = _logged(chaos), max(_steps(ckpts) or [0])  # log_every_steps=1: the step reached
  return (i, kind, target, phase, rc, logged - saved)


def _corrupt(i, kind, chaos, log):
  """Corrupts the latest checkpoint, then runs until the fallback is done and training goes on
  (killed there); returns the table row."""
  run = os.path.join(chaos, 'run')
  ckpts, aside = os.path.join(run, 'checkpoints'), os.path.join(run, 'checkpoints_unreadable')
  steps = _steps(ckpts)
  if not steps:
    return (i, kind, 'between runs', 'no checkpoint yet: skipped', '-', '-')
  CORRUPTIONS[kind](os.path.join(ckpts, str(steps[-1])))
  before = set(os.listdir(aside)) if os.path.isdir(aside) else set()
  logged = _logged(chaos)
  proc = _start(chaos, log)
  t0 = time.time()
  while proc.poll() is None and time.time() - t0 < FLAGS.timeout:
    moved = set(os.listdir(aside)) - before if os.path.isdir(aside) else set()
    if moved or (kind == 'stray empty step dir' and not os.path.isdir(os.path.join(
        ckpts, str(steps[-1] + 1000)))):
      time.sleep(3.0)  # the fallback is done: killed while restoring or compiling, so the run
      break            # never finishes before the last fault
    time.sleep(0.05)
  if proc.poll() is None:
    os.killpg(proc.pid, signal.SIGKILL)
  rc = proc.wait()
  moved = sorted(set(os.listdir(aside)) - before) if os.path.isdir(aside) else []
  resumed = steps[-1] if kind == 'stray empty step dir' else (steps[-2] if len(steps) > 1 else 0)
  return (i, kind, f'step {steps[-1]}', 'moved aside: ' + (', '.join(moved) or 'NOTHING'), rc,
          f'{logged - resumed} (resumed from {resumed})')


class _Table(list):
  """The rows, each also printed as it comes (a long run shows its progress)."""

  def append(self, row):
    super().append(row)
    print('| ' + ' | '.join(str(x) for x in row) + ' |', flush=True)


def main() -> None:
  out = os.path.abspath(FLAGS.out)
  if os.path.exists(out):
    raise UserError(f'--out={FLAGS.out} exists; give a new directory')
  ref, chaos = os.path.join(out, 'reference'), os.path.join(out, 'chaos')
  os.makedirs(ref)
  os.makedirs(chaos)
  if FLAGS.reference and os.path.isdir(os.path.join(FLAGS.reference, '..', 'jax_cache')):
    shutil.copytree(os.path.join(FLAGS.reference, '..', 'jax_cache'),
                    os.path.join(out, 'jax_cache'))
  rng = random.Random(FLAGS.seed)
  t0 = time.time()
  if FLAGS.reference:
    shutil.rmtree(ref)
    shutil.copytree(FLAGS.reference, ref, symlinks=True)
    rc = 0
  else:
    with open(os.path.join(out, 'reference.log'), 'w') as log:
      rc = _run_to_end(ref, log)
  duration = time.time() - t0
  if rc != 0:
    raise UserError(f'the reference run failed (exit {rc}); see {out}/reference.log')
  total = _total_steps(ref)
  print(f'reference: {total} steps in {duration:.0f} s', flush=True)

  table = _Table()
  log = open(os.path.join(out, 'chaos.log'), 'w')
  for i, (kind, target) in enumerate(schedule(FLAGS.faults, rng)):
    log.write(f'\n===== fault {i}: {kind} at {target}\n')
    log.flush()
    if kind in CORRUPTIONS:
      table.append(_corrupt(i, kind, chaos, log))
    else:
      table.append(_kill(i, kind, target, chaos, total, rng, log))
  rc = _run_to_end(chaos, log)
  log.close()

  a, b = _rows(ref), _rows(chaos)
  train_steps = [r['step'] for r in b if 'loss' in r]
  no_dups = len(train_steps) == len(set(train_steps))
  rows_equal = _comparable(a) == _comparable(b)
  with open(os.path.join(ref, 'run', 'results.json')) as f:
    want = json.load(f)
  with open(os.path.join(chaos, 'run', 'results.json')) as f:
    got = json.load(f)
  tables_equal = want == got
  print('\n| # | fault | when | phase hit | exit | steps lost |')
  print('|---|---|---|---|---|---|')
  for row in table:
    print('| ' + ' | '.join(str(x) for x in row) + ' |')
  signal_lost = [r for r in table if r[1] in ('SIGTERM', 'SIGINT') and r[3] == 'training'
                 and (r[5] != 0 or r[4] != EXIT_PREEMPTED)]
  print(f'\nfinal run exit {rc}; metrics.jsonl rows {len(b)} (reference {len(a)}), duplicates: '
        f'{"none" if no_dups else "YES"}; rows bitwise equal: {rows_equal}; final table equal: '
        f'{tables_equal}; SIGTERM/SIGINT during training that lost steps: {len(signal_lost)}')
  if not (rc == 0 and no_dups and rows_equal and tables_equal and not signal_lost):
    sys.exit(1)


if __name__ == '__main__':
  cli.run(main)
