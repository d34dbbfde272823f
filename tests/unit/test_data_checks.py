"""What a run or an evaluation checks before any build or training (data/checks.py, loop.check,
loading.apply_data_override), the builders' --overwrite, and missing media named by path."""
import json
import os

import pytest

from configs import eval_retrieval, finetune_retrieval
from clusterstm_jax import loop
from clusterstm_jax.data import checks
from clusterstm_jax.data.builders import common
from clusterstm_jax.errors import UserError
from tests import helpers
from tests.unit.builder_fixtures import build, write_json, write_text, write_video

pytestmark = pytest.mark.unit


def _msrvtt_fixture(root, videos=(0, 1, 2, 4)):
  for v in videos:
    write_video(root / "videos" / "all" / f"video{v}.mp4", v)
  write_json(root / "annotation" / "MSR_VTT.json", {"annotations": [
      {"image_id": f"video{v}", "caption": f"clip {v} caption {k}"} for v in range(6)
      for k in range(2)]})
  write_text(root / "msrvtt_data" / "MSRVTT_train.9k.csv", "video_id\nvideo0\nvideo1\nvideo2\n")
  write_text(root / "msrvtt_data" / "MSRVTT_JSFUSION_test.csv",
             "key,vid_key,video_id,sentence\nret4,msr4,video4,a dog\nret5,msr5,video5,a cat\n")


def _finetune(tmp_path, **data):
  config = finetune_retrieval.get_config('smoke')
  (tmp_path / 'data').mkdir(exist_ok=True)  # a real dataset's data_dir exists (its manual/)
  config.data.data_dir = str(tmp_path / 'data')
  config.init = ''
  for k, v in data.items():
    config.data[k] = v
  return config


def _nothing_built(tmp_path):
  built = [d for d in os.listdir(tmp_path / 'data') if d != 'manual'] \
      if os.path.isdir(tmp_path / 'data') else []
  assert built == [], built


def test_smoke_builder_config_does_not_reach_a_real_dataset(tmp_path):
  _msrvtt_fixture(tmp_path / 'data' / 'manual' / 'msrvtt')
  config = _finetune(tmp_path, name='msrvtt', tokenizer='')
  assert config.data.builder_config == 'tiny'  # what :smoke sets
  with pytest.raises(UserError, match=r"builder config 'tiny' is a shapes split \(:smoke sets "
                                      r"it\); dataset 'msrvtt' has \['1ka', 'official', 'qa'\]"):
    loop.check(config)
  _nothing_built(tmp_path)


def test_a_split_the_dataset_lacks_fails_before_the_build(tmp_path):
  config = _finetune(tmp_path, name='activitynet', builder_config='default')
  with pytest.raises(UserError, match=r"dataset 'activitynet' \(default\) has no split 'test'; "
                                      r"it has \['train', 'val_1', 'val_2'\]"):
    loop.check(config)
  config.data.update(name='msrvtt', builder_config='1ka', eval_split='val')
  with pytest.raises(UserError, match=r"has no split 'val'; it has \['train', 'test'\]"):
    loop.check(config)
  assert checks.eval_split('activitynet') == 'val_1'
  _nothing_built(tmp_path)


def test_the_tokenizer_is_checked_before_the_build(tmp_path):
  config = _finetune(tmp_path, name='msrvtt', builder_config='1ka')
  with pytest.raises(UserError, match=r"dataset 'msrvtt' needs config.data.tokenizer: .*"
                                      r"EXPORT/tokenizer.model"):
    loop.check(config)
  bad = tmp_path / 'vocab.txt'
  bad.write_text('[CLS]\n[SEP]\nhello\n')  # a WordPiece vocabulary without BERT's specials
  config.data.tokenizer = str(bad)
  with pytest.raises(UserError, match=r"WordPiece vocabulary .*vocab.txt lacks \[PAD\]"):
    loop.check(config)
  garbage = tmp_path / 'tok.model'
  garbage.write_bytes(b'\x00\x01 not a model')
  config.data.tokenizer = str(garbage)
  with pytest.raises(UserError, match=r"tok.model is not a SentencePiece model \("):
    loop.check(config)
  # Fine-tuning from an export: its tokenizer is the default.
  config.data.tokenizer, config.init = '', str(tmp_path / 'export')
  with pytest.raises(UserError, match=r"sentencepiece model not found: .*export/tokenizer.model"):
    loop.check(config)
  _nothing_built(tmp_path)


