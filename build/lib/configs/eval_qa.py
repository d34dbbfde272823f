r"""Evaluates a VideoQA model: answers ranked from the fixed answer list, top-1 accuracy.

  python -m clusterstm_jax.evaluate --config=configs/eval_qa.py --config.checkpoint=DIR

DIR: an export or a training run of configs/finetune_qa.py. Prints the accuracy over every
question of the test split, and per answer type (colour, shape, size, motion, count); writes
DIR/eval_qa.json.
"""
import ml_collections

from configs import eval_retrieval
from clusterstm_jax import config_lib


def evaluator():
  """This evaluator's settings; configs/finetune_qa.py reuses them in config.evals."""
  return ml_collections.ConfigDict(dict(
      type='qa',
      split='',        # '' = the model's data.eval_split
      batch_size=32,   # clips at once (every question of a clip in one row)
      k=128,           # answers kept by first-token probability, then re-scored (UMT: 128)
  ))


def get_config(arg=None):
  config_lib.parse_arg(arg)
  return eval_retrieval.command_config(evaluator())
