r"""Exports a training run: params + config + tokenizer (exports.py has the format).

  python -m clusterstm_jax.export --workdir=RUN [--out=DIR] [--overwrite]

An existing DIR is refused unless it is an export (then --overwrite replaces it); nothing else in
it is ever deleted.
"""
from __future__ import annotations

from absl import flags

from clusterstm_jax import cli
from clusterstm_jax import loading

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Training run directory.', required=True)
flags.DEFINE_string('out', None, 'Export directory (default: WORKDIR/export).')
flags.DEFINE_bool('overwrite', False, 'Replace an existing export at --out.')


def main() -> None:
  print(f'exported to {loading.export_run(FLAGS.workdir, FLAGS.out, overwrite=FLAGS.overwrite)}')


if __name__ == '__main__':
  cli.run(main)
