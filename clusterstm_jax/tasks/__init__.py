"""Tasks: one home per objective, and `get`, the one place that dispatches on `config.task`.

  clusterstm    ClusterSTM pretraining (pretrain.py)
  siglip        the teacher's own training (siglip.py)
  retrieval_ft  retrieval fine-tuning: the pretraining task on every token, no teacher
  qa, caption   VideoQA and captioning heads (finetune.py)
"""
from __future__ import annotations

from clusterstm_jax.data import qa as qa_data
from clusterstm_jax.errors import UserError
from clusterstm_jax.masking import strategies as masking
from clusterstm_jax.tasks import finetune
from clusterstm_jax.tasks import pretrain
from clusterstm_jax.tasks import siglip
from clusterstm_jax.tasks.base import Task
from clusterstm_jax.tasks.base import TextSpec

NAMES = ('clusterstm', 'siglip', 'retrieval_ft', 'qa', 'caption')
__all__ = ['NAMES', 'Task', 'TextSpec', 'examples', 'get', 'name', 'needs_teacher',
           'uses_teacher_cache']


def name(config) -> str:
  """config.task, which every config sets explicitly."""
  task = config.get('task')
  if task not in NAMES:
    raise UserError(f'config.task={task!r} is not a task; known: {", ".join(NAMES)}')
  return task


def needs_teacher(config) -> bool:
  """Whether the task's step takes a frozen teacher (cluster masking, MRM targets)."""
  return name(config) == 'clusterstm' and pretrain.needs_teacher(config)


def uses_teacher_cache(config) -> bool:
  """Whether the step reads the teacher's mask and MRM target from an offline cache."""
  return name(config) == 'clusterstm' and pretrain.uses_cache(config)


def examples(config) -> str:
  """What one training example is (data/examples.py): a (video, question) pair for VideoQA on
  real data, the shapes clip with all its questions, else a (video, caption) pair."""
  return qa_data.examples_kind(config) if name(config) == 'qa' else 'captions'


def get(config, text: TextSpec, teacher=None) -> Task:
  """The task of `config`; `teacher` is the frozen teacher when needs_teacher(config)."""
  task = name(config)
  if task == 'clusterstm':
    return pretrain.build(config, text, teacher)
  if task == 'siglip':
    return siglip.build(config, text)
  if task == 'retrieval_ft':
    if config.mask.strategy in masking.CLUSTER_STRATEGIES or config.loss_weights.get('mrm', 0.0):
      raise UserError("task 'retrieval_ft' trains without a teacher: use a non-cluster "
                      'mask.strategy (ratio 0 keeps every token) and loss_weights.mrm = 0')
    return pretrain.build(config, text, None, name='retrieval_ft', takes_images=False)
  return finetune.build(config, text)
