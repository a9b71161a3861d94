"""SDTT: self-distillation through time (docs/method.md §3), for MDLM and IMDM students.

Round r (0-based) distils a frozen teacher taking two ancestral steps of size
`dt_r = (1 - alpha_min)/base_steps * 2^r` (`sdtt.base_steps`, 1024 by default) into a
student taking one step of size 2 dt_r: with the default 7 rounds a 1024-step sampler becomes an
8-step one. The teacher is frozen within a round (no gradient, no optimizer state) and is
replaced by the raw (non-EMA) student at each boundary.

Per step (`train_step.sdtt_step`): antithetic t, z_t by masking, one eps shared by teacher and
student (IMDM), the teacher's two steps from z_t (`two_teacher_steps`: the grid) with eps held
fixed (no resets), and a target per masked position: the teacher's x_theta from the step that
revealed it, or from the last step if it is still masked (`teacher_targets`). The student's SUBS
distribution at z_t is pulled towards it by `sdtt.divergence`, averaged over the masked
positions of each block of `sdtt.stratum_rows` rows and then over blocks, as the official code
reduces it (`stratum_weights`, `sdtt_loss`).

Teacher draws are exponential races whose Exp(1) variates come from 64 random bits each
(`exponential_from_bits`): they resolve tails as finely as the samplers' float64 draws (finer,
in fact) while the step itself stays a float32 trace. A float64 draw proper would need the whole
step traced under `jax.enable_x64` — which the trainer does not do, and which would also change
the student's float32 math (default dtypes of t, of uniform draws) — and entering x64 inside a
trace fails (reductions built outside it keep float32 init values).
"""

from __future__ import annotations

import typing

import flax
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from imdm_jax import loss, sampler, schedule
from imdm_jax.config import Config, SdttConfig
from imdm_jax.loss import Denoise
from imdm_jax.train_state import Params, TrainState


# Rebuilt by JAX with other leaves (ShapeDtypeStructs, shardings), as `TrainState`: its
# constructor's annotations are not checked at run time (the jaxtyping hook of tests/conftest.py).
@typing.no_type_check
@flax.struct.dataclass
class SdttState:
  student: TrainState
  teacher: Params  # frozen within a round
  round: jax.Array  # int32 []


def teacher_dt(cfg: Config, round_: jax.Array) -> jax.Array:
  return (1.0 - cfg.diffusion.alpha_min) / cfg.sdtt.base_steps * 2.0 ** round_.astype(jnp.float32)


Step = tuple[Float[Array, 'B'], Float[Array, 'B']]  # (start time, length): start -> start - length


def two_teacher_steps(t: Float[Array, 'B'], dt: Float[Array, ''], grid: str) -> tuple[Step, Step]:
  """The teacher's two ancestral steps from z_t (`sdtt.teacher_grid`), per sequence:

  - 'intended' (docs/method.md §3): t -> t - dt, then t - dt -> t - 2dt. The official IMDM code
    (`IMSDTT`) takes these two steps of dt from t to t - 2dt.
  - 'slip': the grid of the original SDTT code (jdeschena/sdtt,
    src/sdtt/core/distill/multi_round_sdtt.py, `MultiRoundSDTT._teacher_logprobs_on_mask`, with
    `num_distill_steps: 2` from configs/parameterization/multi-round-sdtt.yaml). It builds the
    step starts as `t * u + (1 - t) * t_end` for u in linspace(1, 0, 2) = (1, 0) and
    t_end = t - 2dt — the interpolation weight is `1 - t` where `1 - u` was meant — clamps them
    below at its sampling eps (1e-5, our `sampler.T_MIN`), and takes from each start one step of
    length dt (`AncestralSampler._compute_ddpm_update` in core/sampling/ancestral.py goes from
    t to t - dt). So: s0 -> s0 - dt, then s1 -> s1 - dt with s0 = t + (1 - t)(t - 2dt) and
    s1 = (1 - t)(t - 2dt). The second step starts from the first step's output whatever its
    time; the starts are not snapped to any grid (the code's `T: 0`, continuous time). With
    t = 0.5 and dt = 0.1: 0.65 -> 0.55, then 0.15 -> 0.05 (intended: 0.5 -> 0.4 -> 0.3), so a
    masked position is revealed w.p. 0.1/0.65 then 0.1/0.15 instead of 0.1/0.5 then 0.1/0.4.
    The code's dt_0 is (1 - 1e-5)/1024; ours uses `diffusion.alpha_min` (1e-3) in its place.

  A step that would end below 0 ends at 0 (every masked position revealed).
  """
  dt = jnp.broadcast_to(dt, t.shape)
  if grid == 'intended':
    return (t, dt), (t - dt, dt)
  if grid == 'slip':
    t_end = t - 2.0 * dt
    starts = (t + (1.0 - t) * t_end, (1.0 - t) * t_end)
    return tuple((jnp.maximum(s, sampler.T_MIN), dt) for s in starts)
  raise ValueError(f'unknown teacher grid {grid!r}')


