"""The steps: pure functions of (state, batch), compiled once with `jax.jit` over the mesh.

Each step draws the randomness of its whole batch, evaluates a loss of the method (`loss.py`,
`sdtt.py`, `redi.py`) through `accumulate_gradients`, and applies one optimizer and EMA update
(`apply_gradients`): nothing else. The same functions run on one CPU and on a pod slice; only
the shardings differ.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int, PRNGKeyArray

from imdm_jax import gpt2, loss, masking, model, noise, redi, sampling, schedule, sdtt, sharding
from imdm_jax.config import Config
from imdm_jax.train_state import Params, TrainState, ema_update, make_optimizer, param_axes

Batch = dict[str, Int[Array, 'B L']]  # 'tokens' (x) and 'attention_mask' (1 = counts in the loss)


# An objective is two functions: `draws(cfg, batch, key, mask_id) -> (rows, dropout_key)` draws
# the randomness of the whole batch (per-row arrays, leading dimension B), and
# `sums(params, graphdef, cfg, rows, dropout_key, mask_id) -> (loss sum, token count)` evaluates
# the loss on any subset of those rows. Drawing first makes a step split into micro-batches use
# exactly the full batch's t, masks and eps.

def nelbo_draws(cfg: Config, batch: Batch, key: PRNGKeyArray, mask_id: int):
  """t (antithetic over the whole batch), z_t and the IMDM eps of one Monte-Carlo NELBO estimate."""
  k_t, k_mask, k_eps, k_drop = jax.random.split(key, 4)
  x, d = batch['tokens'], cfg.diffusion
  t = schedule.sample_t(k_t, x.shape[0], d.alpha_min, d.antithetic)  # [B]
  z_t = masking.mask_tokens(k_mask, x, t, mask_id, d.alpha_min)  # [B, L]
  eps = noise.draw_eps(k_eps, x.shape, cfg) if noise.is_imdm(cfg) else None  # fresh per step
  return {'x': x, 'valid': batch['attention_mask'], 't': t, 'z_t': z_t, 'eps': eps}, k_drop


def nelbo_from_draws(params, graphdef, cfg: Config, rows, dropout_key, mask_id: int):
  denoise = sampling.model_denoiser(graphdef, cfg, mask_id, dropout_key)
  return loss.nelbo_loss(denoise, params, rows['x'], rows['z_t'], rows['eps'], rows['t'],
                         rows['valid'], mask_id)


def causal_lm_draws(cfg: Config, batch: Batch, key: PRNGKeyArray, mask_id: int):
  del cfg, mask_id  # next-token NLL draws nothing but dropout
  return {'x': batch['tokens'], 'valid': batch['attention_mask']}, key


def causal_lm_from_draws(params, graphdef, cfg: Config, rows, dropout_key, mask_id: int):
  """Next-token NLL under a causal LM (`model.arch='gpt2'`): (sum, number of targets)."""
  del cfg, mask_id
  x = rows['x']
  logits = nnx.merge(graphdef, params)(x, dropout_key=dropout_key)
  valid = rows['valid'][:, 1:].astype(jnp.float32)
  return jnp.sum(gpt2.token_nll(logits, x) * valid), jnp.sum(valid)


OBJECTIVES = {'dit': (nelbo_draws, nelbo_from_draws),
              'gpt2': (causal_lm_draws, causal_lm_from_draws)}


def loss_sums(params: Params, graphdef: nnx.GraphDef, cfg: Config, batch: Batch,
              key: PRNGKeyArray, train: bool, *, mask_id: int, arch: str | None = None
              ) -> tuple[Float[Array, ''], Float[Array, '']]:
  """The training objective of `arch` (default `cfg.model.arch`) on a batch, as (sum over tokens,
  token count): for the DiT one Monte-Carlo NELBO estimate."""
  draws, sums = OBJECTIVES[arch or cfg.model.arch]
  rows, k_drop = draws(cfg, batch, key, mask_id)
  return sums(params, graphdef, cfg, rows, k_drop if train else None, mask_id)


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


def apply_gradients(state: TrainState, grads, value, cfg: Config) -> tuple[TrainState, dict]:
  """One optimizer update and EMA step; shared by training and distillation."""
  tx = make_optimizer(cfg.optim)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  count = state.ema_count + 1
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            ema=ema_update(state.ema, params, count, cfg.optim.ema_decay),
                            ema_count=count)
  metrics = {'loss': value, 'grad_norm': optax.global_norm(grads)}
  if noise.is_imdm(cfg):
    metrics['imdm/noise_out_norm'] = noise_output_norm(params)
  return new_state, metrics


def noise_output_norm(params: Params) -> Float[Array, '']:
  """Norm of the layer that turns eps into the mask embedding (`model.noise_output`): 0 at init,
  its growth shows the network has started to use eps."""
  return jnp.sqrt(jnp.sum(jnp.square(model.noise_output(params))))


def train_step(state: TrainState, batch: Batch, *, graphdef: nnx.GraphDef, cfg: Config,
               mask_id: int) -> tuple[TrainState, dict[str, Array]]:
  """`train.py`: the objective of `cfg.model.arch` (the NELBO for the DiT)."""
  draws, sums = OBJECTIVES[cfg.model.arch]
  rows, k_drop = draws(cfg, batch, jax.random.fold_in(state.rng, state.step), mask_id)
  value, grads = accumulate_gradients(
      lambda params, micro, key: sums(params, graphdef, cfg, micro, key, mask_id),
      state.params, rows, k_drop, cfg.train.grad_accum)
  return apply_gradients(state, grads, value, cfg)


def sdtt_step(state: sdtt.SdttState, batch: Batch, *, graphdef: nnx.GraphDef, cfg: Config,
              mask_id: int) -> tuple[sdtt.SdttState, dict[str, Array]]:
  """`distill.py sdtt`: the NELBO's draws (t, z_t, eps shared by teacher and student), then
  `sdtt.sdtt_loss` against the round's frozen teacher."""
  student = state.student
  drawn, k_micro = nelbo_draws(cfg, batch, jax.random.fold_in(student.rng, student.step), mask_id)
  masked = ((drawn['z_t'] == mask_id) & (drawn['valid'] > 0)).astype(jnp.float32)
  weight = sdtt.stratum_weights(masked, cfg.sdtt.stratum_rows)  # [B, L]
  rows = {'z_t': drawn['z_t'], 't': drawn['t'], 'eps': drawn['eps'], 'weight': weight}
  teacher = sampling.model_denoiser(graphdef, cfg, mask_id)
  dt = sdtt.teacher_dt(cfg, state.round)

  def sums(params, r, key):
    # The teacher runs per micro-batch, so its [B, L, V] targets never exist for the whole batch;
    # its draws come from the micro-batch's key (same distribution as one big batch, not the
    # same numbers, unless the draws cannot matter).
    k_teacher, k_drop = jax.random.split(key)
    return sdtt.sdtt_loss(sampling.model_denoiser(graphdef, cfg, mask_id, k_drop), teacher,
                          params, state.teacher, k_teacher, r['z_t'], r['eps'], r['t'],
                          r['weight'], dt, mask_id, cfg.sdtt)

  value, grads = accumulate_gradients(sums, student.params, rows, k_micro, cfg.train.grad_accum)
  student, metrics = apply_gradients(student, grads, value, cfg)
  return state.replace(student=student), metrics


