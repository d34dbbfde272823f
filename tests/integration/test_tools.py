"""The mask tools (masks, coverage) end to end on the smoke config, with a smoke teacher
trained once for the module in a tmp workdir."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import pretrain
from tests import helpers
from clusterstm_jax.masking import strategies as masking
from clusterstm_jax.tools import coverage
from clusterstm_jax.tools import masks as vm

REPO = helpers.REPO
pytestmark = pytest.mark.integration


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """(config, tokenizer, teacher) of the smoke config; the teacher trains here (~1 min)."""
  config = pretrain.get_config('smoke')
  config.data.data_dir = str(tmp_path_factory.mktemp('data'))
  config.teacher.workdir = str(tmp_path_factory.mktemp('teacher'))
  config.teacher.config = os.path.join(REPO, 'configs', 'teacher.py') + ':smoke'
  _, tokenizer, teacher = coverage.load(config)
  return config, tokenizer, teacher


def test_render_frame_blends_clusters_and_outlines_kept_tokens():
  frame = np.full((4, 4, 3), 100, np.uint8)  # 2x2 tokens of patch 2
  clusters = np.array([0, 1, 1, -1])
  keep = np.array([True, False, False, False])
  img = vm.render_frame(frame, clusters, keep, patch=2, scale=4)  # tokens of 8x8 pixels
  assert img.shape == (16, 16, 3) and img.dtype == np.uint8
  blend = lambda c: np.round(0.55 * 100 + 0.45 * vm.PALETTE[c].astype(float))
  np.testing.assert_array_equal(img[4, 4], blend(0))     # inside kept token 0
  np.testing.assert_array_equal(img[4, 12], blend(1))    # token 1, cluster 1
  np.testing.assert_array_equal(img[12, 4], blend(1))    # token 2, also cluster 1
  np.testing.assert_array_equal(img[12, 12], [100] * 3)  # token 3: no cluster, no colour
  np.testing.assert_array_equal(img[0, 0], [0, 0, 0])    # kept: black outer border...
  np.testing.assert_array_equal(img[1, 3], [255] * 3)    # ...white ring inside it
  np.testing.assert_array_equal(img[7, 7], [0, 0, 0])
  np.testing.assert_array_equal(img[0, 8], blend(1))     # masked token 1: no outline
  with pytest.raises(ValueError, match='patch'):
    vm.render_frame(frame, clusters[:3], keep[:3], patch=2, scale=4)


def _outlined(tile: np.ndarray, token_px: int) -> np.ndarray:
  """Which tokens of an upscaled tile carry the white ring (palette blends never reach 240
  in every channel, see vm.PALETTE), as a flat bool [N]."""
  probe = tile[1::token_px, 1::token_px]
  return np.all(probe > 240, axis=-1).reshape(-1)


@pytest.mark.slow
def test_visualize_draws_the_masks_of_each_strategy(setup, tmp_path):
  config, tokenizer, teacher = setup
  scale, clips = 2, 2
  paths = vm.visualize(config, teacher, tokenizer, str(tmp_path), num_clips=clips, scale=scale,
                       seed=0)
  assert [os.path.basename(p) for p in paths] == ['masks_0.png', 'masks_1.png', 'masks.png']
  t, s = config.data.num_frames, config.data.image_size
  fs = s * scale
  one = Image.open(paths[0]).convert('RGB')
  rows = len(vm.STRATEGIES)
  assert one.size == (vm.LABEL_WIDTH + t * (fs + vm.GAP), vm.CAPTION_HEIGHT + rows * (fs + vm.GAP))
  both = Image.open(paths[-1])
  assert both.size == (one.width, 2 * one.height + vm.GAP)

  # The outlined tokens are exactly the kept tokens, recomputed here with the same key.
  import jax
  batch = next(coverage.eval_batches(config, tokenizer, clips, num_batches=1))
  masks = coverage.mask_fn(config, teacher, vm.STRATEGIES)(teacher.params, batch['video'],
                                                          jax.random.key(0))
  token_px = 8 * scale  # smoke: patch 8
  n = (s // 8) ** 2
  nc = masking.num_keep(n, config.mask.ratio)
  img = np.asarray(one)
  for r, strategy in enumerate(vm.STRATEGIES):
    y = vm.CAPTION_HEIGHT + r * (fs + vm.GAP)
    for f in range(t):
      x = vm.LABEL_WIDTH + f * (fs + vm.GAP)
      drawn = _outlined(img[y:y + fs, x:x + fs], token_px)
      assert drawn.sum() == nc, (strategy, f)
      np.testing.assert_array_equal(drawn, np.asarray(masks[strategy].keep_mask[0, f]))


@pytest.mark.slow
def test_coverage_stats_are_pooled_over_the_split(setup):
  config, tokenizer, teacher = setup
  keeps, objects = coverage.collect(coverage.with_ratio(config, 0.85), teacher, tokenizer,
                                    batch_size=24)  # 64 clips: batches of 24, 24, 16
  table = coverage.stats_table(keeps, objects)
  assert list(table) == list(coverage.STRATEGIES)
  n = (config.data.image_size // 8) ** 2  # smoke: patch 8
  nc = masking.num_keep(n, 0.85)
  for row in table.values():
    assert row['num_clips'] == 64  # the whole tiny test split, padding rows dropped
    for c in coverage.COLUMNS:
      assert math.isfinite(row[c]) and 0.0 <= row[c] <= 1.0, row
  assert table['tube']['temporal_recurrence'] == 1.0
  assert abs(table['random']['temporal_recurrence'] - nc / n) < 0.05

  # Pooled ratios of sums, recomputed from the same masks with plain numpy.
  present, on_obj = objects.any(axis=2), objects.any(axis=-1)
  for s, keep in keeps.items():
    assert keep.shape == objects.shape[:3] and (keep.sum(-1) == nc).all()
    covered = (objects & keep[..., None]).any(axis=2)
    assert table[s]['object_coverage'] == pytest.approx(covered.sum() / present.sum(), abs=1e-6)
    assert table[s]['kept_on_objects'] == pytest.approx((keep & on_obj).sum() / keep.sum(),
                                                        abs=1e-6)
    assert table[s]['object_area'] == pytest.approx(on_obj.mean(), abs=1e-6)


@pytest.mark.slow
def test_coverage_cli_prints_the_table(setup):
  config, _, _ = setup
  r = subprocess.run(
      [sys.executable, '-m', 'clusterstm_jax.tools.coverage', '--config=configs/pretrain.py:smoke',
       f'--config.data.data_dir={config.data.data_dir}',
       f'--config.teacher.workdir={config.teacher.workdir}', '--num_batches=1',
       '--batch_size=16'], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  lines = r.stdout.strip().splitlines()
  assert '16 clips' in lines[0]
  for strategy in coverage.STRATEGIES:
    row = next(line for line in lines if line.startswith(strategy + ' '))
    values = [float(v) for v in row.split()[1:]]
    assert len(values) == len(coverage.COLUMNS) and all(math.isfinite(v) for v in values)


@pytest.mark.parametrize('builder_config', ['tiny_distractors', 'tiny_transients'])
def test_coverage_counts_kept_tokens_on_transient_distractors(setup, builder_config):
  """On the distractor and the transient (stain) variants the tool adds each strategy's share
  of kept tokens on the transient content (label 255); random masking keeps it at about its
  share of all tokens."""
  config, _, _ = setup
  r = subprocess.run(
      [sys.executable, '-m', 'clusterstm_jax.tools.coverage', '--config=configs/pretrain.py:smoke',
       f'--config.data.data_dir={config.data.data_dir}', f'--config.data.builder_config={builder_config}',
       f'--config.teacher.workdir={config.teacher.workdir}', '--num_batches=2',
       '--batch_size=16'], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  line = r.stdout.strip().splitlines()[-1]
  assert line.startswith('kept tokens on transient distractors'), r.stdout
  area = float(line.split('they are ')[1].split('%')[0])
  shares = dict(part.rsplit(' ', 1) for part in line.split(': ', 1)[1].split(', '))
  assert set(shares) == set(coverage.STRATEGIES) and 0 < area < 50
  assert abs(float(shares['random'].rstrip('%')) - area) < max(3.0, area), line
  # Plain shapes have no distractors: no such line.
  plain = coverage.distractor_shares({'random': np.ones((1, 2, 4), bool)}, np.zeros((1, 2, 4), bool))
  assert plain == {'area': 0.0, 'random': 0.0}


def test_benchmark_cli_decode_rate_and_host_cores():
  """--what=decode: synthetic paper-shape clips through the loader's decode, and the cores a
  host needs at the given GFLOP per clip (no teacher, no step)."""
  r = subprocess.run(
      [sys.executable, '-m', 'clusterstm_jax.tools.benchmark', '--config=configs/pretrain.py:smoke',
       '--what=decode', '--decode_clips=2', '--gflop_per_clip=380'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  rate = next(line for line in r.stdout.splitlines() if 'clips per CPU second' in line)
  assert float(rate.split(':')[1].split()[0]) > 0, r.stdout
  cores = [line for line in r.stdout.splitlines() if 'cores decoding' in line]
  assert len(cores) == 2 and all(float(c.split('->')[1].split()[0]) > 0 for c in cores), r.stdout


def test_cache_benchmark_cli_times_live_and_cached_steps(setup):
  """The live step and the cached one on the same batch (the cached batch had kept the
  teacher's ids, which the cached step does not take) and the pass; the :paper FLOP ratio
  (minutes to lower) is left out."""
  config, _, _ = setup
  r = subprocess.run(
      [sys.executable, '-m', 'clusterstm_jax.tools.cache_benchmark',
       '--config=configs/pretrain.py:smoke', f'--config.data.data_dir={config.data.data_dir}',
       f'--config.teacher.workdir={config.teacher.workdir}', '--steps=2', '--pass_examples=16',
       '--flops_config='],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  rows = {line.split(':')[0].strip(): line.split(':', 1)[1] for line in r.stdout.splitlines()
          if ':' in line}
  assert '(loaded teacher)' in r.stdout
  for name in ('live / cached step time (medians)', 'pass per clip-view'):
    assert float(rows[name].split()[0]) > 0, (name, r.stdout)


def test_mrm_oracle_cli_prints_the_three_predictors(setup):
  config, _, _ = setup
  r = subprocess.run(
      [sys.executable, '-m', 'clusterstm_jax.tools.mrm_oracle', '--config=configs/pretrain.py:smoke',
       f'--config.data.data_dir={config.data.data_dir}',
       f'--config.teacher.workdir={config.teacher.workdir}', '--num_batches=2', '--batch_size=8'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  rows = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines()[2:]}
  mse = {k: float(rows[k][0]) for k in ('baseline', 'object_vs_background', 'per_object')}
  assert '16 clips' in r.stdout
  assert 0 < mse['per_object'] <= mse['object_vs_background'] <= mse['baseline'], r.stdout
  bad = subprocess.run(
      [sys.executable, '-m', 'clusterstm_jax.tools.mrm_oracle', '--config=configs/pretrain.py:smoke',
       f'--config.data.data_dir={config.data.data_dir}',
       f'--config.teacher.workdir={config.teacher.workdir}', '--config.loss_weights.mrm=0'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1 and 'mrm_oracle needs MRM on' in bad.stderr, bad.stderr[-500:]


def test_benchmark_cli_times_the_step_with_the_real_loader(setup):
  """--what=step,masking,unmasked,pipeline on the smoke config with its MRM teacher: the loader
  beside the step carries the teacher's ids too (it did not, and the step refused the batch);
  the masking and teacher programs are timed (they returned arrays, read as their seconds)."""
  config, _, _ = setup
  r = subprocess.run(
      [sys.executable, '-m', 'clusterstm_jax.tools.benchmark', '--config=configs/pretrain.py:smoke',
       f'--config.data.data_dir={config.data.data_dir}',
       f'--config.teacher.workdir={config.teacher.workdir}', '--what=step,masking,unmasked,pipeline',
       '--steps=2', '--blocks=2', '--block_steps=2', '--block_warm=3', '--batches=2'],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  rows = {line.split(':')[0].strip(): line.split(':', 1)[1] for line in r.stdout.splitlines()
          if ':' in line}
  for name in ('step ms', 'masking ms', 'masking / step', 'unmasked / ClusterSTM step time',
               'step alone ms (same batch)', 'step with the loader concurrently ms',
               'with loader / alone step time', 'loader alone examples/s'):
    assert math.isfinite(float(rows[name].split()[0])), (name, r.stdout)


@pytest.mark.slow
def test_ablate_cli_runs_stages_and_a_rerun_trains_nothing(tmp_path):
  """The one real end-to-end path of tools/ablate (the bookkeeping is unit-tested with fakes)."""
  out = tmp_path / 'sweep'
  cmd = [sys.executable, '-m', 'clusterstm_jax.tools.ablate', '--config=configs/pretrain.py:smoke',
         f'--config.data.data_dir={tmp_path / "data"}', f'--out={out}', '--seeds=1',
         '--steps=2', '--tune_steps=1', '--variants=clusterstm,random', '--datasets=tiny']
  r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  for v in ('clusterstm', 'random'):
    wd = out / 'tiny' / v / 'seed0'
    for stage in ('before', 'after'):
      ev = json.loads((wd / f'{stage}.json').read_text())
      assert sorted(ev) == ['test', 'val']
      assert len(ev['val']['t2v']) == len(ev['test']['v2t']) == 64  # tiny: 64 clips a split
      assert all(1 <= x <= 64 for x in ev['val']['t2v'])
  assert (out / 'teachers' / 'tiny' / 'export' / 'config.json').exists()
  md = (out / 'ablation.md').read_text()
  rows = [line for line in md.splitlines() if line.startswith('| random |')]
  assert len(rows) == 2 and '[' in rows[1]  # its R@1 row, and its paired difference with CI
  again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'Training the teacher' not in again.stdout and 'Zero-shot' not in again.stdout
  assert (out / 'ablation.md').read_text() == md
  # --tables_only rewrites the same tables (the training command recorded in them) from the runs.
  (out / 'ablation.md').unlink()
  tables = subprocess.run(cmd + ['--tables_only'], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
  assert tables.returncode == 0, tables.stderr[-3000:]
  assert (out / 'ablation.md').read_text() == md
