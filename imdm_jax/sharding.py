"""The device mesh, batch sharding and parameter sharding by logical-axis rules.

One code path for every scale: a `('data', 'fsdp')` mesh (1x1 on a laptop, a pod slice on TPU).
The batch is split over both axes. Each parameter declares its logical axes where the model makes
it (`model.with_axes`: `('embed', 'mlp')`, ...; read here by `param_axes`); it (and its EMA and
optimizer moments) is split over `fsdp` along its first dimension whose logical axis has a rule
and whose size divides evenly, and is replicated otherwise, as are parameters that declare no
axes (biases, norm scales). Axis types are `Auto` throughout, so XLA inserts the collectives.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P

from imdm_jax.config import MeshConfig
from imdm_jax.errors import UserError

AXES = ('data', 'fsdp')
BATCH_AXES = ('data', 'fsdp')  # the batch dimension is split over every device

# The logical axes of each parameter, by path ('blocks/3/attn_qkv/kernel'), as its model declares
# them; parameters that declare none are absent.
ParamAxes = Mapping[str, tuple[str | None, ...]]

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


def rows_per_device(batch: int, n_devices: int, grad_accum: int = 1,
                    what: str = 'train.batch_size') -> int:
  """Rows each device holds of one micro-batch: the batch must split evenly into `grad_accum`
  micro-batches, each over all devices. The one divisibility check of every batched program."""
  if batch % (grad_accum * n_devices):
    raise UserError(f'{what}={batch} is not divisible by the {n_devices} devices' +
                    (f' x train.grad_accum={grad_accum}' if grad_accum > 1 else ''))
  return batch // (grad_accum * n_devices)


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


def _path_parts(path) -> list[str]:
  parts = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return parts


def path_str(path) -> str:
  return '/'.join(_path_parts(path))


def param_axes(module: nnx.Module) -> dict[str, tuple[str | None, ...]]:
  """The logical axes each parameter of `module` declares (its `out_sharding` metadata, set by
  `model.with_axes`), by path. `module` may be abstract (`nnx.eval_shape`): only the metadata and
  shapes are read."""
  axes = {}
  for path, var in nnx.state(module).flat_state():
    names = var.get_metadata().get('out_sharding')
    if not names:
      continue
    name = '/'.join(map(str, path))
    if len(names) != len(var.shape):
      raise ValueError(f'parameter {name} of shape {var.shape} declares the axes {names}')
    axes[name] = tuple(names)
  return axes


def partition_spec(axes: tuple[str | None, ...] | None, shape: tuple[int, ...],
                   mesh: Mesh | AbstractMesh) -> P:
  """Each dimension goes to the mesh axis of its logical axis (`RULES`) if that mesh axis divides
  it and no earlier dimension took it; no axes, or a leaf of another rank, is replicated."""
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


def leaf_axes(path, axes: ParamAxes) -> tuple[str | None, ...] | None:
  """The axes of the parameter a leaf stands for: the one whose path ends the leaf's own, the
  longest if several ('params/blocks/0/mlp_in/kernel' in a train state, '1/0/mu/wte' in the
  optimizer state, or the parameter's own path)."""
  parts = _path_parts(path)
  for i in range(len(parts)):
    found = axes.get('/'.join(parts[i:]))
    if found is not None:
      return found
  return None


def tree_shardings(tree, mesh: Mesh | AbstractMesh, axes: ParamAxes):
  """NamedShardings for a pytree of arrays (or ShapeDtypeStructs) whose leaves sit at parameter
  paths, under any prefix: the parameters, the EMA, the optimizer state, a whole train state.
  `axes` is the model's `param_axes` (`train_state.param_axes(cfg)`); every leaf that is no
  parameter's (steps, counters, RNG keys) is replicated."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: NamedSharding(
          mesh, partition_spec(leaf_axes(path, axes), leaf.shape, mesh)),
      tree)


def to_global(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's rows into one global array sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
