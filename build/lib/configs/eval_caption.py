r"""Evaluates a captioning model: BLEU-4, ROUGE-L and CIDEr of decoded captions.

  python -m clusterstm_jax.evaluate --config=configs/eval_caption.py --config.checkpoint=DIR
  ... --config.eval.beam_size=3 --config.eval.alpha=0.6      # beam search instead of greedy

DIR: an export or a training run of configs/finetune_caption.py. Prints the scores and a few
captions, and writes DIR/eval_caption.json (scores and the first `num_samples` captions).
"""
import ml_collections

from configs import eval_retrieval
from clusterstm_jax import config_lib


def evaluator():
  """This evaluator's settings; configs/finetune_caption.py reuses them in config.evals."""
  return ml_collections.ConfigDict(dict(
      type='caption',
      split='',       # '' = the model's data.eval_split
      batch_size=64,
      beam_size=1,    # 1 = greedy decoding
      alpha=0.0,      # GNMT length penalty of beam search (0.6 is usual)
  ))


def get_config(arg=None):
  config_lib.parse_arg(arg)
  config = eval_retrieval.command_config(evaluator())
  config.num_samples = 5  # captions printed and stored in the JSON
  return config
