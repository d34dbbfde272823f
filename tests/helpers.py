"""Helpers shared by the test files (`from tests import helpers`).

- the smoke configs the tests train, build or compile, written once;
- commands in a fresh interpreter, and the metrics a run logs;
- numpy references and the 2 x 2 x 2 test mesh of the model tests.
"""
import json
import os
import subprocess
import sys
from typing import NamedTuple

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from configs import finetune_caption, finetune_qa, finetune_retrieval, pretrain
from clusterstm_jax import config_lib
from clusterstm_jax import sharding as sharding_lib
from clusterstm_jax import teacher as teacher_lib
from clusterstm_jax import trainer as trainer_lib
from clusterstm_jax.data.builders import shapes as shapes_builder
from clusterstm_jax.tasks import siglip as siglip_task

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------- smoke configs
# The smoke config with no teacher to train or load: random masking and no MRM (MRM's target
# comes from the teacher); VTC, VTM and MLM remain.
TEACHERLESS = 'smoke,mask=random'
NO_MRM = {'loss_weights.mrm': 0.0}
# The smoke configs' tokenizer (the tiny shapes split's).
SHAPES_VOCAB = shapes_builder.Shapes.builder_configs['tiny'].vocab_size
# name (= the evaluator's type and its configs/eval_<name>.py) -> (fine-tuning config, task)
FINETUNES = {'retrieval': (finetune_retrieval, 'retrieval_ft'),
             'qa': (finetune_qa, 'qa'),
             'caption': (finetune_caption, 'caption')}


def smoke_config(arg='smoke', *, data_dir=None, teacher_workdir=None, **overrides):
  """configs/pretrain.py's config for `arg` (default 'smoke'), checkpointing synchronously,
  with the tiny dataset in `data_dir` and the smoke teacher in `teacher_workdir` where given,
  and dotted-path `overrides` (config_lib.with_overrides)."""
  config = pretrain.get_config(arg)
  if data_dir is not None:
    config.data.data_dir = str(data_dir)
  if teacher_workdir is not None:
    config.teacher.workdir = str(teacher_workdir)
  config.async_checkpointing = False
  return config_lib.with_overrides(config, **overrides)


class SharedSmoke(NamedTuple):
  """The session's tiny shapes split and smoke teacher (conftest.py's `shared_smoke`): the split
  is built and the teacher trained on first use, by whichever run needs them."""
  data_dir: str
  teacher_workdir: str

  def config(self, arg='smoke', **overrides):
    """smoke_config(arg, **overrides) on this dataset and teacher."""
    return smoke_config(arg, data_dir=self.data_dir, teacher_workdir=self.teacher_workdir,
                        **overrides)


def teacherless_config(**overrides):
  """The smoke config without a teacher (TEACHERLESS, NO_MRM), then `overrides`."""
  return smoke_config(TEACHERLESS, **{**NO_MRM, **overrides})


# ----------------------------------------------------------------------------- meshes
# name -> (rule set, mesh); every mesh uses all 8 simulated devices. The Pico widths (32, mlp 64,
# 2 heads) and the shapes vocabulary (256) divide every mesh axis size used (fsdp 8 or 4,
# tensor 2); a dimension that does not divide is an IndivisibleError in jax.
MESH_CASES = {
    'data8': ('data', (('data', 8), ('fsdp', 1), ('tensor', 1))),
    'data2_fsdp4': ('fsdp', (('data', 2), ('fsdp', 4), ('tensor', 1))),
    'fsdp4_tensor2': ('fsdp_tensor', (('data', 1), ('fsdp', 4), ('tensor', 2))),
}


def build_trainer(rules, mesh_axes, devices=None):
  """(config, trainer) of the teacherless smoke config under `rules` on `mesh_axes`."""
  config = teacherless_config(sharding_rules=rules, mesh=mesh_axes)
  mesh = sharding_lib.make_mesh(config.mesh, devices=devices or jax.devices())
  trainer = trainer_lib.build_trainer(config, vocab_size=SHAPES_VOCAB, mesh=mesh,
                                      total_steps=config.total_steps,
                                      warmup_steps=config.warmup_steps)
  return config, trainer


