r"""ClusterSTM pretraining.

Default (no arg): the embedded "shapes" dataset on this CPU; prints a zero-shot retrieval table.
  python -m clusterstm_jax.train --config=configs/pretrain.py
Knobs (comma-separated after ':'):
  paper       the paper-scale recipe: ViT-B/16 student (from SigLIP's image tower, drop path
              0.1), BERT-base text tower (BERT weights and WordPiece ids), SigLIP B/16 teacher
              reading its own SentencePiece ids, 4 frames at 224 px, r = 0.85 (images 0.5),
              WebVid-2M + CC3M, AdamW lr 1e-4 wd 0.02, no gradient clipping, cosine over 10
              epochs (1 warm-up), global batch 2048, FSDP. Needs the data, the SigLIP and BERT
              weights and both tokenizers (docs/datasets.md, docs/pretrained_weights.md).
  smoke       a few steps of a tiny model on the tiny shapes split (tests and CI).
  mask=NAME   masking strategy: clusterstm, clusterstm_random_pick, random, tube.
  images      mixed image and video batches on shapes: every 2nd step trains on single frames
              of the train clips with their captions (T = 1), a stand-in for CC3M. `:paper`
              always alternates CC3M images with WebVid (--config.images.every=0 turns it off).
"""
import ml_collections