def test_eval_data_override_resets_config_and_split_and_checks_the_tokenizer(tmp_path):
  from clusterstm_jax import loading
  from clusterstm_jax.data import pipeline
  shapes = helpers.smoke_config(data_dir=tmp_path / 'data').data
  tokenizer = pipeline.get_tokenizer(shapes)

  class Run:  # a model's config as restored: data.name shapes, builder config 'tiny'
    data = shapes.copy_and_resolve_references()

  override = eval_retrieval.get_config().data
  override.name = 'activitynet'
  loading.apply_data_override(Run, override, tokenizer)
  assert (Run.data.name, Run.data.builder_config, Run.data.eval_split) == (
      'activitynet', 'default', 'val_1')
  assert Run.data.tokenizer == os.path.abspath(tokenizer.model_path)
  other = tmp_path / 'other.model'
  other.write_bytes(open(tokenizer.model_path, 'rb').read() + b'x')
  override.tokenizer = str(other)
  with pytest.raises(UserError, match=r'tokenizer mismatch: .*other.model is not the tokenizer '
                                      r'the model was trained with'):
    loading.apply_data_override(Run, override, tokenizer)


def test_missing_media_are_named_by_their_expected_path(tmp_path):
  root = tmp_path / 'manual'
  _msrvtt_fixture(root, videos=(0, 1))  # video2 of train and both test videos missing
  with pytest.raises(UserError, match=r"split 'test' has no usable media \(2 listed in the "
                                      r"annotations\); first: video4 at .*videos/all/video4.mp4 "
                                      r"\(missing\)"):
    build('msrvtt', tmp_path / 'data', root, config='1ka')
  write_video(root / 'videos' / 'all' / 'video4.mp4', 4)
  b = build('msrvtt', tmp_path / 'data', root, config='1ka')
  (first,) = b.skipped()['train']['first']
  assert first == {'video_id': 'video2', 'reason': 'missing',
                   'path': str(root / 'videos' / 'all' / 'video2.mp4')}


@pytest.mark.parametrize('flag', [False, True])
def test_the_build_command_rebuilds_only_with_overwrite(tmp_path, flag):
  root = tmp_path / 'data' / 'manual' / 'msrvtt'
  _msrvtt_fixture(root, videos=(0, 4))
  command = ('-m', 'clusterstm_jax.data.builders.real', '--dataset=msrvtt', '--config=1ka',
             f'--data_dir={tmp_path / "data"}', '--workers=0', '--num_frames=2',
             '--image_size=16')
  r = helpers.run_python(*command)
  assert r.returncode == 0, r.stderr[-2000:]
  assert 'train: 1 examples' in r.stdout and 'already built' not in r.stdout
  write_video(root / 'videos' / 'all' / 'video1.mp4', 1)  # the user fixes the data
  r = helpers.run_python(*command, *(['--overwrite'] if flag else []))
  assert r.returncode == 0, r.stderr[-2000:]
  if flag:
    assert 'train: 2 examples' in r.stdout and 'already built' not in r.stdout
  else:
    assert 'train: 1 examples' in r.stdout
    assert 'already built: nothing read; --overwrite rebuilds it' in r.stdout
  report = json.loads(open(tmp_path / 'data' / 'msrvtt' / '1ka_f2_s16' / '1.0.0' /
                           common.SKIPPED_FILE).read())
  assert report['train']['kept'] == (2 if flag else 1)
