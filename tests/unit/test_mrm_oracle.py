"""tools/mrm_oracle's pooled errors against a brute-force per-clip, per-group computation."""
import numpy as np
import pytest

from clusterstm_jax import losses
from clusterstm_jax.tools import mrm_oracle

pytestmark = pytest.mark.unit


def _brute(z, groups, masked):
  sse = 0.0
  for b in range(z.shape[0]):
    for g in np.unique(groups[b][masked[b]]):
      sel = masked[b] & (groups[b] == g)
      sse += np.sum((z[b][sel] - z[b][sel].mean()) ** 2)
  return sse


def test_errors_match_brute_force_and_order():
  rng = np.random.default_rng(3)
  b, t, n, k = 4, 2, 16, 3
  target = rng.normal(size=(b, t, n)).astype(np.float32) * 0.03
  keep = rng.random((b, t, n)) < 0.25
  objects = np.zeros((b, t, n, k), bool)
  objects[:, :, 2:6, 0] = True
  objects[:, :, 5:9, 1] = True  # token 5 lies on objects 0 and 1: counts for 0
  target[:, :, 2:6] += 0.2  # object 0 more relevant than the rest
  got = mrm_oracle.errors(target, keep, objects)
  z = np.asarray(losses.standardize_per_clip(target), np.float64).reshape(b, -1)
  masked = ~keep.reshape(b, -1)
  first = np.where(objects.any(-1), np.argmax(objects, -1) + 1, 0).reshape(b, -1)
  np.testing.assert_allclose(got['baseline'], _brute(z, np.zeros_like(first), masked), rtol=1e-6)
  np.testing.assert_allclose(got['object_vs_background'], _brute(z, (first > 0) * 1, masked),
                             rtol=1e-6)
  np.testing.assert_allclose(got['per_object'], _brute(z, first, masked), rtol=1e-6)
  assert got['places'] == masked.sum()
  # The baseline is what the step logs (mrm_baseline of the standardised target); finer
  # groups can only explain more.
  np.testing.assert_allclose(got['baseline'] / got['places'], float(losses.mrm_baseline(
      losses.standardize_per_clip(target), keep)), rtol=1e-5)
  assert got['per_object'] <= got['object_vs_background'] <= got['baseline']
  assert got['per_object'] < 0.5 * got['baseline']  # object 0 carries the signal
