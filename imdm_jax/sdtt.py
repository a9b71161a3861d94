"""SDTT: self-distillation through time (method.md §3), for MDLM and IMDM students.

Round r (0-based) distils a frozen teacher taking two ancestral steps of size
`dt_r = (1 - eps)/1024 * 2^r` into a student taking one step of size 2 dt_r: with the default 7
rounds a 1024-step sampler becomes an 8-step one. The teacher is frozen within a round (no
gradient, no optimizer state) and is replaced by the raw (non-EMA) student at each boundary.

Per step: antithetic t, z_t by masking, one eps shared by teacher and student (IMDM), the
teacher's two steps from z_t with eps held fixed (no resets), and a target per masked position:
the teacher's x_theta from the step that revealed it, or from the last step if it is still masked.
The student's SUBS distribution at z_t is pulled towards it by `distill.divergence`, averaged over
the masked positions. Teacher draws are float32 exponential races inside the jitted step (the
samplers' float64 mode needs an x64 trace of the whole train step; not done yet).
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int, PRNGKeyArray

from imdm_jax import loss, masking, noise, sampler, schedule
from imdm_jax.config import Config
from imdm_jax.train_state import Params, TrainState
from imdm_jax.train_step import Batch, apply_gradients

GRID_OFFSETS = {'intended': (1.0, 2.0), 'wide': (2.0, 4.0)}  # teacher step ends, in units of dt


@flax.struct.dataclass
class SdttState:
  student: TrainState
  teacher: Params  # frozen within a round
  round: jax.Array  # int32 []


def teacher_dt(cfg: Config, round_: jax.Array) -> jax.Array:
  return (1.0 - cfg.diffusion.eps) / 1024.0 * 2.0 ** round_.astype(jnp.float32)


def teacher_targets(denoiser: sampler.Denoiser, key: PRNGKeyArray, z_t: Int[Array, 'B L'], eps,
                    t: Float[Array, 'B'], dt: Float[Array, ''], mask_id: int,
                    cfg: Config) -> tuple[Float[Array, 'B L V'], Int[Array, 'B L']]:
  """The teacher's target log-probabilities per position, and the step (1 or 2; 0: still masked
  after both) in which each position masked in z_t was revealed."""
  k1, k2 = jax.random.split(key)
  end1, end2 = GRID_OFFSETS[cfg.distill.teacher_grid]
  a = lambda u: schedule.alpha(jnp.clip(u, 0.0, 1.0), cfg.diffusion.eps)[:, None]  # [B, 1]

  def step(key, z, start, end):
    log_x = loss.subs_log_probs(denoiser(z, eps, start), z, mask_id)
    probs = sampler.transition_probs(jnp.exp(log_x), a(start), a(end), mask_id, with_reset=False)
    draw = sampler.categorical(key, probs)
    revealed = (z == mask_id) & (draw != mask_id)
    return log_x, jnp.where(revealed, draw, z), revealed

  log_x1, z1, revealed1 = step(k1, z_t, t, t - end1 * dt)
  log_x2, _, revealed2 = step(k2, z1, t - end1 * dt, t - end2 * dt)
  target = jnp.where(revealed1[..., None], log_x1, log_x2)
  revealed_in = jnp.where(revealed1, 1, jnp.where(revealed2, 2, 0))
  return target, revealed_in


def sdtt_step(state: SdttState, batch: Batch, *, graphdef: nnx.GraphDef,
              cfg: Config) -> tuple[SdttState, dict[str, Array]]:
  student = state.student
  k_t, k_mask, k_eps, k_teacher, k_drop = jax.random.split(
      jax.random.fold_in(student.rng, student.step), 5)
  x = batch['tokens']
  mask_id = nnx.merge(graphdef, state.teacher).mask_id
  t = schedule.sample_t(k_t, x.shape[0], cfg.diffusion.eps, cfg.diffusion.antithetic)
  z_t = masking.mask_tokens(k_mask, x, t, mask_id, cfg.diffusion.eps)
  eps = noise.draw_eps(k_eps, x.shape, cfg) if noise.is_imdm(cfg) else None  # shared
  target, _ = teacher_targets(sampler.model_denoiser(state.teacher, graphdef, cfg), k_teacher, z_t,
                              eps, t, teacher_dt(cfg, state.round), mask_id, cfg)
  target = jax.lax.stop_gradient(target)
  weight = ((z_t == mask_id) & (batch['attention_mask'] > 0)).astype(jnp.float32)

  def objective(params):
    logits = nnx.merge(graphdef, params)(z_t, schedule.sigma(t, cfg.diffusion.eps), eps,
                                         dropout_key=k_drop)
    div = loss.divergence(loss.subs_log_probs(logits, z_t, mask_id), target, cfg.distill.divergence)
    return jnp.sum(div * weight) / jnp.maximum(jnp.sum(weight), 1.0)

  value, grads = jax.value_and_grad(objective)(student.params)
  student, metrics = apply_gradients(student, grads, value, cfg)
  return state.replace(student=student), metrics


def next_round(state: SdttState) -> SdttState:
  """A round boundary: the raw student becomes the teacher (a copy: the step donates its input)."""
  return state.replace(teacher=jax.tree.map(jnp.copy, state.student.params),
                       round=state.round + 1)
