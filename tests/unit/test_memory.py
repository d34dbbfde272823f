"""The memory policy: gradient accumulation over micro-batches (what equals the full batch and
what does not), rematerialisation (same gradients) and the bf16 compute dtype (f32 params)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clusterstm_jax import config_lib
from clusterstm_jax import sharding as sharding_lib
from clusterstm_jax import teacher as teacher_lib
from clusterstm_jax import trainer as trainer_lib
from clusterstm_jax.tasks import base as tasks_base
from tests import helpers

pytestmark = pytest.mark.unit

VOCAB = 64
BATCH = 32  # 4 micro-batches of 8: one row per simulated device each
# Per-example objective: MRM only (its masked-token count is the same in every clip, Nc a frame).
PER_EXAMPLE = {'loss_weights.vtc': 0.0, 'loss_weights.vtm': 0.0, 'loss_weights.mlm': 0.0}


def _config(**overrides):
  config = config_lib.load_config_file('configs/pretrain.py:smoke')
  return config_lib.with_overrides(config, batch_size=BATCH, **overrides)


@pytest.fixture(scope='module')
def parts():
  config = _config()
  mesh = sharding_lib.make_mesh(config.mesh)
  teacher = helpers.random_teacher(mesh, VOCAB)
  rng = np.random.default_rng(0)
  batch = tasks_base.video_batch(config, BATCH)
  batch['video'] = rng.integers(0, 256, batch['video'].shape, dtype=np.uint8)
  batch['text'] = rng.integers(5, VOCAB, batch['text'].shape, dtype=np.int32)
  batch['text'][:, 0] = 2
  batch['teacher_text'] = batch['text'].copy()  # the teacher's ids: its tokenizer is the student's
  return mesh, teacher, batch


def _trainer(parts, config):
  mesh, teacher, _ = parts
  if teacher is not None:
    teacher = teacher_lib.Teacher(model=teacher_lib.with_policy(teacher.model, config),
                                  params=teacher.params, param_shardings=teacher.param_shardings)
  return trainer_lib.build_trainer(config, mesh=mesh, total_steps=4, warmup_steps=1,
                                   teacher=teacher, vocab_size=VOCAB)


def _grads(parts, config, micro, params):
  """(loss, metrics, grads) of trainer.accumulate for the batch, jitted under the mesh."""
  mesh, teacher, batch = parts
  trainer = _trainer(parts, config)
  grad_fn = jax.value_and_grad(trainer.task.loss_fn, has_aux=True)
  fn = jax.jit(lambda p, b, tp: trainer_lib.accumulate(grad_fn, micro, mesh, p, b,
                                                       jax.random.key(3), tp))
  with jax.set_mesh(mesh):
    out = fn(params, sharding_lib.global_batch(batch, mesh), teacher.params)
  return jax.device_get(out)


def _init_params(parts, config):
  return jax.device_get(_trainer(parts, config).init_state(jax.random.key(0))['params'])


def _max_diff(a, b):
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_accumulation_equals_the_full_batch_for_a_per_example_loss(parts):
  config = _config(**PER_EXAMPLE)
  params = _init_params(parts, config)
  loss1, metrics1, grads1 = _grads(parts, config, 1, params)
  loss4, metrics4, grads4 = _grads(parts, config, 4, params)
  assert float(metrics1['mrm']) > 0
  np.testing.assert_allclose(loss4, loss1, rtol=0, atol=1e-6)
  for k in metrics1:
    if k != 'vtc':  # reported at weight 0: in-batch (see the next test)
      np.testing.assert_allclose(metrics4[k], metrics1[k], rtol=0, atol=1e-6, err_msg=k)
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads1))
  assert scale > 1e-3
  assert _max_diff(grads4, grads1) <= 1e-6, _max_diff(grads4, grads1)

  # The whole step (clipping, AdamW): the same parameters after one update.
  mesh, _, batch = parts
  after = []
  for micro in (1, 4):
    trainer = _trainer(parts, config_lib.with_overrides(config, microbatches=micro))
    state = trainer.init_state(jax.random.key(0))
    state, m = trainer.train_step(state, sharding_lib.global_batch(batch, mesh),
                                  jax.random.key(3))
    after.append((jax.device_get(state['params']), float(m['grad_norm'])))
  assert after[0][1] == pytest.approx(after[1][1], rel=1e-6)
  assert _max_diff(after[0][0], after[1][0]) <= 1e-6


def test_accumulated_contrastive_terms_are_those_of_each_micro_batch(parts):
  """VTC and the VTM hard negatives are in-batch: accumulation gives the mean of the
  micro-batches' losses (a batch of BATCH / 4 each), not the full batch's."""
  mesh, teacher, batch = parts
  config = _config()
  params = _init_params(parts, config)
  loss1, metrics1, _ = _grads(parts, config, 1, params)
  loss4, metrics4, _ = _grads(parts, config, 4, params)
  loss_fn = _trainer(parts, config).task.loss_fn
  per_micro = []
  for i in range(4):
    mb = {k: jnp.asarray(v[i::4]) for k, v in batch.items()}  # trainer.accumulate's split
    rng = jax.random.fold_in(jax.random.key(3), i)
    per_micro.append(jax.device_get(jax.jit(loss_fn)(params, mb, rng, teacher.params)[1]))
  for k in ('vtc', 'mrm'):
    np.testing.assert_allclose(metrics4[k], np.mean([m[k] for m in per_micro]), rtol=1e-5)
  # A contrastive softmax over 8 candidates is not one over 32 (log 8 vs log 32 at chance).
  assert abs(float(metrics4['vtc']) - float(metrics1['vtc'])) > 0.1
  # The per-example term is the same either way.
  np.testing.assert_allclose(metrics4['mrm'], metrics1['mrm'], rtol=0, atol=1e-6)


@pytest.mark.parametrize('remat', ['full', 'dots_saveable'])
def test_remat_gives_the_same_gradients(parts, remat):
  config = _config()
  params = _init_params(parts, config)
  loss, metrics, grads = _grads(parts, config, 1, params)
  loss_r, metrics_r, grads_r = _grads(parts, config_lib.with_overrides(config, remat=remat), 1,
                                      params)
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  for k in metrics:
    np.testing.assert_allclose(metrics_r[k], metrics[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert _max_diff(grads_r, grads) <= 1e-5, _max_diff(grads_r, grads)


def test_bfloat16_policy_keeps_float32_params_and_computes_in_bfloat16(parts):
  config = _config()
  bf16 = config_lib.with_overrides(config, dtype='bfloat16', remat='full')
  trainer = _trainer(parts, bf16)
  dtypes = {x.dtype for x in jax.tree.leaves(trainer.abstract_state['params'])}
  assert dtypes == {jnp.dtype(jnp.float32)}
  hlo = trainer.lower(BATCH).as_text()
  assert 'bf16' in hlo and 'dot_general' in hlo
  params = _init_params(parts, config)
  loss32, m32, g32 = _grads(parts, config, 1, params)
  loss16, m16, g16 = _grads(parts, bf16, 1, params)
  assert loss16.dtype == np.float32 and all(g.dtype == np.float32 for g in jax.tree.leaves(g16))
  # Same parameters and batch: the loss terms agree to bf16's precision (2^-8 relative per op).
  for k in ('vtc', 'vtm', 'mlm', 'mrm'):
    np.testing.assert_allclose(m16[k], m32[k], rtol=3e-2, err_msg=k)


def test_microbatches_must_divide_the_batch_over_the_shards():
  config = _config(microbatches=3)
  with pytest.raises(config_lib.ConfigError, match='microbatches=3'):
    config_lib.validate(config, 8, 1)
  with pytest.raises(config_lib.ConfigError, match='remat'):
    config_lib.validate(_config(remat='some'), 8, 1)
