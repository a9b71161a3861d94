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
from imdm_jax.errors import UserError
from imdm_jax.train_state import Params, TrainState, ema_update, make_optimizer

Batch = dict[str, Int[Array, 'B L']]  # 'tokens' (x) and 'attention_mask' (1 = counts in the loss)


# An objective is two functions: `draw(model, cfg, batch, key) -> (rows, dropout_key)` draws the
# randomness of the whole batch (per-row arrays, leading dimension B), and `sums(model, cfg, rows,
# dropout_key) -> (loss sum, token count)` evaluates the network on any subset of those rows.
# Drawing first makes a step split into micro-batches use exactly the full batch's t, masks and eps.

def nelbo_draws(model, cfg: Config, batch: Batch, key: PRNGKeyArray):
  """t (antithetic over the whole batch), z_t and the IMDM eps of one Monte-Carlo NELBO estimate."""
  k_t, k_mask, k_eps, k_drop = jax.random.split(key, 4)
  x = batch['tokens']
  t = schedule.sample_t(k_t, x.shape[0], cfg.diffusion.eps, cfg.diffusion.antithetic)  # [B]
  z_t = masking.mask_tokens(k_mask, x, t, model.mask_id, cfg.diffusion.eps)  # [B, L]
  eps = noise.draw_eps(k_eps, x.shape, cfg) if noise.is_imdm(cfg) else None  # fresh per step
  return {'x': x, 'valid': batch['attention_mask'], 't': t, 'z_t': z_t, 'eps': eps}, k_drop


def nelbo_from_draws(model, cfg: Config, rows,
                     dropout_key) -> tuple[Float[Array, ''], Float[Array, '']]:
  """The NELBO of drawn rows: (sum over valid tokens, number of valid tokens)."""
  logits = model(rows['z_t'], schedule.sigma(rows['t'], cfg.diffusion.eps), rows['eps'],
                 dropout_key=dropout_key)
  return loss.nelbo(logits, rows['x'], rows['z_t'], rows['t'], rows['valid'], model.mask_id)


def causal_lm_draws(model, cfg: Config, batch: Batch, key: PRNGKeyArray):
  del model, cfg  # next-token NLL draws nothing but dropout
  return {'x': batch['tokens'], 'valid': batch['attention_mask']}, key


def causal_lm_from_draws(model, cfg: Config, rows, dropout_key):
  """Next-token NLL under a causal LM (`model.arch='gpt2'`): (sum, number of targets)."""
  del cfg
  x = rows['x']
  logits = model(x, dropout_key=dropout_key)
  valid = rows['valid'][:, 1:].astype(jnp.float32)
  return jnp.sum(gpt2.token_nll(logits, x) * valid), jnp.sum(valid)


OBJECTIVES = {'dit': (nelbo_draws, nelbo_from_draws),
              'gpt2': (causal_lm_draws, causal_lm_from_draws)}


def _sums(objective, params: Params, graphdef: nnx.GraphDef, cfg: Config, batch: Batch,
          key: PRNGKeyArray, train: bool) -> tuple[Float[Array, ''], Float[Array, '']]:
  draw, sums = objective
  model = nnx.merge(graphdef, params)
  rows, k_drop = draw(model, cfg, batch, key)
  return sums(model, cfg, rows, k_drop if train else None)


def loss_sums(params, graphdef, cfg: Config, batch: Batch, key, train: bool):
  """The training objective of `cfg.model.arch` on a batch, as (sum over tokens, token count)."""
  return _sums(OBJECTIVES[cfg.model.arch], params, graphdef, cfg, batch, key, train)


def nelbo_sums(params, graphdef, cfg: Config, batch: Batch, key, train: bool):
  """One Monte-Carlo NELBO estimate of a batch: (sum over valid tokens, number of valid tokens)."""
  return _sums(OBJECTIVES['dit'], params, graphdef, cfg, batch, key, train)


