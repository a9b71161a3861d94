"""The device mesh, batch sharding and parameter sharding by logical-axis rules.

One code path for every scale: a `('data', 'fsdp')` mesh (1x1 on a laptop, a pod slice on TPU).
The batch is split over both axes; each parameter (and its optimizer moments) is split over `fsdp`
along its first dimension whose logical axis has a rule and whose size divides evenly, and is
replicated otherwise. Axis types are `Auto` throughout, so XLA inserts the collectives.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from imdm_jax.config import MeshConfig
from imdm_jax.errors import UserError

AXES = ('data', 'fsdp')
BATCH_AXES = ('data', 'fsdp')  # the batch dimension is split over every device

# Logical axes of each parameter, matched against the end of its path ('blocks/3/attn_qkv/kernel',
# or the same inside the optimizer state). Anything unmatched (norm scales, biases) is replicated.
PARAM_AXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r'vocab_embed/embedding$', ('vocab', 'embed')),
    (r'imdm_mlp/mlp_in/kernel$', ('noise', 'mlp')),
    (r'imdm_mlp/mlp_out/kernel$', ('mlp', 'embed')),
    (r'attn_qkv/kernel$', ('embed', 'qkv')),
    (r'attn_out/kernel$', ('qkv', 'embed')),
    (r'blocks/\d+/mlp_in/kernel$', ('embed', 'mlp')),
    (r'blocks/\d+/mlp_out/kernel$', ('mlp', 'embed')),
    (r'adaLN_modulation/kernel$', ('cond', 'modulation')),
    (r'sigma_map/mlp_in/kernel$', ('freq', 'cond')),
    (r'sigma_map/mlp_out/kernel$', ('cond', 'cond')),
    (r'output_layer/linear/kernel$', ('embed', 'vocab')),
    # GPT-2 (the evaluator)
    (r'^wte$', ('vocab', 'embed')),
    (r'^wpe$', ('pos', 'embed')),
    (r'attn/c_attn/kernel$', ('embed', 'qkv')),
    (r'attn/c_proj/kernel$', ('qkv', 'embed')),
    (r'mlp/c_fc/kernel$', ('embed', 'mlp')),
    (r'mlp/c_proj/kernel$', ('mlp', 'embed')),
)

# Logical axis -> mesh axis. A mesh axis is used at most once per parameter (first dim wins).
RULES: dict[str, str] = {name: 'fsdp' for name in (
    'embed', 'mlp', 'qkv', 'modulation', 'vocab', 'cond', 'freq', 'noise')}


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
  devices = list(jax.devices()) if devices is None else devices
  n = len(devices)
  if cfg.fsdp < 1 or n % cfg.fsdp:
    raise UserError(f'mesh.fsdp={cfg.fsdp} does not divide the {n} devices')
  data = n // cfg.fsdp if cfg.data == -1 else cfg.data
  if data * cfg.fsdp != n:
    raise UserError(f'mesh.data={cfg.data} x mesh.fsdp={cfg.fsdp} != {n} devices')
  return Mesh(np.asarray(devices).reshape(data, cfg.fsdp), AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def host_to_global(value, where: NamedSharding) -> jax.Array:
  """A global array laid out as `where` from a value every process holds in full and alike (a
  numpy array, or a jax array on this process's devices): each process fills only its own
  devices' shards. Across processes `jax.device_put` would first all-gather the whole value to
  check that the processes agree; within one, it is used as is (a device-held value then moves
  without a trip through the host)."""
  if where.is_fully_addressable:
    return jax.device_put(value, where)
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, where, lambda index: value[index])


def path_str(path) -> str:
  parts = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return '/'.join(parts)


def logical_axes(path: str) -> tuple[str, ...] | None:
  for pattern, axes in PARAM_AXES:
    if re.search(pattern, path):
      return axes
  return None


def partition_spec(path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
  axes = logical_axes(path)
  if axes is None or len(axes) != len(shape):
    return P()
  spec, used = [], set()
  for name, size in zip(axes, shape):
    mesh_axis = RULES.get(name)
    if mesh_axis and mesh_axis not in used and size % mesh.shape[mesh_axis] == 0:
      spec.append(mesh_axis)
      used.add(mesh_axis)
    else:
      spec.append(None)
  return P(*spec)


def tree_shardings(tree, mesh: Mesh):
  """NamedShardings for a pytree of arrays (or ShapeDtypeStructs) by the logical-axis rules."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: NamedSharding(mesh, partition_spec(path_str(path), leaf.shape, mesh)),
      tree)


def to_global(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's rows into one global array sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
