r"""Evaluates a model on text-video retrieval: contrastive top-k re-ranked by the matching head.

  python -m clusterstm_jax.evaluate --config=configs/eval_retrieval.py --config.checkpoint=DIR

DIR: an export or a training run of any ClusterSTM task (a pretrained one gives zero-shot
numbers). On another dataset than the model's (zero-shot transfer, or a fine-tuned model on
another split): --config.data.name=msrvtt --config.data.builder_config=1ka (docs/datasets.md);
the export's own tokenizer is used. Prints t2v and v2t R@1/5/10, MdR, MnR, re-ranked (UMT) and
contrastive only, and writes DIR/eval_retrieval.json (another dataset:
DIR/eval_retrieval_<dataset>_<config>.json). A few minutes on the shapes test split here
(2 x 1000 x 128 pairs).
"""
import ml_collections

from clusterstm_jax import config_lib


def evaluator():
  """This evaluator's settings; fine-tuning configs reuse them in config.evals."""
  return ml_collections.ConfigDict(dict(
      type='retrieval',
      split='',               # '' = the model's data.eval_split
      batch_size=128,         # clips encoded at once
      k=128,                  # candidates re-ranked per query (UMT: 128); clipped to the split
      rerank_batch_size=256,  # (query, candidate) pairs per matching-head call
  ))


def command_config(evaluator_config):
  """The command-line fields shared by the eval_*.py configs."""
  config = ml_collections.ConfigDict()
  config.checkpoint = ''  # an export dir, or a run's workdir / checkpoints dir / step dir
  config.output = ''      # JSON path; '' = CHECKPOINT/eval_<type>.json
  config.compile_cache = ''  # '' = ~/.cache/clusterstm_jax/jax_cache, a directory, or 'off'
  config.eval = evaluator_config
  # Applied on top of the model's own config.data; '' keeps the model's value. Another `name`
  # resets builder_config to that dataset's default and eval_split to its benchmark test split.
  config.data = ml_collections.ConfigDict(dict(
      name='',            # shapes, msrvtt, msvd, didemo, activitynet
      builder_config='',  # e.g. msrvtt: 1ka (retrieval), official (captioning), qa
      eval_split='',      # e.g. activitynet: val_1
      data_dir='',        # where the datasets are built (data moved to another machine)
      tokenizer='',       # must be the model's own (checked); '' = the export's
  ))
  return config


def get_config(arg=None):
  config_lib.parse_arg(arg)
  return command_config(evaluator())
