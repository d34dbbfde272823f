"""Where the persistent compilation cache goes (compile_cache.directory)."""
import os

import ml_collections
import pytest

from clusterstm_jax import compile_cache

pytestmark = pytest.mark.unit


def _config(value=None):
  config = ml_collections.ConfigDict()
  if value is not None:
    config.compile_cache = value
  return config


def test_cache_directory_resolution(tmp_path):
  work = str(tmp_path / 'run')
  assert compile_cache.directory(_config(''), work) == os.path.join(work, 'jax_cache')
  assert compile_cache.directory(_config(), work) == os.path.join(work, 'jax_cache')
  assert compile_cache.directory(_config('off'), work) is None
  assert compile_cache.directory(_config(str(tmp_path / 'c')), work) == str(tmp_path / 'c')
  assert compile_cache.directory(_config('~/x'), work) == os.path.expanduser('~/x')
  # Evaluation (no workdir): the user cache.
  assert compile_cache.directory(_config(''), None) == os.path.expanduser(
      compile_cache.USER_CACHE)


def test_a_directory_chosen_before_is_kept():
  # tests/conftest.py sets JAX_COMPILATION_CACHE_DIR for the session: use() keeps it.
  before = os.environ['JAX_COMPILATION_CACHE_DIR']
  assert compile_cache.use(_config('/nonexistent/elsewhere'), '/tmp/w') == before
