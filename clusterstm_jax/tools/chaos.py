r"""Fault injection: a training command killed (-9, TERM, INT) at random moments and its latest
checkpoint corrupted, N times, then run to the end and compared with an uninterrupted run.

  python -m clusterstm_jax.tools.chaos --out=DIR [--faults=33] [--seed=0] [--train_args=...]

Runs `python -m clusterstm_jax.train TRAIN_ARGS` in DIR/reference without faults (its data and
teacher under DIR/reference too), then the same in DIR/chaos, where the faults are: when the run
trains its teacher first (the default arguments: the smoke config), a kill in each phase before
the student's first step (dataset build, teacher training x3 with kill -9/TERM/INT, teacher
export); then, in turn, kill -9, SIGTERM, SIGINT at start-up, a training step, right after a
checkpoint save and (the last one) the final evaluation, or a corruption of the latest checkpoint (truncated array file, missing
manifest.ocdbt, garbage _METADATA, garbage data/*.json, removed state/ or data/, a stray empty
step directory) between two runs. Per fault it records the phase it hit, the exit status and the
steps lost (the last logged step minus the checkpoint the next run resumes from). At the end the
chaos run is completed and compared with the reference: every metrics.jsonl row (all keys but
examples_per_sec, time/*) of the student and the teacher and the final table must be bitwise
equal, with no step logged twice.
Prints a table (markdown) and exits 1 if any check fails.
"""
from __future__ import annotations