def redi_step(state: TrainState, batch: dict[str, Array], *, graphdef: nnx.GraphDef,
              cfg: Config, mask_id: int) -> tuple[TrainState, dict[str, Array]]:
  """`distill.py redi-train`: `redi.redi_loss` on a batch of stored couplings (z_T, x_hat,
  attention_mask [B, L]; t, seed [B])."""
  k_eps, k_drop = jax.random.split(jax.random.fold_in(state.rng, state.step))
  rows = {'z': batch['z_T'], 'x_hat': batch['x_hat'], 't': batch['t'],
          'valid': batch['attention_mask'], 'eps': redi.pair_eps(k_eps, batch, cfg)}

  def sums(params, r, key):
    denoise = sampling.model_denoiser(graphdef, cfg, mask_id, key)
    return redi.redi_loss(denoise, params, r['z'], r['x_hat'], r['eps'], r['t'], r['valid'],
                          mask_id)

  value, grads = accumulate_gradients(sums, state.params, rows, k_drop, cfg.train.grad_accum)
  return apply_gradients(state, grads, value, cfg)


def eval_step(params: Params, batch: Batch, key: PRNGKeyArray, *, graphdef: nnx.GraphDef,
              cfg: Config, mask_id: int) -> dict[str, Array]:
  total, count = loss_sums(params, graphdef, cfg, batch, key, train=False, mask_id=mask_id)
  return {'nll_sum': total, 'count': count}


def compile_train_step(cfg: Config, graphdef: nnx.GraphDef, mesh: Mesh, state, step_fn=train_step,
                       *, mask_id: int):
  """`step_fn` is `train_step`, `sdtt_step` or `redi_step` (or a test's wrapper of one)."""
  sharding.rows_per_device(cfg.train.batch_size, mesh.size, cfg.train.grad_accum)
  state_sh = sharding.tree_shardings(state, mesh, param_axes(cfg))
  return jax.jit(functools.partial(step_fn, graphdef=graphdef, cfg=cfg, mask_id=mask_id),
                 in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                 out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)


def compile_eval_step(cfg: Config, graphdef: nnx.GraphDef, mesh: Mesh, params: Params, *,
                      mask_id: int):
  return jax.jit(functools.partial(eval_step, graphdef=graphdef, cfg=cfg, mask_id=mask_id),
                 in_shardings=(sharding.tree_shardings(params, mesh, param_axes(cfg)),
                               sharding.batch_sharding(mesh), sharding.replicated(mesh)),
                 out_shardings=sharding.replicated(mesh))
