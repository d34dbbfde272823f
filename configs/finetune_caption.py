r"""Fine-tunes a pretrained ClusterSTM for captioning on shapes: a causal caption decoder
cross-attending to the video tokens, trained with teacher forcing.

  python -m clusterstm_jax.train --config=configs/finetune_caption.py [--config.init=EXPORT]

Starts from the pretraining export in config.init (see configs/finetune_retrieval.py for the
commands that make it); the decoder starts from scratch. Ends with BLEU-4, ROUGE-L and CIDEr of
greedy captions of the test split (configs/eval_caption.py settings; beam search through
python -m clusterstm_jax.evaluate --config=configs/eval_caption.py --config.eval.beam_size=3).
A few minutes here. Knobs: smoke, steps=N, data=NAME (a real benchmark:
finetune_retrieval.BENCHMARKS).
"""
import ml_collections

from configs import eval_caption
from configs import finetune_retrieval
from clusterstm_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, smoke=False, steps=-1, data='')
  config = finetune_retrieval.finetune_config('caption', arg)
  del config['mask'], config['loss_weights']
  config.model.text_decoder = ml_collections.ConfigDict(dict(
      variant=config.model.text_variant, depth=None))  # None: the variant's depth
  config.evals = ml_collections.ConfigDict({'caption': eval_caption.evaluator()})
  if not arg.smoke:
    config.batch_size = 32
    config.total_steps = 300
    config.warmup_steps = 30
    config.optax.lr = 5e-4
  else:
    config.model.text_decoder.depth = 1
    config.evals.caption.batch_size = 16
  if arg.steps > 0:
    config.total_steps = arg.steps
  finetune_retrieval.benchmark_data(config, 'caption', arg.data)
  return config
