"""Sharding layouts without a step: what each rule set shards (from shapes only), and the compile
report's bookkeeping against XLA's own figures (one compile, FSDP over the 8 simulated devices).
The same step on every mesh: tests/integration/test_sharding.py."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tests import helpers

pytestmark = pytest.mark.unit

VOCAB = helpers.SHAPES_VOCAB
CASES = helpers.MESH_CASES
# FSDP over all 8 devices (the paper's mesh): layouts and reports only (its step is compiled by
# tests/unit/test_paper_config.py).
FSDP8 = ('fsdp', (('data', 1), ('fsdp', 8), ('tensor', 1)))


def teacherless_config(rules, mesh_axes):
  return helpers.teacherless_config(sharding_rules=rules, mesh=mesh_axes)


def test_rule_sets_shard_params_as_named():
  # Layouts come from shapes only (eval_shape): nothing is compiled or allocated here.
  def layout(rules, mesh_axes):
    _, trainer = helpers.build_trainer(rules, mesh_axes)
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


def test_compile_report_agrees_with_xla():
  from clusterstm_jax.tools import compile_report
  config = teacherless_config(*FSDP8)
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


def test_compile_report_schedules_for_memory():
  """XLA:CPU's default (concurrency) scheduler hoists every rematerialised forward; the report
  compiles with the memory-minimising one (docs/results.md, "Why bf16 and remat ...")."""
  from clusterstm_jax.tools import compile_report
  got = compile_report.report_xla_flags(
      '--xla_foo=1 --xla_force_host_platform_device_count=8 '
      '--xla_cpu_enable_concurrency_optimized_scheduler=true', 64).split()
  assert got == ['--xla_foo=1', '--xla_force_host_platform_device_count=64',
                 '--xla_cpu_enable_concurrency_optimized_scheduler=false']


def test_compile_report_names_a_dimension_that_does_not_divide():
  from clusterstm_jax.tools import compile_report
  assert compile_report.parse_mesh('data=2,fsdp=-1') == (('data', 2), ('fsdp', -1), ('tensor', 1))
  with pytest.raises(ValueError, match='bad --mesh item'):
    compile_report.parse_mesh('data=2,model=4')
  # 250 vocabulary entries cannot split 8 ways ('vocab' -> 'fsdp' in the fsdp rules).
  with pytest.raises(ValueError, match=r"\(250,\) does not divide over the mesh"):
    compile_report.report(teacherless_config(*FSDP8), vocab_size=250)
