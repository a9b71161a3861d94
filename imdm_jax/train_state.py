"""The train state (params, EMA, optimizer, RNG, step), the optimizer and the EMA update.

Parameters are kept as plain nested dicts of arrays (`nnx.to_pure_dict`): the state is an ordinary
pytree that jit, optax, orbax and the converter all handle, and `nnx.merge(graphdef, params)`
rebuilds the module inside a step. The pure dicts drop the parameters' metadata: the logical
sharding axes each declares are read from the abstract model instead (`param_axes`).
"""

from __future__ import annotations

import typing
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import AbstractMesh, Mesh

from imdm_jax import sharding
from imdm_jax.config import Config, OptimConfig
from imdm_jax.gpt2 import GPT2
from imdm_jax.model import DiT

Params = dict[str, Any]


# A pytree that JAX rebuilds with other leaves (ShapeDtypeStructs under `jax.eval_shape`, the
# shardings of `sharding.tree_shardings`): its constructor's annotations, which describe the
# arrays, are not checked at run time (the jaxtyping hook of tests/conftest.py).
@typing.no_type_check
@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 [], number of optimizer updates applied
  params: Params
  ema: Params
  opt_state: optax.OptState
  rng: jax.Array  # uint32 [2]; step k draws from fold_in(rng, k), so restarts replay exactly
  # int32 [], the EMA's update count, which sets its warm-up (`ema_update`): `step` in a fresh
  # run; a run started from another's weights inherits the source's count, as the official
  # code's `load_ema` does, so a distilled student's EMA runs at the full decay from its start
  ema_count: jax.Array


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; lr rises linearly from 0 over `warmup_steps`, then stays, or
  with `decay_steps` falls linearly to 0 at step `decay_steps`."""
  warmup = max(cfg.warmup_steps, 1)
  lr = optax.linear_schedule(0.0, cfg.lr, warmup)
  if cfg.decay_steps:
    lr = optax.join_schedules(
        [lr, optax.linear_schedule(cfg.lr, 0.0, cfg.decay_steps - warmup)], [warmup])
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))


def ema_update(ema: Params, params: Params, num_updates: jax.Array, decay: float) -> Params:
  """The reference EMA: decay `min(decay, (1 + n) / (10 + n))`, n counting this update (the
  state's `ema_count` after it)."""
  n = num_updates.astype(jnp.float32)
  d = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
  return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)


def model_class(cfg: Config) -> type[nnx.Module]:
  return GPT2 if cfg.model.arch == 'gpt2' else DiT


def abstract_model(cfg: Config) -> nnx.Module:
  """The model with shapes for values: its structure and metadata, nothing allocated."""
  return nnx.eval_shape(lambda: model_class(cfg)(cfg, nnx.Rngs(0)))


def model_graphdef(cfg: Config) -> nnx.GraphDef:
  graphdef, _ = nnx.split(abstract_model(cfg))
  return graphdef


def param_axes(cfg: Config) -> sharding.ParamAxes:
  """The logical axes each parameter of `cfg`'s model declares, by path: what
  `sharding.tree_shardings` lays out the params, the EMA and the optimizer state by."""
  return sharding.param_axes(abstract_model(cfg))


def init_params(cfg: Config, key: jax.Array) -> Params:
  return nnx.to_pure_dict(nnx.state(model_class(cfg)(cfg, nnx.Rngs(params=key))))


def init_state(cfg: Config, mesh: Mesh) -> TrainState:
  """A fresh state, created directly in its sharded layout (no full copy on any one device)."""
  return _init_state(cfg, mesh, param_axes(cfg))


def _init_state(cfg: Config, mesh: Mesh | AbstractMesh, axes: sharding.ParamAxes) -> TrainState:
  tx = make_optimizer(cfg.optim)

  def init(seed):
    k_params, k_rng = jax.random.split(jax.random.PRNGKey(seed))
    params = init_params(cfg, k_params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema=params,
                      opt_state=tx.init(params), rng=k_rng, ema_count=jnp.zeros((), jnp.int32))

  seed = jnp.int32(cfg.train.seed)
  shardings = sharding.tree_shardings(jax.eval_shape(init, seed), mesh, axes)
  return jax.jit(init, out_shardings=shardings)(seed)


def abstract_state(cfg: Config, mesh: Mesh | AbstractMesh) -> TrainState:
  """Shapes, dtypes and live-mesh shardings of the state: the target of a checkpoint restore."""
  axes = param_axes(cfg)
  state = jax.eval_shape(lambda: _init_state(cfg, mesh, axes))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      state, sharding.tree_shardings(state, mesh, axes))


def param_count(params: Params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