from configs import common
from clusterstm_jax import config_lib
from clusterstm_jax.data.pipeline import default_data_config
from clusterstm_jax.data.pipeline import default_image_config
from clusterstm_jax.masking.strategies import default_mask_config


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, paper=False, smoke=False, mask='clusterstm', steps=-1, ratio=0.85,
                             images=False)
  config = ml_collections.ConfigDict()
  config.task = 'clusterstm'
  common.training_config(config)

  config.data = default_data_config()
  config.data.num_frames = 4
  config.data.image_size = 64
  # Decoding overlapped with the step: grain workers from the host's cores, 2 batches ahead
  # on the devices (data/prefetch.py; docs/results.md, "Input pipeline").
  config.data.worker_count = -1
  # Image batches (T = 1) alternating with the video batches; off unless `images` or `paper`.
  config.images = default_image_config()

  config.model = ml_collections.ConfigDict()
  # The student's video tower is the big part of the model, as at the paper's scale (ViT-B/16
  # against a text tower it shares with VTM/MLM): Nano (width 128, depth 3) against the Mu
  # teacher and text tower (width 64, depth 2). Masking only saves compute where the video
  # tower dominates; with a Mu video tower the text side, the teacher and MRM outweigh it and
  # the unmasked student costs only 1.4x a ClusterSTM step (docs/results.md).
  config.model.vision_variant = 'Nano/8'
  config.model.text_variant = 'Mu'
  config.model.text_depth = None
  config.model.text_fusion_layers = 1
  config.model.embed_dim = 64
  config.model.temp_init = 0.07
  config.model.dropout = 0.0
  # An external image tower for the student (CLIP/SigLIP/ViT; docs/pretrained_weights.md).
  config.model.init = ''
  # A Hugging Face BERT checkpoint for the student's text tower (models/text.py load()); it needs
  # text_options=text.BERT_OPTIONS and BERT's WordPiece vocab.txt as config.data.tokenizer.
  config.model.text_init = ''
  # Stochastic depth of the video tower's blocks (the last block's rate); 0 = off.
  config.model.drop_path = 0.0
  # MAE-style decoder rebuilding every token in the teacher's width (out_dim) for MRM; narrow
  # and shallow against the encoder, as MAE's and UMT's (it runs over the full grid).
  config.model.decoder = ml_collections.ConfigDict(dict(
      width=32, depth=1, num_heads=2, mlp_dim=64, out_dim=64))

  config.mask = default_mask_config()
  config.mask.strategy = arg.mask
  config.mask.ratio = arg.ratio

  # The frozen teacher whose tokens drive the cluster masking (and the MRM target). With no
  # export given, it is trained once with `config` into `workdir` and reused after.
  config.teacher = ml_collections.ConfigDict()
  config.teacher.export = ''
  config.teacher.workdir = 'workdirs/teacher'
  config.teacher.config = 'configs/teacher.py'
  # External weights (big_vision .npz or Hugging Face safetensors) and the architecture they
  # need; used instead of export/workdir when `init` is set (see models/siglip.py load()).
  config.teacher.init = ''
  # An offline teacher cache (python -m clusterstm_jax.tools.teacher_cache): the step reads the
  # mask and MRM target of a stored view of each clip and runs no teacher. '' = live teacher.
  config.teacher.cache = ''
  config.teacher.model = ml_collections.ConfigDict(dict(
      vision_variant='B/16', text_variant='B', vocab_size=32000, text_len=64, out_dim=None))
  # The teacher's own tokenizer: batches carry `teacher_text`, the captions in its ids, at its
  # text tower's length; MRM's text feature is computed from those. model: a SentencePiece
  # .model; '' = the teacher export's (shapes: the student's, so the ids are the same). bos /
  # pad / canonicalize: our layout ([CLS] first, pad 0); a public SigLIP's is bos=False,
  # pad='eos', canonicalize=True (lower case, no punctuation; data/tokenizer.py).
  config.teacher.tokenizer = ml_collections.ConfigDict(dict(
      model='', bos=True, pad='pad', canonicalize=False))

  # Masked relevance modelling: teacher MAP head over k x k windows x teacher text feature.
  # standardize: the target is standardised per clip (the raw cosines vary by ~0.03 inside a
  # clip: unscaled, MSE was ~0.15% of the loss and lost to a per-clip constant); the student's
  # relevance <decoded, e/|e|> is unbounded (no unit decoded tokens) and centred per clip, so it
  # can regress the z-scores and shrink towards 0 where unsure. The best per-clip constant
  # scores the target's variance over the masked places (~0.8-1; logged as mrm_baseline).
  config.mrm = ml_collections.ConfigDict(dict(window=3, in_batch=False, standardize=True))
  config.loss_weights = ml_collections.ConfigDict(dict(vtc=1.0, vtm=1.0, mlm=1.0, mrm=1.0))
  # VTM's negatives: 'hard' (UMT: drawn from the softmax of the VTC similarities), 'random', or
  # 'mixed' (each hard with probability hard_fraction, else uniform). Shapes' hard negatives are
  # compositional near-misses a from-scratch fusion encoder cannot tell apart in 180 steps: with
  # 'hard' only, VTM stayed at the label prior's 0.6365 (docs/results.md, "VTM's negatives").
  config.vtm = ml_collections.ConfigDict(dict(negatives='mixed', hard_fraction=0.5))

  config.batch_size = 64
  config.eval_batch_size = 128
  config.total_steps = 180
  config.warmup_steps = 20
  # FLIP's unmasked tuning: the last steps see every token (VTC/VTM/MLM; no MRM, no teacher).
  # A student trained only on the ~15% of tokens ClusterSTM keeps (mostly on objects) pools a
  # very different mean over all tokens; a few unmasked steps close that train/test gap for
  # full-token evaluation (docs/method.md, "Zero-shot evaluation"). 0 = off (the paper recipe).
  config.unmasked_steps = 20
  # Those steps on a cosine of their own from 3e-4 (0.3 x the peak), not the main schedule's
  # tail (~1e-4 -> 1e-5), where the features could barely adapt: after 400 cluster-masked steps
  # that tail left t2v R@1 at 14.9, 3e-4 reached 21.0 (docs/results.md, "Unmasked tuning").
  config.optax.unmasked_lr = 3e-4
  config.optax.lr = 1e-3
  config.optax.wd = 0.02
  config.log_every_steps = 20
  config.checkpoint_every_steps = 100

  if arg.paper:
    config.data.name = 'webvid'
    config.data.builder_config = ''
    config.data.image_size = 224
    config.data.num_frames = 4
    config.data.max_text_len = 32   # UMT's max_txt_l for the student's BERT ids
    config.data.tokenizer = ''      # set to BERT-base-uncased's vocab.txt (WordPiece, as UMT)
    config.data.eval_split = 'val'
    # UMT's 5M pairs: WebVid-2M videos and CC3M images in alternating whole batches of the same
    # size (UMT interleaves its loaders in proportion to their lengths, which are similar here).
    config.images.update(every=2, name='cc3m', builder_config='', split='train', batch_size=-1)
    config.teacher.init = ''        # set to the SigLIP B/16 checkpoint
    # The teacher reads its own ids (MRM's text feature as the paper): SigLIP's SentencePiece
    # layout, ids then EOS padded with EOS to its text_len (64), on canonicalised text.
    config.teacher.tokenizer.update(model='',  # set to SigLIP's spiece.model (c4_en)
                                    bos=False, pad='eos', canonicalize=True)
    # UMT starts the text tower from BERT-base (post-LN, embedding norm, exact GELU, eps 1e-12).
    config.model.text_init = ''     # set to a bert-base-uncased directory (model.safetensors)
    config.model.text_options = dict(post_ln=True, embed_norm=True, mlp_act='gelu', ln_eps=1e-12)
    # BERT's 30522 ids do not split over the FSDP axis: the table is padded to a multiple of 128
    # (the padded rows are never input ids).
    config.model.vocab_multiple = 128
    # The video tower from SigLIP B/16's image tower (the teacher's checkpoint or its HF form):
    # UMT's stands on CLIP-distilled weights; SigLIP takes [-1, 1] pixels as our pipeline gives
    # (CLIP would need its own mean/std) and its loader is the teacher's. Learned positions.
    config.model.init = ''          # set to the SigLIP B/16 checkpoint (docs/pretrained_weights.md)
    config.model.vision_options = dict(posemb='learn')
    config.model.drop_path = 0.1    # UMT's stochastic depth of the ViT-B student
    config.vtm.negatives = 'hard'   # UMT's (its fusion layers start from BERT's)
    config.optax.grad_clip_norm = 0.0  # UMT clips no gradients
    config.images.mask_ratio = 0.5  # UMT masks 50% of an image's tokens (videos: mask.ratio)
    config.model.vision_variant = 'B/16'
    config.model.text_variant = 'B'
    config.model.text_fusion_layers = 3   # BERT layers 9-11 cross-attend (UMT)
    config.model.embed_dim = 512
    config.model.dropout = 0.0
    config.model.decoder.update(width=384, depth=4, num_heads=6, mlp_dim=1536, out_dim=768)
    config.batch_size = 2048
    config.eval_batch_size = 256
    config.total_steps = -1
    config.total_epochs = 10.0
    config.warmup_steps = -1
    config.warmup_epochs = 1.0
    config.optax.lr = 1e-4
    config.optax.wd = 0.02
    config.unmasked_steps = 0
    config.mesh = (('data', 1), ('fsdp', -1), ('tensor', 1))
    config.sharding_rules = 'fsdp'
    # Memory (docs/results.md, "Memory policy" and issue 18): bf16 activations and matmuls,
    # every transformer block rematerialised. XLA:CPU's analysis (memory-minimising schedule):
    # 7.0 GiB a device at 64 devices (v5e-64), 14.6 at 32 (v4-32, v6e-32); one device needs
    # --config.microbatches=32: 31.5 GiB (VTC and the VTM negatives then see batch/K clips).
    # Check a slice with tools.compile_report.
    config.dtype = 'bfloat16'
    config.remat = 'full'
    config.log_every_steps = 50
    config.checkpoint_every_steps = 1000
  if arg.smoke:
    config.data.builder_config = 'tiny'
    config.teacher.workdir = 'workdirs/teacher_smoke'
    config.teacher.config = 'configs/teacher.py:smoke'
    config.model.vision_variant = 'Pico/8'
    config.model.text_variant = 'Pico'
    config.model.text_depth = 2
    config.model.embed_dim = 32
    config.model.decoder.update(width=32, depth=1, num_heads=2, mlp_dim=64, out_dim=32)
    config.data.worker_count = 0  # tests: no worker processes to start for 6 steps
    config.batch_size = 16
    config.eval_batch_size = 16
    config.total_steps = 6
    config.warmup_steps = 2
    config.unmasked_steps = 0
    config.log_every_steps = 1
    config.checkpoint_every_steps = 3
  if arg.images and not arg.paper:
    # shapes' stand-in: single frames of the same train clips (another shuffle), same batch size.
    config.images.update(every=2, name='shapes', builder_config='', split='train')
  if arg.steps > 0:
    config.total_steps = arg.steps
  return config
