"""Sharding invariance: the same step on 1 device and on 8 under every rule set; resharding restores.

Each case builds the trainer from the smoke config (random masking and no MRM, so no teacher;
VTC + VTM + MLM) on a mesh of the 8 simulated CPU devices, initialises the state born sharded and
runs two train steps on one fixed batch (the first step's learning rate is 0 in warmup, so the
second is the one that moves the params). Init, losses, health metrics and every parameter must
match the 1-device run within float32 tolerance: the mesh decides where the arithmetic runs,
never what it computes.

The Pico widths (32, mlp 64, 2 heads) and the shapes vocabulary (256) divide every mesh axis size
used here (fsdp 8 or 4, tensor 2); a dimension that does not divide is an IndivisibleError in jax.
"""
import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import pretrain
from clusterstm_jax import checkpointing
from clusterstm_jax import sharding as sharding_lib
from clusterstm_jax import step as step_lib
from clusterstm_jax.data.builders import shapes as shapes_builder

pytestmark = pytest.mark.slow  # one XLA compile of the train step per mesh

VOCAB = shapes_builder.Shapes.builder_configs['tiny'].vocab_size  # the smoke config's tokenizer
NUM_STEPS = 2

# name -> (rule set, mesh); every mesh uses all 8 devices, one step case per rule set. FSDP over
# all 8 devices (the paper's mesh, FSDP8) is compiled by tests/test_paper_config.py; here its
# layout and compile report are checked, without running a step on it.
CASES = {
    'data8': ('data', (('data', 8), ('fsdp', 1), ('tensor', 1))),
    'data2_fsdp4': ('fsdp', (('data', 2), ('fsdp', 4), ('tensor', 1))),
    'fsdp4_tensor2': ('fsdp_tensor', (('data', 1), ('fsdp', 4), ('tensor', 2))),
}
ONE_DEVICE = ('data', (('data', -1), ('fsdp', 1), ('tensor', 1)))
FSDP8 = ('fsdp', (('data', 1), ('fsdp', 8), ('tensor', 1)))  # layouts and reports only


def smoke_config(rules, mesh):
  config = pretrain.get_config('smoke,mask=random')
  config.loss_weights.mrm = 0.0  # MRM needs the teacher; VTC, VTM and MLM remain
  config.sharding_rules = rules
  config.mesh = mesh
  return config


def make_batch(config):
  """One fixed host batch of the pipeline's shapes (a numpy rng on the host, never under jit)."""
  rng = np.random.default_rng(0)
  batch = step_lib.dummy_batch(config, config.batch_size)
  batch['video'] = rng.integers(0, 256, batch['video'].shape, dtype=np.uint8)
  batch['text'] = rng.integers(1, VOCAB, batch['text'].shape, dtype=np.int32)
  batch['labels'] = rng.integers(0, 4, batch['labels'].shape, dtype=np.uint8)
  batch['index'] = np.arange(config.batch_size, dtype=np.int32)
  return batch


def build(rules, mesh_axes, devices):
  config = smoke_config(rules, mesh_axes)
  mesh = sharding_lib.make_mesh(config.mesh, devices=devices)
  trainer = step_lib.build_trainer(config, vocab_size=VOCAB, mesh=mesh,
                                   total_steps=config.total_steps,
                                   warmup_steps=config.warmup_steps)
  return config, trainer


@functools.cache
def run(rules, mesh_axes, num_devices):
  """(device state after NUM_STEPS, host copy of it, host metrics of each step, host init)."""
  config, trainer = build(rules, mesh_axes, jax.devices()[:num_devices])
  state = trainer.init_state(jax.random.key(config.seed))
  init = jax.device_get(state)  # before the step donates it
  batch = sharding_lib.global_batch(make_batch(config), trainer.mesh)
  metrics = []
  for _ in range(NUM_STEPS):
    state, m = trainer.train_step(state, batch, jax.random.key(config.seed + 1))
    metrics.append(jax.device_get(m))
  return state, jax.device_get(state), metrics, init


@pytest.fixture(scope='module')
def reference():
  return run(*ONE_DEVICE, 1)


def leaves(tree):
  return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def per_device_bytes(tree) -> int:
  """Bytes that device 0 holds for a tree of sharded arrays."""
  return sum(a.addressable_shards[0].data.nbytes for a in jax.tree.leaves(tree))


