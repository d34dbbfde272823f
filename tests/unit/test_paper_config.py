"""The paper-scale recipe lowers and compiles on CPU (8 simulated devices), without data or weights."""
import jax
import pytest

from configs import pretrain
from clusterstm_jax import sharding as sharding_lib
from clusterstm_jax import trainer as trainer_lib
from clusterstm_jax.models import text as text_lib
from clusterstm_jax.tasks import base as tasks_base
from clusterstm_jax import teacher as teacher_lib

pytestmark = [pytest.mark.unit, pytest.mark.slow]
# conftest.py turns XLA's fusion emitters off for the suite's small programs; this big one
# compiles 2.3x slower without them (266 s against 113 s here), so they are back on for it.
PAPER_COMPILE_OPTIONS = {'xla_cpu_use_fusion_emitters': True}


def test_paper_config_values():
  c = pretrain.get_config('paper')
  assert (c.model.vision_variant, c.data.image_size, c.data.num_frames) == ('B/16', 224, 4)
  assert c.mask.ratio == 0.85 and c.mask.strategy == 'clusterstm'
  assert (c.optax.lr, c.optax.wd, c.batch_size) == (1e-4, 0.02, 2048)
  assert (c.total_epochs, c.warmup_epochs) == (10.0, 1.0)
  assert tasks_base.grid(c) == (4, 14, 14)
  # UMT's mix: CC3M images alternating with WebVid videos, batches of the same size.
  assert (c.images.every, c.images.name, c.images.batch_size) == (2, 'cc3m', -1)
  # The memory policy (docs/results.md, "Memory policy").
  assert (c.dtype, c.remat, c.microbatches) == ('bfloat16', 'full', 1)
  # UMT's recipe: BERT text tower, SigLIP image tower for the video, drop path 0.1, no
  # gradient clipping, images masked at 0.5; the teacher reads SigLIP's own ids.
  assert c.model.text_options.to_dict() == text_lib.BERT_OPTIONS
  assert (c.model.drop_path, c.optax.grad_clip_norm, c.images.mask_ratio) == (0.1, 0.0, 0.5)
  assert c.model.vision_options.to_dict() == dict(posemb='learn')
  assert (c.teacher.tokenizer.bos, c.teacher.tokenizer.pad) == (False, 'eos')
  assert c.loss_weights.mrm > 0 and c.data.max_text_len == 32 and c.teacher.model.text_len == 64


def test_paper_train_step_compiles_on_cpu():
  config = pretrain.get_config('paper')
  mesh = sharding_lib.make_mesh(config.mesh)
  teacher = teacher_lib.abstract_teacher(config, mesh)
  # The student's vocabulary is BERT-base-uncased's WordPiece (30522), the teacher's SigLIP's.
  trainer = trainer_lib.build_trainer(config, vocab_size=30522, mesh=mesh, total_steps=100,
                                   warmup_steps=10, teacher=teacher)
  text = trainer.abstract_state['params']['text']
  # Padded to a multiple of 128 (30522 does not split over the FSDP axis; text.load fills
  # the first 30522 rows).
  assert text['token_embedding']['embedding'].shape == (30592, 768)
  # BERT's architecture, what text.load() fills from the checkpoint (abstract weights here).
  assert 'embedding_norm' in text and 'encoder_norm' not in text['text_encoder']
  lowered = trainer.lower(8)
  # Two token streams, MRM on: the student's 32 BERT ids and the teacher's 64 SigLIP ids.
  hlo = lowered.as_text()
  assert 'tensor<8x32xi32>' in hlo and 'tensor<8x64xi32>' in hlo
  compiled = lowered.compile(compiler_options=PAPER_COMPILE_OPTIONS)
  flops = compiled.cost_analysis()
  flops = flops[0] if isinstance(flops, (list, tuple)) else flops
  # Per device: ViT-B teacher + student + decoder on 8 clips x 4 frames, split over 8 devices.
  assert flops['flops'] > 1e11
  # Parameters are FSDP-sharded: the student's patch embedding is split over 8 devices.
  kernel = trainer.abstract_state['params']['vision']['embedding']['kernel']
  assert kernel.shape == (16, 16, 3, 768)
  spec = trainer.state_shardings['params']['vision']['embedding']['kernel'].spec
  assert 'fsdp' in jax.tree.leaves(tuple(spec))
  # The image step (CC3M batches, T = 1) is its own program; lowering it checks its shapes
  # (compiling it too would double this test's minutes for little more).
  image = trainer.lower(8, image=True).as_text()
  assert 'tensor<8x1x224x224x3xui8>' in image and 'tensor<8x4x224x224x3xui8>' not in image
