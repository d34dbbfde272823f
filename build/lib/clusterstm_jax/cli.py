"""The command line every entry point shares (train, evaluate, export and the tools).

  cli.define_config('configs/x.py')   a locked `--config` (a misspelt override fails)
  cli.run(main)                       absl's app.run with: one `error: ...` line and exit 2 for a
                                      bad command line; one `error: ...` line and exit 1 for a
                                      UserError; library INFO chatter (Orbax, TFDS) off unless
                                      --verbosity is given.
`main` takes no arguments: it reads its flags (`cli.FLAGS`) and raises UserError for bad input.
"""
from __future__ import annotations

import importlib.util
import sys
from typing import Callable

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from clusterstm_jax import config_lib
from clusterstm_jax.errors import UserError

FLAGS = flags.FLAGS


def define_config(default: str | None = None, help_: str = 'Config file (configs/*.py[:arg]).'):
  """--config, locked: an override of a field the config does not have is an error."""
  config_flags.DEFINE_config_file('config', default, help_, lock_config=True)
  if default is None:
    flags.mark_flags_as_required(['config'])


def config_path() -> str:
  """The --config argument as given (path[:arg])."""
  return config_flags.get_config_filename(FLAGS['config'])


GCS_MODULES = ('gcsfs', 'google.cloud.storage')


def gcs_missing() -> list[str]:
  """The modules gs:// paths need (the [gcs] extra) that are not installed."""
  def found(name):
    try:
      return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a missing parent package (google.cloud)
      return False
  return [m for m in GCS_MODULES if not found(m)]


def resolve_argv(argv: list[str]) -> list[str]:
  """--config=configs/x.py[:arg] found from any directory (config_lib.resolve_config_spec);
  a gs:// argument without the [gcs] extra is one `error:` line naming it."""
  out = []
  for i, a in enumerate(argv):
    if a.startswith('--config=') and i:
      a = '--config=' + config_lib.resolve_config_spec(a[len('--config='):])
    elif i and argv[i - 1] == '--config':
      a = config_lib.resolve_config_spec(a)
    out.append(a)
  if any('gs://' in a for a in argv[1:]) and gcs_missing():
    print(f'error: gs:// paths need the [gcs] extra ({", ".join(gcs_missing())} missing): '
          "pip install 'clusterstm_jax[gcs]' (or -r requirements-gcs.txt)", file=sys.stderr)
    sys.exit(2)
  return out


def parse_flags_or_exit(argv):
  """absl flags parser: a bad override (an unknown config field, a malformed value, an unknown
  `:arg` knob) becomes one line on stderr, not a traceback from ml_collections."""
  argv = resolve_argv(list(argv))
  try:
    return FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except -- all of these are bad user input
    lines = [l for l in str(e).strip().splitlines() if l.strip()] or [type(e).__name__]
    print(f'error: bad command line: {lines[-1] if len(lines) > 1 else lines[0]}',
          file=sys.stderr)
    sys.exit(2)


def run(main: Callable[[], object]) -> None:
  """Runs `main()` as a program (see the module docstring)."""
  def _main(argv):
    if len(argv) > 1:
      print(f'error: unexpected arguments: {" ".join(argv[1:])}', file=sys.stderr)
      sys.exit(2)
    if not FLAGS['verbosity'].present:
      logging.set_verbosity(logging.WARNING)
    try:
      main()
    except UserError as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(1)

  app.run(_main, flags_parser=parse_flags_or_exit)
