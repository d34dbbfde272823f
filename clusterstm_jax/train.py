r"""Pretraining and fine-tuning entry point.

  python -m clusterstm_jax.train --config=configs/pretrain.py [--workdir=DIR] [--config.x=y]

Trains (a missing default teacher first, as a run of its own), checkpoints, and ends with the
config's evaluation (loop.py). Running the same command again in the same workdir resumes from
the latest checkpoint, or reports that the run is complete.
"""
from __future__ import annotations

import os

from clusterstm_jax import interrupts

interrupts.install_early()  # before the imports below (seconds): a signal then is not lost

# pylint: disable=wrong-import-position
import jax  # noqa: E402
from absl import flags  # noqa: E402

from clusterstm_jax import cli  # noqa: E402
from clusterstm_jax import loop  # noqa: E402

FLAGS = flags.FLAGS
cli.define_config()
flags.DEFINE_string('workdir', None, 'Where checkpoints, logs and results go. Default: '
                    'workdirs/<config name>[_<arg>].')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-process).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-process runs).')
flags.DEFINE_integer('process_id', None, 'This process (multi-process runs).')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() with '
                  'auto-detection (TPU pods).')


def default_workdir(config_path: str) -> str:
  name, _, arg = config_path.partition(':')
  stem = os.path.splitext(os.path.basename(name))[0]
  suffix = '_' + arg.replace(',', '_').replace('=', '-').replace('/', '-') if arg else ''
  return os.path.join('workdirs', stem + suffix)


def main() -> None:
  if FLAGS.num_processes and FLAGS.num_processes > 1:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  elif FLAGS.distributed:
    jax.distributed.initialize()
  workdir = FLAGS.workdir or default_workdir(cli.config_path())
  loop.run(FLAGS.config, workdir)


def console() -> None:
  """The `clusterstm-train` console script (pyproject.toml)."""
  cli.run(main)


if __name__ == '__main__':
  cli.run(main)
