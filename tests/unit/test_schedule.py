"""The learning-rate schedule (trainer.make_optimizer): warmup + cosine, and FLIP-style unmasked
tuning on a cosine of its own when optax.unmasked_lr > 0."""
import numpy as np
import pytest

from clusterstm_jax import config_lib
from clusterstm_jax import trainer as trainer_lib

pytestmark = pytest.mark.unit


def _schedule(unmasked_steps, unmasked_lr, total=100, warmup=10):
  config = config_lib.load_config_file('configs/pretrain.py').copy_and_resolve_references()
  with config.unlocked():
    config.unmasked_steps = unmasked_steps
    config.optax.unmasked_lr = unmasked_lr
  _, schedule = trainer_lib.make_optimizer(config, total, warmup)
  return config.optax, np.array([float(schedule(s)) for s in range(total)])


def test_main_schedule_warms_up_then_decays_to_its_floor():
  o, lr = _schedule(0, 0.0)
  assert lr[0] == 0.0 and np.isclose(lr[10], o.lr) and np.all(np.diff(lr[10:]) <= 1e-12)
  assert lr[-1] < o.lr * 0.02


def test_unmasked_tuning_restarts_at_its_own_lr_and_decays_over_its_steps():
  o, plain = _schedule(20, 0.0)
  _, tuned = _schedule(20, 3e-4)
  np.testing.assert_array_equal(tuned[:80], plain[:80])  # the masked steps are untouched
  assert plain[80] < 0.15 * o.lr  # without it, the tuning steps get the main cosine's tail
  assert np.isclose(tuned[80], 3e-4)
  assert np.all(np.diff(tuned[80:]) < 0)
  # a cosine over the 20 tuning steps: half-way at half of the way to the floor
  floor = 3e-4 * o.min_lr_ratio
  assert np.isclose(tuned[90], floor + (3e-4 - floor) / 2, rtol=1e-4)
  assert tuned[99] < 3e-4 * 0.05
