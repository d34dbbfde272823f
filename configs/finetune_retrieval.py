r"""Fine-tunes a pretrained ClusterSTM for text-video retrieval: VTC + VTM on every token.

  python -m clusterstm_jax.train --config=configs/pretrain.py
  python -m clusterstm_jax.export --workdir=workdirs/pretrain
  python -m clusterstm_jax.train --config=configs/finetune_retrieval.py [--config.init=EXPORT]

Starts from the export in config.init (default: the pretraining run's), with no teacher and no
masking (UMT fine-tunes on all tokens), and ends with the re-ranked retrieval table on the test
split (configs/eval_retrieval.py settings). A few minutes here.
Knobs: smoke (the pretraining smoke model on tiny shapes, a few steps; init from
workdirs/pretrain_smoke/export), steps=N, data=NAME (a real benchmark with its protocol:
BENCHMARKS below; docs/datasets.md), e.g.
  python -m clusterstm_jax.train --config=configs/finetune_retrieval.py:data=didemo \
    --config.init=EXPORT --config.data.data_dir=DATA_DIR
"""
import ml_collections

from configs import eval_retrieval
from configs import pretrain
from clusterstm_jax import config_lib


# Real benchmarks per task: data fields set by the `data=NAME` knob. Retrieval: MSR-VTT 1k-A (one
# sentence per test video), MSVD (every caption a query), DiDeMo and ActivityNet Captions
# (paragraph-to-video: the record's caption is the paragraph; a paragraph needs more than a
# sentence's 32 tokens: 64, as Singularity and VindLU fine-tune with; the text length is the
# model's, so the export must have it too, e.g. from pretrain.py:paper). QA: MSRVTT-QA and
# MSVD-QA. Captioning: the official caption splits, scored against every reference.
BENCHMARKS = {
    'retrieval_ft': {
        'msrvtt': dict(name='msrvtt', builder_config='1ka', eval_split='test'),
        'msvd': dict(name='msvd', builder_config='official', eval_split='test'),
        'didemo': dict(name='didemo', builder_config='default', eval_split='test',
                       max_text_len=64),
        'activitynet': dict(name='activitynet', builder_config='default', eval_split='val_1',
                            max_text_len=64),
    },
    'qa': {'msrvtt': dict(name='msrvtt', builder_config='qa', eval_split='test'),
           'msvd': dict(name='msvd', builder_config='qa', eval_split='test')},
    'caption': {'msrvtt': dict(name='msrvtt', builder_config='official', eval_split='test'),
                'msvd': dict(name='msvd', builder_config='official', eval_split='test')},
}


def benchmark_data(config, task: str, name: str) -> None:
  """Sets config.data for benchmark `name` of `task` (BENCHMARKS); '' keeps shapes."""
  if not name:
    return
  if name not in BENCHMARKS[task]:
    raise config_lib.ConfigError(f'data={name!r}: known for this task: '
                                 f'{sorted(BENCHMARKS[task])}')
  config.data.update(BENCHMARKS[task][name])


def finetune_config(task: str, arg) -> ml_collections.ConfigDict:
  """The pretraining config (same model and data, so the export loads by name) made into a
  fine-tuning one: `task`, init from the pretraining export, no teacher, no MAE decoder."""
  config = pretrain.get_config('smoke' if arg.smoke else None)
  config.task = task
  config.init = 'workdirs/pretrain_smoke/export' if arg.smoke else 'workdirs/pretrain/export'
  del config['teacher'], config['mrm']
  config.model.decoder.out_dim = 0  # the MAE decoder only serves MRM; its weights are skipped
  config.unmasked_steps = 0  # pretraining's unmasked tuning: fine-tuning masks nothing anyway
  config.log_every_steps = 20
  config.checkpoint_every_steps = 1000
  if arg.smoke:
    config.total_steps = 3
    config.warmup_steps = 1
    config.log_every_steps = 1
  return config


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, smoke=False, steps=-1, data='')
  config = finetune_config('retrieval_ft', arg)
  # Ratio 0 keeps every token (keep_idx = all positions, ascending): no masking.
  config.mask.strategy = 'random'
  config.mask.ratio = 0.0
  config.loss_weights = ml_collections.ConfigDict(dict(vtc=1.0, vtm=1.0))
  config.evals = ml_collections.ConfigDict({'retrieval': eval_retrieval.evaluator()})
  if not arg.smoke:
    config.batch_size = 64
    config.total_steps = 200
    config.warmup_steps = 20
    config.optax.lr = 2e-4
  else:
    config.evals.retrieval.batch_size = 16
  if arg.steps > 0:
    config.total_steps = arg.steps
  benchmark_data(config, 'retrieval_ft', arg.data)
  return config