def test_one_device_reference_trains(reference):
  _, host, metrics, _ = reference
  assert int(host['step']) == NUM_STEPS
  assert all(np.isfinite(float(v)) for m in metrics for v in m.values())
  # The second step has a nonzero learning rate, so its loss differs from the first.
  assert metrics[0]['lr'] == 0 and metrics[1]['lr'] > 0
  assert abs(float(metrics[1]['loss']) - float(metrics[0]['loss'])) > 1e-6


@pytest.mark.parametrize('case', sorted(CASES))
def test_same_step_on_8_devices_as_on_1(case, reference):
  rules, mesh_axes = CASES[case]
  state, host, metrics, init = run(rules, mesh_axes, 8)
  _, ref_host, ref_metrics, ref_init = reference
  assert len(state['params']['vision_proj']['kernel'].sharding.device_set) == 8
  for step, (got, want) in enumerate(zip(metrics, ref_metrics)):
    assert sorted(got) == sorted(want)
    for k in want:
      np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-6,
                                 err_msg=f'{case}: metric {k} at step {step}')
  got_p, want_p = leaves(host['params']), leaves(ref_host['params'])
  assert sorted(got_p) == sorted(want_p)
  lr = float(ref_metrics[-1]['lr'])
  for name, want in want_p.items():
    if "['key']['bias']" in name:
      # Softmax is shift-invariant per query, so the key bias's gradient is exactly zero and
      # Adam's normalisation turns float noise into moves of up to one learning rate.
      np.testing.assert_allclose(got_p[name], want, atol=lr, err_msg=f'{case}: param {name}')
    else:
      np.testing.assert_allclose(got_p[name], want, rtol=1e-5, atol=1e-6,
                                 err_msg=f'{case}: param {name}')
  # Init is sharding-invariant (partitionable threefry) ...
  for name, want in leaves(ref_init['params']).items():
    np.testing.assert_array_equal(leaves(init['params'])[name], want, err_msg=f'{case}: {name}')
  # ... and the params moved in step 2, so matching them is more than matching the init.
  moved = [n for n, v in leaves(ref_init['params']).items() if not np.allclose(v, want_p[n])]
  assert len(moved) > len(want_p) // 2


def test_rule_sets_shard_params_as_named():
  # Layouts come from shapes only (eval_shape): nothing is compiled or allocated here.
  def layout(rules, mesh_axes):
    _, trainer = build(rules, mesh_axes, jax.devices())
    return trainer.state_shardings, trainer.abstract_state

  def shard_fraction(shardings, abstract):
    full = sum(x.size for x in jax.tree.leaves(abstract))
    local = sum(int(np.prod(s.shard_shape(x.shape))) for s, x in
                zip(jax.tree.leaves(shardings), jax.tree.leaves(abstract)))
    return local / full

  shardings, abstract = layout(*CASES['data8'])
  assert all(s.is_fully_replicated for s in jax.tree.leaves(shardings['params']))
  assert shard_fraction(shardings['params'], abstract['params']) == 1.0

  shardings, abstract = layout(*FSDP8)
  kernel = shardings['params']['vision']['Transformer']['encoderblock_0']['MlpBlock_0'][
      'Dense_0']['kernel']
  assert kernel.spec == P('fsdp', None)  # [embed, mlp]: embed over fsdp
  assert kernel.shard_shape((32, 64)) == (4, 64)
  assert shard_fraction(shardings['params'], abstract['params']) < 0.25
  # Adam's moments follow their params' shardings.
  mu = shardings['opt_state'][1][0].mu
  assert jax.tree.leaves(mu) and jax.tree.all(
      jax.tree.map(lambda a, b: a == b, mu, shardings['params']))

  shardings, _ = layout(*CASES['fsdp4_tensor2'])
  kernel = shardings['params']['text']['text_encoder']['encoderblock_0']['MlpBlock_0'][
      'Dense_0']['kernel']
  assert kernel.spec == P('fsdp', 'tensor')
  assert kernel.shard_shape((32, 64)) == (8, 32)


