r"""Fine-tunes a pretrained ClusterSTM for VideoQA on shapes: an answer decoder cross-attending
to the fused question+video features, trained on every question of each clip.

  python -m clusterstm_jax.train --config=configs/finetune_qa.py [--config.init=EXPORT]

Starts from the pretraining export in config.init (see configs/finetune_retrieval.py for the
commands that make it); the answer decoder starts from scratch. Ends with the top-1 accuracy
over every question of the test split (answers ranked from shapes.ANSWER_VOCAB; settings of
configs/eval_qa.py). A few minutes here. Knobs: smoke, steps=N, data=NAME (a real benchmark:
finetune_retrieval.BENCHMARKS).

MSRVTT-QA (MSVD-QA: msvd), from a pretraining export, tokenizer = the export's
(docs/datasets.md):
  python -m clusterstm_jax.train --config=configs/finetune_qa.py:data=msrvtt \
    --config.init=EXPORT --config.data.data_dir=DATA_DIR
"""
import ml_collections

from configs import eval_qa
from configs import finetune_retrieval
from clusterstm_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, smoke=False, steps=-1, data='')
  config = finetune_retrieval.finetune_config('qa', arg)
  del config['mask'], config['loss_weights']
  config.model.text_decoder = ml_collections.ConfigDict(dict(
      variant=config.model.text_variant, depth=None))  # None: the variant's depth
  config.qa = ml_collections.ConfigDict(dict(
      # Shapes batches hold every question of a clip: the most a clip has (2 counts + 5 per
      # object, 3 objects). Real data: one (video, question) pair per row (data/qa.py).
      max_questions=17,
      question_len=16,
      answer_len=4,   # bos, one-word answer (one piece on shapes), eos, pad
      # Real data: the answer list is the most frequent training answers, this many (0: 1,500
      # on MSRVTT-QA, 1,000 on MSVD-QA, as UMT and VindLU). Shapes: its own list.
      num_answers=0,
  ))
  config.evals = ml_collections.ConfigDict({'qa': eval_qa.evaluator()})
  if not arg.smoke:
    config.batch_size = 32  # clips, ~11 questions each
    config.total_steps = 300
    config.warmup_steps = 30
    config.optax.lr = 5e-4
  else:
    config.model.text_decoder.depth = 1
    config.evals.qa.batch_size = 16
  if arg.steps > 0:
    config.total_steps = arg.steps
  finetune_retrieval.benchmark_data(config, 'qa', arg.data)
  if arg.data:  # real answers: several pieces (the error names the length the list needs)
    config.qa.answer_len = 8
  return config
