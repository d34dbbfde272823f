r"""Exports a training run: params + config + tokenizer (exports.py has the format).

  python -m clusterstm_jax.export --workdir=RUN [--out=DIR] [--format=orbax|safetensors|npz]

--format=safetensors / npz writes one weight file with the vision tower under Hugging Face
SigLIP / big_vision names and the config as metadata (portable.py,
docs/pretrained_weights.md#portable-exports); the default orbax export is what training
(config.init) and evaluation read fastest. clusterstm_jax.load() and evaluate read all three.
"""
from __future__ import annotations

from absl import flags

from clusterstm_jax import cli
from clusterstm_jax import loading

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Training run directory.', required=True)
flags.DEFINE_string('out', None, 'Export directory (default: WORKDIR/export).')
flags.DEFINE_enum('format', 'orbax', ('orbax', 'safetensors', 'npz'),
                  'orbax (default), or one portable weight file: safetensors or npz.')


def export_portable() -> str:
  """--format=safetensors|npz (loading.export_portable)."""
  return loading.export_portable(FLAGS.workdir, FLAGS.out, FLAGS.format)


def main() -> None:
  if FLAGS.format != 'orbax':
    print(f'exported to {export_portable()}')
    return
  print(f'exported to {loading.export_run(FLAGS.workdir, FLAGS.out)}')


def console() -> None:
  """The `clusterstm-export` console script (pyproject.toml)."""
  cli.run(main)


if __name__ == '__main__':
  cli.run(main)
