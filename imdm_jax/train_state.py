"""The train state (params, EMA, optimizer, RNG, step), the optimizer and the EMA update.

Parameters are kept as plain nested dicts of arrays (`nnx.to_pure_dict`): the state is an ordinary
pytree that jit, optax, orbax and the converter all handle, and `nnx.merge(graphdef, params)`
rebuilds the module inside a step.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from imdm_jax import sharding
from imdm_jax.config import Config, OptimConfig
from imdm_jax.gpt2 import GPT2
from imdm_jax.model import DiT

Params = dict[str, Any]


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 [], number of optimizer updates applied
  params: Params
  ema: Params
  opt_state: optax.OptState
  rng: jax.Array  # uint32 [2]; step k draws from fold_in(rng, k), so restarts replay exactly


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
  """The reference EMA: decay `min(decay, (1 + n) / (10 + n))`, n counting this update."""
  n = num_updates.astype(jnp.float32)
  d = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
  return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)


def model_class(cfg: Config) -> type[nnx.Module]:
  return GPT2 if cfg.model.arch == 'gpt2' else DiT


def model_graphdef(cfg: Config, mask_id: int) -> nnx.GraphDef:
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: model_class(cfg)(cfg, mask_id, nnx.Rngs(0))))
  return graphdef


def init_params(cfg: Config, mask_id: int, key: jax.Array) -> Params:
  return nnx.to_pure_dict(nnx.state(model_class(cfg)(cfg, mask_id, nnx.Rngs(params=key))))


def init_state(cfg: Config, mask_id: int, mesh: Mesh) -> TrainState:
  """A fresh state, created directly in its sharded layout (no full copy on any one device)."""
  tx = make_optimizer(cfg.optim)

  def init(seed):
    k_params, k_rng = jax.random.split(jax.random.PRNGKey(seed))
    params = init_params(cfg, mask_id, k_params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema=params,
                      opt_state=tx.init(params), rng=k_rng)

  seed = jnp.int32(cfg.train.seed)
  shardings = sharding.tree_shardings(jax.eval_shape(init, seed), mesh)
  return jax.jit(init, out_shardings=shardings)(seed)


def abstract_state(cfg: Config, mask_id: int, mesh: Mesh) -> TrainState:
  """Shapes, dtypes and live-mesh shardings of the state: the target of a checkpoint restore."""
  state = jax.eval_shape(lambda: init_state(cfg, mask_id, mesh))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      state, sharding.tree_shardings(state, mesh))


def param_count(params: Params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
