"""jax's persistent compilation cache for training and evaluation runs, so that a relaunch (a
preempted pod run, a resumed or repeated local run) reads its compiled programs from disk
instead of compiling them again.

Where (the first that is set wins):
  JAX_COMPILATION_CACHE_DIR   jax's own environment variable (or any cache dir set before)
  config.compile_cache        a directory, or 'off'
  the default                 WORKDIR/jax_cache for a training run (on a pod a gs:// workdir:
                              every host and every recreated slice finds it), the user cache
                              ~/.cache/clusterstm_jax/jax_cache for an evaluation.
Programs that compile in under MIN_COMPILE_SECS are not written (a disk read is not faster).
The train steps' lowered programs go to DIR/programs (program_cache.py), so a relaunch does not
trace them either.
"""
from __future__ import annotations

import os

import jax
from absl import logging

MIN_COMPILE_SECS = 0.5
USER_CACHE = os.path.join('~', '.cache', 'clusterstm_jax', 'jax_cache')


def directory(config, workdir: str | None) -> str | None:
  """The cache directory of a run of `config` in `workdir` (None: evaluation, or 'off')."""
  choice = config.get('compile_cache', '') or ''
  if choice == 'off':
    return None
  if choice:
    return os.path.expanduser(choice)
  return os.path.join(workdir, 'jax_cache') if workdir else os.path.expanduser(USER_CACHE)


def use(config, workdir: str | None = None) -> str | None:
  """Turns the cache on for this process (once; a directory chosen before is kept).
  Returns the directory in use, or None."""
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  path = directory(config, workdir)
  if path is None:
    return None
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', MIN_COMPILE_SECS)
  logging.info('persistent compilation cache: %s', path)
  return path


def programs_directory() -> str | None:
  """Where the lowered train steps are kept: DIR/programs of the cache in use, else None."""
  current = jax.config.jax_compilation_cache_dir
  return os.path.join(current, 'programs') if current else None
