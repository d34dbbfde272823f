"""tools/timing.py: interleaving, equal warm-up, spreads and per-round ratios; the decode-rate
helpers of tools/input_rates.py."""
import numpy as np
import pytest

from clusterstm_jax.data import video_io
from clusterstm_jax.tools import input_rates
from clusterstm_jax.tools import timing

pytestmark = pytest.mark.unit


def test_every_program_is_warmed_alike_and_rounds_rotate():
  calls = []
  fns = {name: (lambda n=name: calls.append(n)) for name in 'abc'}
  times = timing.time_interleaved(fns, 3, warmup=2, rewarm=True)
  assert calls[:6] == list('aabbcc')
  # Rounds: each timed call preceded by one untimed call; the order rotates by one per round.
  assert calls[6:] == list('aabbcc' 'bbccaa' 'ccaabb')
  assert all(len(t['all']) == 3 and t['min'] <= t['median'] <= t['max'] for t in times.values())


def test_programs_may_report_their_own_seconds_and_ratios_are_per_round():
  own = {'x': iter([None, 1.0, 2.0, 4.0]), 'y': iter([None, 2.0, 2.0, 2.0])}
  times = timing.time_interleaved({k: (lambda k=k: next(own[k])) for k in own}, 3,
                                  warmup=1, rewarm=False)
  assert times['x']['all'] == [1.0, 2.0, 4.0]
  assert timing.ratio(times, 'x', 'y') == dict(min=0.5, median=1.0, max=2.0)
  assert timing.fmt(dict(min=0.001, median=0.002, max=0.003)) == '2.0 (1.0 - 3.0)'
  assert len(timing.load_average().split()) == 3


def test_block_runner_times_only_its_timed_calls():
  n = []
  run = timing.block_runner(lambda: n.append(1), timed=4, warm=3)
  assert run() >= 0 and len(n) == 7


def test_synthetic_clips_are_stored_as_the_builders_store_them():
  clip = input_rates.synthetic_clips(1, frames=2)[0]
  frame = video_io.decode_jpeg(clip['frames'][0])
  assert frame.shape == (224, 398, 3) and frame.dtype == np.uint8 and frame.std() > 10
  need = input_rates.cores_needed(100.0, 400e9, 0.5)
  # v4: 4 chips x 275 TFLOP/s x 0.5 / 400 GFLOP = 1375 clips/s -> 13.75 cores at 100 per core.
  assert need['v4']['clips_s'] == pytest.approx(1375.0)
  assert need['v4']['cores'] == pytest.approx(13.75)