def exponential_from_bits(hi: Array, lo: Array) -> Float[Array, '*shape']:
  """Exp(1) variates in float32 from 64 uniform random bits each (uint32 `hi`, `lo`, any shape):
  `-log(1 - V)` with V = (hi 2^32 + lo + 1/2) / 2^64, evaluated as `-log1p(-V)` when V < 1/2 and
  as `-log(W)` with W = 1 - V rebuilt exactly from the complemented bits otherwise, so both ends
  keep float32's relative precision: the smallest value is 2^-65 (~2.7e-20; float64 uniforms stop
  at ~1.1e-16, float32 ones at ~1.2e-7) and the largest ~45. An exponential race on them draws
  tokens 1e-9 (or 1e-15) as likely as the best one at their true rate, where a race on float32
  uniforms never draws them (`sampler.categorical`'s note)."""
  fraction = lambda hi, lo: (hi.astype(jnp.float32) +
                             (lo.astype(jnp.float32) + 0.5) * 2.0 ** -32) * 2.0 ** -32
  small = (hi >> 31) == 0  # V < 1/2
  return jnp.where(small, -jnp.log1p(-fraction(hi, lo)), -jnp.log(fraction(~hi, ~lo)))


def exponential(key: PRNGKeyArray, shape: tuple[int, ...]) -> Float[Array, '*shape']:
  hi, lo = jax.random.bits(key, (2, *shape), jnp.uint32)
  return exponential_from_bits(hi, lo)


def categorical(key: PRNGKeyArray, probs: Float[Array, '... K']) -> Int[Array, '...']:
  """An exact draw from unnormalised `probs`: the exponential race `argmax p / E` of
  `sampler.categorical`, with the 64-bit variates of `exponential_from_bits`."""
  return jnp.argmax(probs / exponential(key, probs.shape), axis=-1).astype(jnp.int32)


def teacher_targets(teacher: Denoise, teacher_params, key: PRNGKeyArray, z_t: Int[Array, 'B L'],
                    eps, t: Float[Array, 'B'], dt: Float[Array, ''], mask_id: int,
                    grid: str) -> tuple[Float[Array, 'B L V'], Int[Array, 'B L']]:
  """The teacher's target log-probabilities per position, and the step (1 or 2; 0: still masked
  after both) in which each position masked in z_t was revealed."""
  k1, k2 = jax.random.split(key)

  def step(key, z, start, length):
    log_x = loss.subs_log_probs(teacher(teacher_params, z, eps, start), z, mask_id)
    # a step between alphas 0 and r has the transition of one from t to s with
    # (alpha_s - alpha_t)/(1 - alpha_t) = r
    reveal = schedule.reveal_prob(start, length)[:, None]  # [B, 1]
    probs = sampler.transition_probs(jnp.exp(log_x), 0.0, reveal, mask_id, with_reset=False)
    draw = categorical(key, probs)
    revealed = (z == mask_id) & (draw != mask_id)
    return log_x, jnp.where(revealed, draw, z), revealed

  first, second = two_teacher_steps(t, dt, grid)
  log_x1, z1, revealed1 = step(k1, z_t, *first)
  log_x2, _, revealed2 = step(k2, z1, *second)
  target = jnp.where(revealed1[..., None], log_x1, log_x2)
  revealed_in = jnp.where(revealed1, 1, jnp.where(revealed2, 2, 0))
  return target, revealed_in


def sdtt_loss(student: Denoise, teacher: Denoise, params, teacher_params, key: PRNGKeyArray,
              z_t: Int[Array, 'B L'], eps, t: Float[Array, 'B'], weight: Float[Array, 'B L'],
              dt: Float[Array, ''], mask_id: int,
              cfg: SdttConfig) -> tuple[Float[Array, ''], Float[Array, '']]:
  """The student's one step pulled towards the teacher's two: `sum_l weight_l D(x_student(z_t)_l,
  target_l)` over the positions masked in z_t (`weight` also drops padding), with D =
  `cfg.divergence` and the teacher's targets held constant. Returns (that sum, sum of weights)."""
  target, _ = teacher_targets(teacher, teacher_params, key, z_t, eps, t, dt, mask_id,
                              cfg.teacher_grid)
  log_student = loss.subs_log_probs(student(params, z_t, eps, t), z_t, mask_id)  # [B, L, V]
  div = loss.divergence(log_student, jax.lax.stop_gradient(target), cfg.divergence)
  return jnp.sum(div * weight), jnp.sum(weight)


def stratum_weights(masked: Float[Array, 'B L'], stratum_rows: int) -> Float[Array, 'B L']:
  """Per-position loss weights that make `sum(div * w) / sum(w)` the mean over blocks of
  `stratum_rows` consecutive rows of each block's mean over its `masked` positions (1 where a
  position counts); blocks without one are left out. `stratum_rows=0`: `masked` itself, one mean
  over the batch."""
  if not stratum_rows:
    return masked
  B, L = masked.shape
  blocks = masked.reshape(B // stratum_rows, stratum_rows * L)
  counts = jnp.sum(blocks, axis=1, keepdims=True)  # [G, 1]
  return (blocks / jnp.maximum(counts, 1.0) / blocks.shape[0]).reshape(B, L)


def advance_rounds(state: SdttState, completed_steps: int, round_steps: int) -> SdttState:
  """The state for the next step after `completed_steps` student updates: round r covers updates
  [r, r + 1) x round_steps, so a resumed run lands in its round with the saved teacher."""
  while int(state.round) < completed_steps // round_steps:
    state = next_round(state)
  return state


def next_round(state: SdttState) -> SdttState:
  """A round boundary: the raw student becomes the teacher (a copy: the step donates its input)."""
  return state.replace(teacher=jax.tree.map(jnp.copy, state.student.params),
                       round=state.round + 1)