# Logical-axis rules of the model tests' 2 x 2 x 2 mesh (every axis of the modules sharded).
MODEL_RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"),
               ("heads", "tensor"), ("vocab", "tensor"))


def model_mesh() -> Mesh:
  """The 8 simulated devices as data x fsdp x tensor = 2 x 2 x 2."""
  return Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))


def born_sharded_vs_plain(model, *args, key=None, **apply_kw):
  """Born-sharded init under model_mesh() and MODEL_RULES, jitted apply; returns (the sharded
  params, the sharded output, the output of the same params gathered on one device)."""
  key = jax.random.key(0) if key is None else key
  mesh = model_mesh()
  abstract = jax.eval_shape(model.init, key, *args)
  with jax.set_mesh(mesh), nn.logical_axis_rules(MODEL_RULES):
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, MODEL_RULES)
    params = jax.jit(model.init, out_shardings=shardings)(key, *args)
    sharded = jax.jit(lambda p, *a: model.apply(p, *a, **apply_kw))(params, *args)
  plain = jax.jit(lambda p, *a: model.apply(p, *a, **apply_kw))(
      jax.device_get(nn.unbox(params)), *args)
  return params, sharded, plain


# ----------------------------------------------------------------------------- runs
def run_python(*args, timeout=300, **kwargs):
  """`python ARGS` in a fresh interpreter at the repository root (same XLA flags and
  compilation cache as this session, through the environment), output captured as text."""
  return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, **kwargs)


def metrics_rows(workdir):
  """Every row of a run's metrics.jsonl."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def losses(workdir, key='loss'):
  """{step: value} of one logged metric (the loss by default) of a run."""
  return {r['step']: r[key] for r in metrics_rows(workdir) if key in r}


# ----------------------------------------------------------------------------- numpy references
def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_layer_norm(x, p, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * np.asarray(p["scale"]) + np.asarray(p["bias"])


def np_gelu(x):  # flax's nn.gelu default is the tanh approximation
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def flat(tree):
  """{'a/b/c': leaf} of a pytree of dicts."""
  return {"/".join(str(getattr(p, "key", p)) for p in path): x
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def random_teacher(mesh, vocab_size: int, seed: int = 1) -> teacher_lib.Teacher:
  """The smoke teacher (configs/teacher.py:smoke) with random weights, replicated on `mesh`."""
  tconfig = config_lib.load_config_file('configs/teacher.py:smoke')
  tmodel = siglip_task.make_model(tconfig, vocab_size)
  tparams = nn.unbox(jax.jit(lambda r: tmodel.init(r, *siglip_task.init_inputs(tconfig)))(
      jax.random.key(seed))['params'])
  repl = sharding_lib.replicated(mesh)
  return teacher_lib.Teacher(model=tmodel, params=jax.device_put(tparams, repl),
                             param_shardings=jax.tree.map(lambda _: repl, tparams))


def random_bert(vocab_size: int, hidden: int, layers: int, heads: int, mlp: int, positions: int):
  """A transformers BertForMaskedLM (eval mode) with random weights, every parameter nudged so
  that LayerNorm scales != 1, biases != 0 and token types != 0 all show in a comparison.
  Needs torch and transformers (callers skip without them)."""
  import torch  # lazy: a test-only dependency, only for the BERT parity tests
  import transformers  # lazy: as torch
  cfg = transformers.BertConfig(vocab_size=vocab_size, hidden_size=hidden,
                                num_hidden_layers=layers, num_attention_heads=heads,
                                intermediate_size=mlp, max_position_embeddings=positions,
                                hidden_act='gelu', layer_norm_eps=1e-12)
  torch.manual_seed(0)
  model = transformers.BertForMaskedLM(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model
