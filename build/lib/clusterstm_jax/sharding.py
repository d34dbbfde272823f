"""Mesh construction, logical-axis rules and helpers to place host data on the mesh.

Models name their parameter and activation axes logically ('batch', 'embed', 'mlp', 'heads', ...);
the config chooses a rule set that maps those names to the mesh axes ('data', 'fsdp', 'tensor').
The same code runs on 1 CPU, 8 simulated devices, or a multi-host TPU pod.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

_RULE_SETS = {
    # Pure data parallelism: parameters replicated.
    'data': (),
    # Fully-sharded data parallelism: parameters split along their embedding axis.
    'fsdp': (('embed', 'fsdp'), ('vocab', 'fsdp')),
    # FSDP + tensor (Megatron-style) parallelism for wide models.
    'fsdp_tensor': (('embed', 'fsdp'), ('mlp', 'tensor'), ('heads', 'tensor'),
                    ('vocab', 'tensor')),
}


def logical_rules(name: str) -> tuple[tuple[str, Any], ...]:
  """Logical axis rules for a named rule set; 'batch' always spans the data axes."""
  if name not in _RULE_SETS:
    raise ValueError(f'unknown sharding_rules {name!r}; known: {sorted(_RULE_SETS)}')
  return (('batch', BATCH_AXES),) + _RULE_SETS[name]


def make_mesh(mesh_config: Sequence[Sequence[Any]], devices=None) -> Mesh:
  """Builds a Mesh from `[('data', -1), ('fsdp', 1), ('tensor', 1)]`; one -1 takes the rest."""
  devices = list(devices if devices is not None else jax.devices())
  names = tuple(str(n) for n, _ in mesh_config)
  if sorted(names) != sorted(MESH_AXES):
    raise ValueError(f'mesh must name exactly the axes {MESH_AXES}, got {names}')
  sizes = [int(s) for _, s in mesh_config]
  if sizes.count(-1) > 1:
    raise ValueError(f'at most one mesh axis may be -1, got {list(mesh_config)}')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f'{len(devices)} devices do not divide into mesh {list(mesh_config)}')
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f'mesh {dict(zip(names, sizes))} needs {int(np.prod(sizes))} devices, '
                     f'have {len(devices)}')
  # Auto axes: sharding is propagated by GSPMD from the in/out shardings we give (the pjit model).
  mesh = jax.make_mesh(tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names),
                       devices=devices)
  # Keep a canonical axis order so PartitionSpecs are readable.
  return mesh


def batch_size_per_shard(mesh: Mesh) -> int:
  """Number of batch shards (product of the data-parallel mesh axes)."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Batch-major arrays: leading axis over the data axes, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def tree_shardings(boxed_abstract_tree, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree of (possibly logically-partitioned) abstract values."""
  specs = nn.get_partition_spec(boxed_abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles the global batch from each process's local rows (multi-host safe)."""
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)
  return {k: put(v) for k, v in local_batch.items()}


def sync_processes(name: str, timeout_s: int = 1800) -> None:
  """Blocks until every process reaches the barrier `name` (a no-op with one process).

  A coordination-service barrier, not a device collective: processes may arrive minutes apart
  (each restores its own shards and compiles on its own), far longer than a CPU (gloo)
  collective waits for a late peer (30 s).
  """
  if jax.process_count() == 1:
    return
  import orbax.checkpoint as ocp
  ocp.multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_s * 1000)