def micro_batches(rows, k: int):
  """Splits every leaf `[B, ...]` into `[k, B/k, ...]`, micro-batch j holding rows j, j + k, ...:
  strided, so each device's contiguous block of rows splits evenly over the micro-batches and
  nothing moves between devices."""
  return jax.tree.map(lambda a: jnp.swapaxes(a.reshape(a.shape[0] // k, k, *a.shape[1:]), 0, 1),
                      rows)


def accumulate_gradients(sums_fn, params: Params, rows, dropout_key: PRNGKeyArray | None,
                         k: int) -> tuple[Float[Array, ''], Params]:
  """(mean loss, its gradient) of a batch evaluated as `k` sequential micro-batches.

  `sums_fn(params, rows, dropout_key) -> (loss sum, token count)` on any subset of `rows` (a
  pytree of per-row arrays). The gradients of the micro-batches' *sums* are added in a `lax.scan`
  and divided by the whole batch's count once, so the update equals one step on the whole batch
  even when micro-batches hold different numbers of tokens. Micro-batch j draws dropout from
  `fold_in(dropout_key, j)`: with dropout the masks differ from the k = 1 step's (same
  distribution); all randomness in `rows` is shared exactly. k = 1 differentiates the mean
  directly, bit for bit the plain step.
  """
  if k == 1:
    def mean(p):
      total, count = sums_fn(p, rows, dropout_key)
      return total / jnp.maximum(count, 1.0)
    return jax.value_and_grad(mean)(params)

  def body(carry, xs):
    j, micro = xs
    key = None if dropout_key is None else jax.random.fold_in(dropout_key, j)
    (total, count), grads = jax.value_and_grad(sums_fn, has_aux=True)(params, micro, key)
    return jax.tree.map(jnp.add, carry, (total, count, grads)), None

  zero = jnp.zeros((), jnp.float32)
  init = (zero, zero, jax.tree.map(jnp.zeros_like, params))
  (total, count, grads), _ = jax.lax.scan(body, init, (jnp.arange(k), micro_batches(rows, k)))
  denom = jnp.maximum(count, 1.0)
  return total / denom, jax.tree.map(lambda g: g / denom, grads)


def train_step(state: TrainState, batch: Batch, *, graphdef: nnx.GraphDef,
               cfg: Config) -> tuple[TrainState, dict[str, Array]]:
  key = jax.random.fold_in(state.rng, state.step)
  draw, sums = OBJECTIVES[cfg.model.arch]
  rows, k_drop = draw(nnx.merge(graphdef, state.params), cfg, batch, key)
  value, grads = accumulate_gradients(
      lambda params, micro, k: sums(nnx.merge(graphdef, params), cfg, micro, k),
      state.params, rows, k_drop, cfg.train.grad_accum)
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


def rows_per_device(cfg: Config, n_devices: int) -> int:
  """Rows each device holds of one micro-batch: the global batch must split evenly into
  `train.grad_accum` micro-batches, each over all devices."""
  B, k = cfg.train.batch_size, cfg.train.grad_accum
  if B % (k * n_devices):
    raise UserError(f'train.batch_size={B} is not divisible by the {n_devices} devices' +
                    (f' x train.grad_accum={k}' if k > 1 else ''))
  return B // (k * n_devices)


def compile_train_step(cfg: Config, graphdef: nnx.GraphDef, mesh: Mesh, state: TrainState,
                       step_fn=train_step):
  """`step_fn` is `train_step` unless a test wraps it (e.g. to count traces)."""
  rows_per_device(cfg, mesh.size)
  state_sh = sharding.tree_shardings(state, mesh)
  return jax.jit(functools.partial(step_fn, graphdef=graphdef, cfg=cfg),
                 in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                 out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)


def compile_eval_step(cfg: Config, graphdef: nnx.GraphDef, mesh: Mesh, params: Params):
  return jax.jit(functools.partial(eval_step, graphdef=graphdef, cfg=cfg),
                 in_shardings=(sharding.tree_shardings(params, mesh),
                               sharding.batch_sharding(mesh), sharding.replicated(mesh)),
                 out_shardings=sharding.replicated(mesh))
