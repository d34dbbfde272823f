"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere.

The suite runs under pytest-xdist (README: `-n 2 --dist loadfile`): each file runs whole in
one worker, so module-scoped fixtures (a tiny dataset, a smoke teacher, a compiled step) are
built once, and the slowest files are handed out first.
"""
import os

# The tests' programs are tiny: XLA's CPU compiler spends most of their time in LLVM's
# optimisation passes, not running them. -O0 codegen compiles the smoke train step ~1.6x
# faster (tests/test_step.py: 171 s -> 106 s). Only LLVM's code generation changes (HLO
# fusion and layout are those of the default build); float results may differ in the last
# bits, inside the tests' tolerances. Benchmarks and real runs never set these.
_FAST_COMPILE = ('--xla_backend_optimization_level=0', '--xla_llvm_disable_expensive_passes=true')
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

# Longest first (seconds of one serial run, idle-ish machine), so two workers finish together.
_SLOW_FIRST = ('test_sharding', 'test_downstream', 'test_multiprocess', 'test_paper_config',
               'test_step', 'test_models', 'test_train', 'test_masking', 'test_tools')


def pytest_collection_modifyitems(items):
  def rank(item):
    name = os.path.splitext(os.path.basename(str(item.fspath)))[0]
    return _SLOW_FIRST.index(name) if name in _SLOW_FIRST else len(_SLOW_FIRST)
  items.sort(key=rank)  # stable: tests keep their order inside a file
