"""data/examples.py: what one training example is over records with several captions or
questions (pure Python sources, no build)."""
import numpy as np
import pytest

from clusterstm_jax.data import examples
from clusterstm_jax.errors import UserError

pytestmark = pytest.mark.unit

RECORDS = [
    {'id': 0, 'caption': b'a', 'captions': np.array([b'a', b'b', b'c'], object),
     'questions': np.array([b'q0', b'q1'], object), 'answers': np.array([b'x', b'y'], object)},
    {'id': 1, 'caption': b'', 'captions': np.array([], object),
     'questions': np.array([], object), 'answers': np.array([], object)},
    {'id': 2, 'caption': b'd', 'captions': np.array([b'd', b'e'], object),
     'questions': np.array([b'q2'], object), 'answers': np.array([b'z'], object)},
]


def test_every_video_caption_pair_is_an_example_and_empty_videos_are_counted(capsys):
  pairs = examples.examples(RECORDS, 'captions', what='fixture train')
  assert len(pairs) == 5
  assert [(p['id'], p['caption']) for p in (pairs[i] for i in range(5))] == [
      (0, b'a'), (0, b'b'), (0, b'c'), (2, b'd'), (2, b'e')]
  assert capsys.readouterr().out.strip() == (
      'fixture train: 5 (video, caption) pairs from 2 videos; 1 videos without a caption '
      'left out')
  assert RECORDS[0]['caption'] == b'a'  # the records themselves are not changed


def test_sampled_captions_are_drawn_per_visit():
  sampled = examples.examples(RECORDS, 'captions', captions='sample', announce=False)
  assert len(sampled) == 2
  rng = np.random.default_rng(0)
  drawn = {examples.pick_caption(dict(sampled[0]), rng)['caption'] for _ in range(50)}
  assert drawn == {b'a', b'b', b'c'}
  assert examples.pick_caption(dict(sampled[1]), None)['caption'] == b'd'  # eval: the first
  assert examples.pick_caption(dict(RECORDS[0]), rng) == RECORDS[0]  # not a sampled record


def test_questions_are_examples_and_one_caption_datasets_are_left_alone():
  qs = examples.examples(RECORDS, 'questions', announce=False)
  assert [(q['id'], list(q['questions']), list(q['answers'])) for q in (qs[i] for i in
                                                                         range(len(qs)))] == [
      (0, [b'q0'], [b'x']), (0, [b'q1'], [b'y']), (2, [b'q2'], [b'z'])]
  assert examples.examples(RECORDS, 'captions', multi_caption=False) is RECORDS
  assert examples.examples(RECORDS, 'records') is RECORDS
  with pytest.raises(UserError, match="config.data.captions='each'"):
    examples.examples(RECORDS, 'captions', captions='each')
  with pytest.raises(UserError, match='has no questions'):
    examples.examples([{'captions': []}], 'questions')
