r"""Evaluates a trained model: an export or a training run, on its task's evaluator.

  python -m clusterstm_jax.evaluate --config=configs/eval_retrieval.py --config.checkpoint=DIR
  python -m clusterstm_jax.evaluate --config=configs/eval_qa.py --config.checkpoint=DIR
  python -m clusterstm_jax.evaluate --config=configs/eval_caption.py --config.checkpoint=DIR

DIR is an export (python -m clusterstm_jax.export) or a training run (its workdir, its
checkpoints/ dir or one step dir). It prints a table and writes JSON to --config.output
(default DIR/eval_<type>.json). The evaluators (evaluators/) are the ones fine-tuning runs call
at their end, given the task's prediction functions:
  retrieval  contrastive scores pick each query's top-k candidates, the matching (VTM) head
             re-ranks them (UMT); t2v and v2t R@1/5/10, MdR, MnR, and the contrastive-only ones;
  qa         open-ended VideoQA, answers ranked from the fixed answer list; top-1 accuracy;
  caption    greedy or beam decoding; BLEU-4, ROUGE-L, CIDEr.
"""
from __future__ import annotations

from absl import flags

from clusterstm_jax import cli
from clusterstm_jax import compile_cache
from clusterstm_jax import loading

FLAGS = flags.FLAGS
cli.define_config(help_='configs/eval_<type>.py')


def main() -> None:
  compile_cache.use(FLAGS.config)  # config.compile_cache, else the user cache
  loading.evaluate_checkpoint(FLAGS.config)


def console() -> None:
  """The `clusterstm-evaluate` console script (pyproject.toml)."""
  cli.run(main)


if __name__ == '__main__':
  cli.run(main)
