"""The train and eval steps: pure functions of (state, batch), compiled once with `jax.jit` over
the mesh. The same functions run on one CPU and on a pod slice; only the shardings differ."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int, PRNGKeyArray

from imdm_jax import gpt2, loss, masking, noise, schedule, sharding
from imdm_jax.config import Config
from imdm_jax.train_state import Params, TrainState, ema_update, make_optimizer

Batch = dict[str, Int[Array, 'B L']]  # 'tokens' (x) and 'attention_mask' (1 = counts in the loss)


def nelbo_sums(params: Params, graphdef: nnx.GraphDef, cfg: Config, batch: Batch,
               key: PRNGKeyArray, train: bool) -> tuple[Float[Array, ''], Float[Array, '']]:
  """One Monte-Carlo NELBO estimate of a batch: (sum over valid tokens, number of valid tokens)."""
  k_t, k_mask, k_eps, k_drop = jax.random.split(key, 4)
  x = batch['tokens']
  model = nnx.merge(graphdef, params)
  t = schedule.sample_t(k_t, x.shape[0], cfg.diffusion.eps, cfg.diffusion.antithetic)
  z_t = masking.mask_tokens(k_mask, x, t, model.mask_id, cfg.diffusion.eps)
  eps = noise.draw_eps(k_eps, x.shape, cfg) if noise.is_imdm(cfg) else None  # fresh per step
  logits = model(z_t, schedule.sigma(t, cfg.diffusion.eps), eps,
                 dropout_key=k_drop if train else None)
  return loss.nelbo(logits, x, z_t, t, batch['attention_mask'], model.mask_id)


def causal_lm_sums(params: Params, graphdef: nnx.GraphDef, cfg: Config, batch: Batch,
                   key: PRNGKeyArray, train: bool) -> tuple[Float[Array, ''], Float[Array, '']]:
  """Next-token NLL of a batch under a causal LM (`model.arch='gpt2'`): (sum, number of targets)."""
  x = batch['tokens']
  logits = nnx.merge(graphdef, params)(x, dropout_key=key if train else None)
  valid = batch['attention_mask'][:, 1:].astype(jnp.float32)
  return jnp.sum(gpt2.token_nll(logits, x) * valid), jnp.sum(valid)


def loss_sums(params, graphdef, cfg: Config, batch: Batch, key, train: bool):
  """The training objective of `cfg.model.arch`, as (sum over tokens, token count)."""
  fn = causal_lm_sums if cfg.model.arch == 'gpt2' else nelbo_sums
  return fn(params, graphdef, cfg, batch, key, train)


def train_step(state: TrainState, batch: Batch, *, graphdef: nnx.GraphDef,
               cfg: Config) -> tuple[TrainState, dict[str, Array]]:
  key = jax.random.fold_in(state.rng, state.step)

  def objective(params):
    total, count = loss_sums(params, graphdef, cfg, batch, key, train=True)
    return total / jnp.maximum(count, 1.0)

  value, grads = jax.value_and_grad(objective)(state.params)
  return apply_gradients(state, grads, value, cfg)


def apply_gradients(state: TrainState, grads, value, cfg: Config) -> tuple[TrainState, dict]:
  """One optimizer update and EMA step; shared by training and distillation."""
  tx = make_optimizer(cfg.optim)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  step = state.step + 1
  new_state = state.replace(step=step, params=params, opt_state=opt_state,
                            ema=ema_update(state.ema, params, step, cfg.optim.ema_decay))
  metrics = {'loss': value, 'grad_norm': optax.global_norm(grads)}
  if noise.is_imdm(cfg):
    metrics['imdm/noise_out_norm'] = noise_output_norm(params)
  return new_state, metrics


def noise_output_norm(params: Params) -> Float[Array, '']:
  """Norm of the layer that turns eps into the mask embedding (the noise MLP's last layer, or
  the finite-state table). It starts at 0; growth shows the network has started to use eps."""
  embed = params['vocab_embed']
  last = embed['imdm_mlp']['mlp_out']['kernel'] if 'imdm_mlp' in embed else \
      embed['imdm_states']['embedding']
  return jnp.sqrt(jnp.sum(jnp.square(last)))


def eval_step(params: Params, batch: Batch, key: PRNGKeyArray, *, graphdef: nnx.GraphDef,
              cfg: Config) -> dict[str, Array]:
  total, count = loss_sums(params, graphdef, cfg, batch, key, train=False)
  return {'nll_sum': total, 'count': count}


def compile_train_step(cfg: Config, graphdef: nnx.GraphDef, mesh: Mesh, state: TrainState,
                       step_fn=train_step):
  """`step_fn` is `train_step` unless a test wraps it (e.g. to count traces)."""
  state_sh = sharding.tree_shardings(state, mesh)
  return jax.jit(functools.partial(step_fn, graphdef=graphdef, cfg=cfg),
                 in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                 out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)


def compile_eval_step(cfg: Config, graphdef: nnx.GraphDef, mesh: Mesh, params: Params):
  return jax.jit(functools.partial(eval_step, graphdef=graphdef, cfg=cfg),
                 in_shardings=(sharding.tree_shardings(params, mesh),
                               sharding.batch_sharding(mesh), sharding.replicated(mesh)),
                 out_shardings=sharding.replicated(mesh))
