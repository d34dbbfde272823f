"""The ClusterSTM train step: the frozen teacher is never trained, and unmasked tuning."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clusterstm_jax import config_lib
from clusterstm_jax import sharding as sharding_lib
from clusterstm_jax import trainer as trainer_lib
from tests import helpers

pytestmark = pytest.mark.unit

VOCAB = 64


@pytest.fixture(scope='module')
def setup():
  config = config_lib.load_config_file('configs/pretrain.py:smoke').copy_and_resolve_references()
  config.unlock()
  config.unmasked_steps = 1
  config.lock()
  mesh = sharding_lib.make_mesh(config.mesh)
  teacher = helpers.random_teacher(mesh, VOCAB)
  trainer = trainer_lib.build_trainer(config, mesh=mesh, total_steps=4, warmup_steps=1,
                                   teacher=teacher, vocab_size=VOCAB)
  rng = np.random.default_rng(0)
  batch = trainer.task.dummy_batch(config.batch_size)  # with the teacher's ids: teacher_text
  batch['video'] = rng.integers(0, 256, batch['video'].shape, dtype=np.uint8)
  batch['text'] = rng.integers(5, VOCAB, batch['text'].shape, dtype=np.int32)
  batch['text'][:, 0] = 2
  batch['teacher_text'] = batch['text'].copy()  # the teacher shares the student's tokenizer
  return config, trainer, teacher, batch


def test_teacher_gets_no_gradient_and_is_not_in_the_optimizer(setup):
  config, trainer, teacher, batch = setup
  state = trainer.init_state(jax.random.key(0))
  # Not in the train state: no teacher parameter name or shape set appears in params/opt_state.
  student = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(
      state['params'])}
  tpaths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(
      teacher.params)}
  assert not any(p.startswith("['img']") or p.startswith("['txt']") for p in student)
  # AdamW's moments have exactly the student's tree, and no other array lives in the state.
  for moment in ('mu', 'nu'):
    tree = optax.tree_utils.tree_get(state['opt_state'], moment)
    assert jax.tree.structure(tree) == jax.tree.structure(state['params'])
  n_params = len(jax.tree.leaves(state['params']))
  n_big = sum(x.ndim > 0 for x in jax.tree.leaves(state['opt_state']))
  assert n_big == 2 * sum(x.ndim > 0 for x in jax.tree.leaves(state['params'])), n_params
  assert len(tpaths) > 0

  # No gradient: d(loss)/d(teacher params) is exactly zero, though the loss uses the teacher
  # (cluster masking on its tokens, the MRM target from its MAP head and text tower).
  params = jax.device_get(state['params'])
  tparams = jax.device_get(teacher.params)
  b = jax.tree.map(jnp.asarray, batch)
  loss_fn = trainer.task.loss_fn

  def loss_of_teacher(tp):
    return loss_fn(params, b, jax.random.key(3), tp)

  # One jitted program (an eager loss pass would compile every op on its own: ~40 s here).
  (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_of_teacher, has_aux=True))(tparams)
  assert float(metrics['mrm']) > 0 and np.isfinite(float(loss))
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads))

  # A train step leaves the teacher exactly as it was.
  before = jax.tree.map(np.asarray, tparams)
  batch_dev = sharding_lib.global_batch(batch, trainer.mesh)
  state, metrics = trainer.train_step(state, batch_dev, jax.random.key(0))
  assert np.isfinite(float(metrics['loss']))
  after = jax.tree.map(np.asarray, jax.device_get(teacher.params))
  jax.tree.map(np.testing.assert_array_equal, before, after)


def test_unmasked_tuning_step_sees_every_token_and_skips_mrm(setup):
  config, trainer, teacher, batch = setup
  assert trainer.train_step_unmasked is not None
  state = trainer.init_state(jax.random.key(0))
  # The temperature set outside UMT's range comes back projected into it (task.project_params).
  state['params'] = dict(state['params'], temp=jnp.float32(0.7))
  batch_dev = sharding_lib.global_batch(batch, trainer.mesh)
  state, metrics = trainer.train_step_unmasked(state, batch_dev, jax.random.key(0))
  assert float(state['params']['temp']) == np.float32(0.5)
  metrics = jax.device_get(metrics)
  assert np.isfinite(float(metrics['loss']))
  assert 'mrm' not in metrics and not any(k.startswith('mask/') for k in metrics)
  assert {'vtc', 'vtm', 'mlm'} <= set(metrics)
  # The loss is the weighted sum of the remaining terms.
  w = config.loss_weights
  expected = sum(float(w[k]) * float(metrics[k]) for k in ('vtc', 'vtm', 'mlm'))
  np.testing.assert_allclose(float(metrics['loss']), expected, rtol=1e-5)


def test_unmasked_steps_needs_a_masked_task():
  config = config_lib.load_config_file('configs/teacher.py:smoke').copy_and_resolve_references()
  config.unlock()
  config.unmasked_steps = 1
  mesh = sharding_lib.make_mesh(config.mesh)
  with pytest.raises(ValueError, match='unmasked_steps'):
    trainer_lib.build_trainer(config, mesh=mesh, total_steps=4, warmup_steps=1, vocab_size=VOCAB)
