"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere.

The suite runs under pytest-xdist (README: `-n 2`): each file runs whole in one worker, so
module-scoped fixtures (a tiny dataset, a compiled step) are built once; the files that train
on the session's tiny dataset and smoke teacher (`shared_smoke`) run in one worker together;
the slowest files are handed out first.

tests/unit/ holds the fast tests (pure functions, single modules, one step's compile at most),
tests/integration/ the training runs, multi-process runs, export/evaluate commands and steps on
8-device meshes; every module there is marked `unit` or `integration` accordingly (checked at
collection, below). Select with `-m unit`, `-m "not slow"`, or a directory. Shared helpers:
tests/helpers.py.
"""
import os

# The tests' programs are tiny: XLA's CPU compiler spends most of their time compiling, not
# running them. -O0 codegen compiles the smoke train step ~1.6x faster (tests/unit/test_step.py:
# 171 s -> 106 s), and XLA's older elemental emitters instead of its fusion emitters take
# another ~30% off small programs (smoke step compile 13.5 s -> 8.9 s; test_step.py 70 s ->
# 57 s, 88 -> 62 CPU s). Big programs go the other way: the paper-scale step takes 266 s instead
# of 113 s with the older emitters, so tests/unit/test_paper_config.py compiles with the fusion
# emitters back on (its `PAPER_COMPILE_OPTIONS`). Only code generation changes (HLO is that of the
# default build); float results may differ in the last bits, inside the tests' tolerances.
# Benchmarks and real runs never set these.
_FAST_COMPILE = ('--xla_backend_optimization_level=0', '--xla_llvm_disable_expensive_passes=true',
                 '--xla_cpu_use_fusion_emitters=false')
_flags = os.environ.get("XLA_FLAGS", "").split()
_flags += ["--xla_force_host_platform_device_count=8"]
_flags += [f for f in _FAST_COMPILE if f.split('=')[0] not in ' '.join(_flags)]
os.environ["XLA_FLAGS"] = ' '.join(_flags)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Identical programs (the smoke train step, compiled by several tests and their subprocesses)
# compile once per session: JAX's persistent compilation cache in a per-session directory
# (made by the controller before xdist starts its workers, so they share it).
import tempfile  # noqa: E402

os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='jax_cache_'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import pytest  # noqa: E402

# Longest first (seconds in a `-n 2` run of the suite: downstream 171, the smoke group 137,
# paper_config 105, multiprocess 84, sharding 68, step 35, ...), so two workers finish together.
# Files by module basename (test file names are unique across tests/, unit/ and integration/).
_SLOW_FIRST = ('test_downstream', 'test_reliability', 'test_train', 'test_images', 'test_folder',
               'test_api', 'test_progress', 'test_paper_config', 'test_multiprocess',
               'test_sharding', 'test_step', 'test_models_siglip', 'test_tools', 'test_decoding',
               'test_pretrained_hf', 'test_masking', 'test_models_vit', 'test_models_text')
# Files sharing `shared_smoke` (one tiny dataset + one smoke teacher): one xdist group.
_SMOKE_GROUP = ('test_train', 'test_images')
# tests/<kind>/... -> the marker its modules carry (`pytestmark = pytest.mark.<kind>`).
_KINDS = ('unit', 'integration')
_TESTS = os.path.dirname(os.path.abspath(__file__))


def _module(item) -> str:
  return os.path.splitext(os.path.basename(str(item.fspath)))[0]


def _kind_error(module) -> str | None:
  """Why a test module under tests/unit or tests/integration lacks its kind's module-level mark
  (`pytestmark = pytest.mark.<kind>`, and not the other kind's); None if it has it."""
  rel = os.path.relpath(str(module.path), _TESTS).split(os.sep)
  if len(rel) < 2 or rel[0] not in _KINDS:
    return (f'{os.path.relpath(str(module.path))}: test files live in tests/unit/ or '
            'tests/integration/')
  marks = sorted({m.name for m in module.iter_markers()} & set(_KINDS))
  if marks == [rel[0]]:
    return None
  return (f'{os.path.relpath(str(module.path))}: in tests/{rel[0]}/ but marked '
          f'{marks or "neither unit nor integration"}; its module needs '
          f'`pytestmark = pytest.mark.{rel[0]}` (with any other marks in a list)')


_CHECKED = set()


def pytest_pycollect_makeitem(collector, name, obj):
  """A module under tests/unit or tests/integration without its kind's mark is a collection
  error (reported as such by xdist's workers too), found when its first name is collected."""
  module = collector.getparent(pytest.Module)
  if module is not None and module.path not in _CHECKED:
    _CHECKED.add(module.path)
    error = _kind_error(module)
    if error:
      raise collector.CollectError(error)
  return None


def pytest_xdist_make_scheduler(config, log):
  """xdist's file scheduling with the _SMOKE_GROUP files as one unit. (Its own `loadgroup`
  mode tags node ids through Item._nodeid, which pytest 9 no longer reads.)"""
  from xdist.scheduler import LoadScopeScheduling

  class FileGroups(LoadScopeScheduling):
    def _split_scope(self, nodeid):
      path = nodeid.split('::', 1)[0]
      name = os.path.splitext(os.path.basename(path))[0]
      return 'smoke' if name in _SMOKE_GROUP else path

  return FileGroups(config, log)


def pytest_collection_modifyitems(items):
  def rank(item):
    name = _module(item)
    return _SLOW_FIRST.index(name) if name in _SLOW_FIRST else len(_SLOW_FIRST)
  items.sort(key=rank)  # stable: tests keep their order inside a file


@pytest.fixture(scope='session')
def shared_smoke(tmp_path_factory):
  """helpers.SharedSmoke (data_dir, teacher_workdir, .config()): the tiny shapes split (built on
  first use) and the smoke teacher (trained on first use by whichever run needs it, then
  reused)."""
  from tests import helpers  # imports jax: only after the environment above is set
  root = tmp_path_factory.mktemp('shared_smoke')
  return helpers.SharedSmoke(str(root / 'data'), str(root / 'teacher'))
