"""Lowered train steps kept on disk (program_cache.py): the same update as the jitted step, a
second trainer reads the program instead of tracing it, and the key follows what the program
depends on."""
import logging as py_logging
import os

import jax
import numpy as np
import pytest

from clusterstm_jax import config_lib
from clusterstm_jax import program_cache
from clusterstm_jax import sharding as sharding_lib
from clusterstm_jax import trainer as trainer_lib
from tests import helpers

pytestmark = pytest.mark.unit

VOCAB = 64


@pytest.fixture(scope='module')
def parts():
  config = config_lib.load_config_file('configs/pretrain.py:smoke').copy_and_resolve_references()
  mesh = sharding_lib.make_mesh(config.mesh)
  teacher = helpers.random_teacher(mesh, VOCAB)
  rng = np.random.default_rng(0)
  probe = trainer_lib.build_trainer(config, mesh=mesh, total_steps=4, warmup_steps=1,
                                    teacher=teacher, vocab_size=VOCAB)
  batch = probe.task.dummy_batch(config.batch_size)
  batch['video'] = rng.integers(0, 256, batch['video'].shape, dtype=np.uint8)
  batch['text'] = rng.integers(5, VOCAB, batch['text'].shape, dtype=np.int32)
  batch['text'][:, 0] = 2
  batch['teacher_text'] = batch['text'].copy()
  return config, mesh, teacher, probe, sharding_lib.global_batch(batch, mesh)


def _build(parts, program_dir, config=None, total_steps=4):
  base, mesh, teacher, _, _ = parts
  return trainer_lib.build_trainer(config or base, mesh=mesh, total_steps=total_steps,
                                   warmup_steps=1, teacher=teacher, vocab_size=VOCAB,
                                   program_dir=program_dir)


def _two_steps(trainer, batch):
  state = trainer.init_state(jax.random.key(0))
  losses = []
  for _ in range(2):
    state, metrics = trainer.train_step(state, batch, jax.random.key(5))
    losses.append(float(metrics['loss']))
  return losses, jax.device_get(state['params']), metrics


def test_cached_program_is_the_jitted_step_and_a_second_trainer_does_not_trace(
    parts, tmp_path, monkeypatch):
  _, _, _, probe, batch = parts
  want_losses, want_params, want_metrics = _two_steps(probe, batch)

  directory = str(tmp_path / 'programs')
  first = _build(parts, directory)
  losses, params, metrics = _two_steps(first, batch)
  np.testing.assert_allclose(losses, want_losses, rtol=1e-6)
  assert set(metrics) == set(want_metrics)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               params, want_params)
  files = sorted(os.listdir(directory))
  assert [f.rsplit('.', 1)[1] for f in files] == ['exported', 'json'], files
  assert files[0].startswith('train_step-')

  # A relaunch: a new trainer (new jitted functions) finds the program and never traces the
  # loss; the task's loss function is replaced by one that fails if it is ever called.
  second = _build(parts, directory)
  monkeypatch.setattr(second.task, 'loss_fn', None, raising=False)
  calls = []
  real = program_cache.ProgramCache._export
  monkeypatch.setattr(program_cache.ProgramCache, '_export',
                      staticmethod(lambda *a: calls.append(1) or real(*a)))
  losses2, params2, _ = _two_steps(second, batch)
  assert calls == [] and losses2 == losses
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_key_follows_the_program_not_the_loop(parts):
  config, _, _, _, batch = parts
  leaves = jax.tree.leaves(batch)
  fp = lambda c, **kw: program_cache.ProgramCache(
      '/unused', {'config': program_cache.config_fingerprint(c), **kw}).key('train_step', leaves)
  base = fp(config, total_steps=4)
  other = config.copy_and_resolve_references()
  with other.unlocked():
    other.halt_at_step, other.log_every_steps, other.compile_cache = 7, 3, '/elsewhere'
    other.seed = config.seed + 1  # reaches the step only through its arguments
  assert fp(other, total_steps=4) == base  # loop-only fields
  with other.unlocked():
    other.loss_weights.mrm = config.loss_weights.mrm + 1.0
  assert fp(other, total_steps=4) != base  # a loss weight is traced into the program
  assert fp(config, total_steps=5) != base  # the schedule's length too
  shorter = jax.tree.leaves({k: v[:1] for k, v in batch.items()})
  assert program_cache.ProgramCache('/u', {}).key('train_step', shorter) != \
      program_cache.ProgramCache('/u', {}).key('train_step', leaves)


def test_an_unreadable_program_is_traced_again_and_rewritten(parts, tmp_path, caplog):
  _, _, _, probe, batch = parts
  want, _, _ = _two_steps(probe, batch)
  directory = tmp_path / 'programs'
  _two_steps(_build(parts, str(directory)), batch)
  (path,) = directory.glob('*.exported')
  path.write_bytes(b'not a program')
  with caplog.at_level(py_logging.WARNING):
    losses, _, _ = _two_steps(_build(parts, str(directory)), batch)
  np.testing.assert_allclose(losses, want, rtol=1e-6)
  assert 'unreadable' in caplog.text and 'tracing it again' in caplog.text
  assert path.read_bytes() != b'not a program'  # rewritten whole
  assert not list(directory.glob('.*.tmp'))


def test_a_step_that_cannot_be_exported_runs_uncached(parts, tmp_path, monkeypatch, caplog):
  _, _, _, probe, batch = parts
  want, _, _ = _two_steps(probe, batch)

  def refuse(*a, **k):
    raise ValueError('custom call without a stability guarantee')

  monkeypatch.setattr(jax.export, 'export', refuse)
  directory = tmp_path / 'programs'
  with caplog.at_level(py_logging.WARNING):
    losses, _, _ = _two_steps(_build(parts, str(directory)), batch)
  np.testing.assert_allclose(losses, want, rtol=1e-6)
  assert 'cannot be exported' in caplog.text and 'running it uncached' in caplog.text
  assert not directory.exists() or not list(directory.iterdir())
