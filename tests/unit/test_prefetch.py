"""data/prefetch.py: the prefetching iterator gives the wrapped iterator's batches in order, its
state is that of the last batch handed out (exact resume), errors reach the caller; the worker
count from the host's cores."""
import grain.python as grain
import numpy as np
import pytest

from clusterstm_jax.data import prefetch

pytestmark = pytest.mark.unit


def _loader(n=40, batch=4, seed=3, epochs=None):
  source = [{"x": np.int32(i)} for i in range(n)]
  sampler = grain.IndexSampler(n, shard_options=grain.NoSharding(), shuffle=True,
                               num_epochs=epochs, seed=seed)
  return grain.DataLoader(data_source=source, sampler=sampler,
                          operations=[grain.Batch(batch, drop_remainder=True)], worker_count=0)


def _xs(it, k):
  return [next(it)["x"].tolist() for _ in range(k)]


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_same_batches_in_the_same_order(depth):
  want = _xs(iter(_loader()), 12)
  it = prefetch.Prefetch(iter(_loader()), depth=depth)
  assert _xs(it, 12) == want
  it.close()


@pytest.mark.parametrize("depth", [0, 2])
def test_state_is_that_of_the_last_batch_taken(depth):
  plain = iter(_loader())
  _xs(plain, 5)
  it = prefetch.Prefetch(iter(_loader()), put=lambda b: {"x": b["x"] * 1}, depth=depth)
  _xs(it, 5)
  state = it.get_state()
  assert state == plain.get_state()  # not the position of the batches queued ahead
  want = _xs(it, 4)
  # Resume: a fresh iterator set to the saved state makes the same next batches.
  fresh = prefetch.Prefetch(iter(_loader()), depth=depth)
  fresh.set_state(state)
  assert _xs(fresh, 4) == want
  # set_state on a running one drops what it had queued.
  it.set_state(state)
  assert _xs(it, 4) == want
  it.close()
  fresh.close()


def test_close_then_next_continues_exactly():
  want = _xs(iter(_loader()), 9)
  it = prefetch.Prefetch(iter(_loader()), depth=3)
  got = _xs(it, 4)
  it.close()
  got += _xs(it, 5)
  assert got == want
  it.close()


def test_put_runs_on_each_batch_and_errors_reach_next():
  calls = []
  it = prefetch.Prefetch(iter(_loader()), put=lambda b: calls.append(1) or b, depth=2)
  next(it)
  assert calls
  it.close()

  def bad(_):
    raise RuntimeError("decode failed")
  it = prefetch.Prefetch(iter(_loader()), put=bad, depth=2)
  with pytest.raises(RuntimeError, match="decode failed"):
    next(it)
  it.close()


def test_end_of_data_stops_every_later_next():
  want = _xs(iter(_loader(n=8, epochs=1)), 2)
  it = prefetch.Prefetch(iter(_loader(n=8, epochs=1)), depth=2)
  assert _xs(it, 2) == want
  for _ in range(2):
    with pytest.raises(StopIteration):
      next(it)
  with pytest.raises(ValueError, match="depth"):
    prefetch.Prefetch(iter([]), depth=-1)


def test_auto_worker_count():
  assert [prefetch.auto_worker_count(c) for c in (1, 2, 3, 8, 96, 240)] == [0, 0, 1, 6, 32, 32]
  assert prefetch.resolve_worker_count(3) == 3
  assert prefetch.resolve_worker_count(-1) == prefetch.auto_worker_count()
  assert prefetch.host_cores() >= 1


def test_round_trip_through_grains_orbax_handler(tmp_path):
  """The calls orbax makes on a checkpoint (get_state; set_state then start_prefetch)."""
  handler = grain.PyGrainCheckpointHandler()
  it = prefetch.Prefetch(iter(_loader()), depth=2)
  _xs(it, 3)
  handler.save(tmp_path, it)
  want = _xs(it, 3)
  fresh = prefetch.Prefetch(iter(_loader()), depth=2)
  handler.restore(tmp_path, fresh)
  assert _xs(fresh, 3) == want
  it.close()
  fresh.close()