def test_fsdp_params_are_sharded_on_device():
  state = run(*CASES['data2_fsdp4'], 8)[0]  # params split 4 ways, replicated over 'data'
  split = [n for n, a in leaves(state['params']).items()
           if 'fsdp' in jax.tree.leaves(tuple(a.sharding.spec))
           and a.addressable_shards[0].data.size * 4 == a.size]
  assert len(split) >= 10, split
  total = sum(a.nbytes for a in jax.tree.leaves(state['params']))
  assert per_device_bytes(state['params']) < 0.4 * total
  data_state = run(*CASES['data8'], 8)[0]
  assert per_device_bytes(data_state['params']) == total  # replicated: the check can fail


def test_checkpoint_restores_under_another_mesh(tmp_path):
  state, host, _, _ = run(*CASES['data8'], 8)
  config = smoke_config(*CASES['data8'])
  manager = checkpointing.make_manager(str(tmp_path / 'ckpt'), async_save=False,
                                       with_data=False)
  checkpointing.save(manager, NUM_STEPS, state, config)
  manager.wait_until_finished()
  manager.close()

  # Restore as 4 x 2 (data x fsdp) under the fsdp rules: each shard lands where it belongs.
  _, trainer = build('fsdp', (('data', 4), ('fsdp', 2), ('tensor', 1)), jax.devices())
  abstract = checkpointing.abstract_with_shardings(trainer.abstract_state,
                                                   trainer.state_shardings)
  reader = checkpointing.make_manager(str(tmp_path / 'ckpt'), async_save=False,
                                      with_data=False, read_only=True)
  restored = checkpointing.restore(reader, NUM_STEPS, abstract)
  reader.close()

  flat = leaves(restored)
  assert sorted(flat) == sorted(leaves(host))
  for (name, got), want in zip(flat.items(), jax.tree.leaves(trainer.state_shardings)):
    assert got.sharding.is_equivalent_to(want, got.ndim), name
  emb = restored['params']['text']['token_embedding']['embedding']
  assert emb.sharding.spec == P(None, 'fsdp')
  assert emb.addressable_shards[0].data.shape == (VOCAB, 16)
  want = leaves(host)
  for name, got in flat.items():
    np.testing.assert_array_equal(np.asarray(got), want[name], err_msg=name)
  # Optimizer moments are nonzero after two steps, so their equality is informative too.
  assert np.abs(np.asarray(restored['opt_state'][1][0].mu['vision_proj']['kernel'])).max() > 0


def test_compile_report_agrees_with_xla():
  from clusterstm_jax.tools import compile_report
  config = smoke_config(*FSDP8)
  # The report's bookkeeping, not the loss, is under test: VTC alone compiles in half the time
  # (the state, and so every byte count checked below, is the same).
  config.loss_weights.vtm = config.loss_weights.mlm = 0.0
  r = compile_report.report(config, vocab_size=VOCAB)
  assert r['devices'] == 8 and r['mesh'] == {'data': 1, 'fsdp': 8, 'tensor': 1}
  assert r['params_bytes'] < 0.25 * r['params_bytes_unsharded']
  # Adam keeps two moments per param, sharded like it (+ a few scalars).
  assert 2 * r['params_bytes'] <= r['opt_state_bytes'] < 2 * r['params_bytes'] + 64
  # XLA's per-device arguments are exactly the shards the report sums (+ step and rng key),
  # and the donated state is what XLA aliases to the outputs.
  state = r['params_bytes'] + r['opt_state_bytes']
  assert 0 <= r['xla_argument_bytes'] - (state + r['batch_bytes']) <= 64
  assert 0 <= r['xla_alias_bytes'] - state <= 64
  assert r['flops'] > 0 and r['xla_temp_bytes'] > 0
  assert 'fsdp=8' in compile_report.format_report(r)


def test_compile_report_names_a_dimension_that_does_not_divide():
  from clusterstm_jax.tools import compile_report
  assert compile_report.parse_mesh('data=2,fsdp=-1') == (('data', 2), ('fsdp', -1), ('tensor', 1))
  with pytest.raises(ValueError, match='bad --mesh item'):
    compile_report.parse_mesh('data=2,model=4')
  # 250 vocabulary entries cannot split 8 ways ('vocab' -> 'fsdp' in the fsdp rules).
  with pytest.raises(ValueError, match=r"\(250,\) does not divide over the mesh"):
    compile_report.report(smoke_config(*FSDP8), vocab_size=250)