import glob
import json
import os
import random
import re
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
flags.DEFINE_integer('faults', 33, 'How many faults to inject.')
flags.DEFINE_integer('seed', 0, 'Random moments.')
flags.DEFINE_string('train_args', '--config=configs/pretrain.py:smoke '
                    '--config.teacher.config=configs/teacher.py:smoke,steps=12 '
                    '--config.total_steps=60 --config.checkpoint_every_steps=5 '
                    '--config.log_every_steps=1',
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


def _rows(workdir, run='run'):
  path = os.path.join(workdir, run, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _finished_dataset(workdir) -> bool:
  # TFDS builds into a `<version>.incomplete*` directory and renames it to `<version>` when done.
  return any(re.fullmatch(r'\d+\.\d+\.\d+', os.path.basename(p))
             for p in glob.glob(os.path.join(workdir, 'data', '*', '*', '*')))


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
  if os.path.isdir(os.path.join(workdir, 'data')) and not _finished_dataset(workdir):
    return 'dataset build'  # (the teacher's run, when there is one, builds it)
  if os.path.isdir(teacher) and not os.path.exists(os.path.join(teacher, 'export', 'config.json')):
    if os.path.exists(os.path.join(teacher, 'results.json')):
      return 'teacher export'
    return 'teacher training' if _rows(workdir, 'teacher') else 'teacher start-up'
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


# Faults aimed at the phases before the student's first step, while they exist (a run that
# trains its teacher first): the dataset build, the teacher's training and its export.
EARLY = (('kill -9', 'dataset build'), ('SIGTERM', 'teacher training'),
         ('SIGINT', 'teacher training'), ('kill -9', 'teacher training'),
         ('kill -9', 'teacher export'))


def schedule(n: int, rng: random.Random, *, early: bool = False) -> list[tuple[str, str]]:
  """(fault, moment) for n faults: first EARLY when `early` (the run trains a teacher); then
  signals cycle kill -9, SIGTERM, SIGINT; every 4th fault is a corruption (cycling the kinds);
  the moments cycle start-up, a training step, right after a checkpoint save; the last signal
  hits the final evaluation (nothing after it)."""
  out = list(EARLY[:n]) if early else []
  moments = ('start-up', 'training', 'after a save', 'training')
  for i in range(n - len(out)):
    if i % 4 == 3:
      out.append((list(CORRUPTIONS)[(i // 4) % len(CORRUPTIONS)], 'between runs'))
    else:
      out.append((KILLS[i % 3], moments[i % len(moments)]))
  signals = [j for j, (k, _) in enumerate(out) if k in KILLS and j >= len(EARLY) * early]
  for j in signals[-1:] if n >= 6 else []:
    out[j] = (out[j][0], 'final evaluation')
  del rng
  return out


def _logged(workdir, run='run') -> int:
  return max([r['step'] for r in _rows(workdir, run) if 'loss' in r] or [0])


def _reached(target, chaos, total, start, t0, goal, early_s) -> bool:
  """Whether the moment `target` has come (`start`: the student's and the teacher's logged step
  and the student's checkpoints when this start began)."""
  now = _logged(chaos)
  if target == 'start-up':
    return time.time() - t0 >= early_s
  if target == 'training':
    return now >= min(goal, total - 1)
  if target == 'after a save':
    return bool(set(_steps(os.path.join(chaos, 'run', 'checkpoints'))) - start['ckpts'])
  if target == 'final evaluation':
    return now >= total
  if target == 'teacher training':  # a teacher step done in this start
    return _logged(chaos, 'teacher') > start['teacher'] and \
        _phase(chaos, total, start['run']) == 'teacher training'
  return _phase(chaos, total, start['run']) == target  # dataset build, teacher export


def _kill(i, kind, target, chaos, total, rng, log):
  """Starts the run and sends `kind` at `target`; returns the table row."""
  start = {'run': _logged(chaos), 'teacher': _logged(chaos, 'teacher'),
           'ckpts': set(_steps(os.path.join(chaos, 'run', 'checkpoints')))}
  # A few steps on: every training fault leaves steps for the next ones.
  goal = start['run'] + rng.randint(1, 4)
  early_s = rng.uniform(2.0, 20.0)
  proc = _start(chaos, log)
  t0 = time.time()
  while proc.poll() is None and time.time() - t0 < FLAGS.timeout:
    if _reached(target, chaos, total, start, t0, goal, early_s):
      if target in ('final evaluation', 'dataset build'):
        time.sleep(rng.uniform(0.0, 1.0))
      break
    time.sleep(0.02)
  if proc.poll() is not None:
    return (i, kind, target, 'ended before the fault', proc.returncode, '-')
  phase = _phase(chaos, total, start['run'])
  if kind == 'kill -9':
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: no builder worker survives
  else:
    proc.send_signal(SIGNALS[kind])
  rc = proc.wait(timeout=FLAGS.timeout)
  run = 'teacher' if phase.startswith('teacher') else 'run'
  # log_every_steps=1: the step reached, minus the checkpoint the next start resumes from.
  logged, saved = _logged(chaos, run), max(_steps(os.path.join(chaos, run, 'checkpoints')) or [0])
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
  early = os.path.isdir(os.path.join(ref, 'teacher'))  # the run trains its teacher first
  for i, (kind, target) in enumerate(schedule(FLAGS.faults, rng, early=early)):
    log.write(f'\n===== fault {i}: {kind} at {target}\n')
    log.flush()
    if kind in CORRUPTIONS:
      table.append(_corrupt(i, kind, chaos, log))
    else:
      table.append(_kill(i, kind, target, chaos, total, rng, log))
  rc = _run_to_end(chaos, log)
  log.close()

  a, b = _rows(ref), _rows(chaos)
  teacher_equal = _comparable(_rows(ref, 'teacher')) == _comparable(_rows(chaos, 'teacher'))
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
  signal_lost = [r for r in table if r[1] in ('SIGTERM', 'SIGINT')
                 and r[3] in ('training', 'teacher training')
                 and (r[5] != 0 or r[4] != EXIT_PREEMPTED)]
  print(f'\nfinal run exit {rc}; metrics.jsonl rows {len(b)} (reference {len(a)}), duplicates: '
        f'{"none" if no_dups else "YES"}; rows bitwise equal: {rows_equal}; final table equal: '
        f'{tables_equal}; teacher rows equal: {teacher_equal}; SIGTERM/SIGINT during training that lost steps: {len(signal_lost)}')
  if not (rc == 0 and no_dups and rows_equal and tables_equal and teacher_equal
          and not signal_lost):
    sys.exit(1)


if __name__ == '__main__':
  cli.run(main)
