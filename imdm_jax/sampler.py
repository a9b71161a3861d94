"""The reverse process: ancestral MDLM and IMDM samplers, the whole loop one `lax.scan`
(docs/method.md §1-§2). The math only; `sampling.py` compiles it over the device mesh.

`sample(denoise, params, ...)` is pure: `denoise(params, z_t, eps, t) -> logits [B, L, V]` may be
the DiT or an exact oracle (tests). Steps run on the grid `t_k = t0 * linspace(1, 1e-5, S + 1)`:

- MDLM: a masked position unmasks to `v` w.p. `(a_s - a_t)/(1 - a_t) x_theta[v]`, stays masked
  w.p. `(1 - a_s)/(1 - a_t)`; unmasked (and given) positions never change.
- IMDM: the stay-masked mass splits into keep-eps `a_t (1 - a_s) / (a_s (1 - a_t))` and reset
  `(1 - a_t/a_s)(1 - a_s)/(1 - a_t)`: a `(V + 1)`-way draw whose extra slot re-draws eps.
- The last step has `a_s = 1`: every remaining mask is drawn from x_theta ("ancestral" removal),
  or its argmax ("greedy").
- Cached: the denoiser ignores t, so a step that changed nothing (no reveal, no reset) reuses the
  previous x_theta — a `lax.cond` inside the loop, so the skip is real at run time.
- Draws are an exponential race `argmax p / E`, E ~ Exp(1), in float64 by default: float32 noise
  truncates the tails and lowers the effective temperature (Zheng et al. 2024).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from imdm_jax import loss, noise, schedule
from imdm_jax.config import FINAL_MODES, Config
from imdm_jax.errors import UserError
from imdm_jax.loss import Denoise

T_MIN = 1e-5


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  steps: int = 128
  final: str = 'ancestral'  # or 'greedy': the last step takes the argmax
  float64: bool = True  # categorical draws in float64
  temperature: float = 1.0
  top_p: float = 1.0  # nucleus sampling when < 1
  cache: bool = True  # reuse x_theta after a step that changed nothing
  fix_eps: bool = False  # IMDM: never re-draw eps (SDTT's teacher)

  def validate(self, cfg: Config) -> None:
    if self.steps < 1:
      raise UserError(f'steps must be >= 1, got {self.steps}')
    if self.final not in FINAL_MODES:
      raise UserError(f'final={self.final!r}: expected one of {", ".join(FINAL_MODES)}')
    if not 0.0 < self.temperature < float('inf') or not 0.0 < self.top_p <= 1.0:
      raise UserError(f'need 0 < temperature < inf and 0 < top_p <= 1, got temperature '
                      f'{self.temperature}, top_p {self.top_p}')
    if self.cache and cfg.model.time_conditioning:
      raise UserError('the cached sampler needs a denoiser that ignores t (model.time_conditioning)')


def time_grid(steps: int) -> Float[Array, '{steps}+1']:
  return jnp.linspace(1.0, T_MIN, steps + 1)


def categorical(key: PRNGKeyArray, probs: Float[Array, '... K']) -> Int[Array, '...']:
  """An exact draw from unnormalised `probs`, in their own precision: the index maximising
  p_k / E_k with E_k ~ Exp(1) i.i.d. is distributed as p_k / sum(p).

  E = -log(U), U in (0, 1): its smallest value is ~1e-7 in float32 (so tokens much less likely
  than the best one can never win: a lowered temperature) but ~1e-16 in float64.
  """
  u = jax.random.uniform(key, probs.shape, probs.dtype, minval=jnp.finfo(probs.dtype).tiny)
  return jnp.argmax(probs / -jnp.log(u), axis=-1).astype(jnp.int32)


def nucleus(probs: Float[Array, '... V'], top_p: float) -> Float[Array, '... V']:
  """Keeps the smallest set of most likely tokens whose mass reaches `top_p`, renormalised."""
  ordered = jnp.sort(probs, axis=-1)[..., ::-1]
  before = jnp.cumsum(ordered, axis=-1) - ordered  # mass of strictly more likely tokens
  kept = jnp.where(before < top_p, ordered, jnp.inf)
  threshold = jnp.min(kept, axis=-1, keepdims=True)
  probs = jnp.where(probs >= threshold, probs, 0.0)
  return probs / jnp.sum(probs, axis=-1, keepdims=True)


def transition_probs(x_theta: Float[Array, 'B L V'], alpha_t, alpha_s, mask_id: int,
                     with_reset: bool) -> Float[Array, 'B L K']:
  """Unnormalised reverse-step probabilities of a masked position: V slots (the mask slot meaning
  "stay masked, keep eps"), plus a reset slot when eps may be re-drawn (K = V + 1). The alphas
  are scalars or broadcast against `[B, L]`."""
  alpha_t, alpha_s = jnp.asarray(alpha_t), jnp.asarray(alpha_s)
  slot = lambda v: jnp.broadcast_to(v, x_theta.shape[:-1])
  probs = x_theta * ((alpha_s - alpha_t) / (1.0 - alpha_t))[..., None]
  stay = (1.0 - alpha_s) / (1.0 - alpha_t)
  if not with_reset:
    return probs.at[..., mask_id].set(slot(stay))
  keep = alpha_t * (1.0 - alpha_s) / (alpha_s * (1.0 - alpha_t))
  probs = probs.at[..., mask_id].set(slot(keep))
  return jnp.concatenate([probs, slot(stay - keep)[..., None]], -1)


def reverse_step(key: PRNGKeyArray, z_t: Int[Array, 'B L'], x_theta: Float[Array, 'B L V'],
                 alpha_t: Float[Array, 'B 1'], alpha_s: Float[Array, 'B 1'], mask_id: int,
                 with_reset: bool) -> tuple[Int[Array, 'B L'], Array]:
  """One step t -> s of the MDLM (`with_reset=False`) or IMDM posterior at every position.

  A masked position is revealed as `v ~ x_theta`, stays masked with its eps, or (IMDM) stays
  masked with a fresh eps; other positions are copied. Returns `z_s` and the bool `[B, L]` mask
  of the positions whose eps is to be re-drawn (`noise.resample`).
  """
  draw = categorical(key, transition_probs(x_theta, alpha_t, alpha_s, mask_id, with_reset))
  masked = z_t == mask_id
  reset = masked & (draw == x_theta.shape[-1])  # the extra slot
  return jnp.where(masked & ~reset, draw, z_t), reset


def sample(denoise: Denoise, params, key: PRNGKeyArray, z: Int[Array, 'B L'], eps, *,
           mask_id: int, cfg: Config, scfg: SamplerConfig, t0: Float[Array, 'B'] | None = None
           ) -> tuple[Int[Array, 'B L'], dict[str, Array]]:
  """Runs the reverse process from `z` (masks where unknown, tokens where given) to t = 0.

  `t0`: per-sequence start times (ReDi couplings start each pair at its own t); default 1.
  `eps`: the IMDM mask noise of z ([B, L, D] or [B, L] states), None for MDLM. Returns the
  samples and {'nfe': network calls, 'resets': eps re-draws, 'masks_per_step': [B, S] masks left
  after each step}. Trace under `jax.enable_x64(scfg.float64)` (`sampling.compile_sampler`
  does) for float64 draws.
  """
  with_reset = eps is not None and not scfg.fix_eps
  draw_dtype = jnp.float64 if scfg.float64 else jnp.float32
  B, L = z.shape
  starts = jnp.full((B,), 1.0) if t0 is None else t0
  grid = (starts[:, None] * time_grid(scfg.steps)[None]).astype(draw_dtype)  # [B, S + 1]
  alpha_min = cfg.diffusion.alpha_min

  def x_theta_of(z, eps, t):
    return loss.subs_log_probs(denoise(params, z, eps, t) / scfg.temperature, z, mask_id)

  def body(carry, k):
    z, eps, log_x, changed, nfe, resets = carry
    k_draw, k_eps = jax.random.split(jax.random.fold_in(key, k))
    if scfg.cache:
      log_x = jax.lax.cond(changed, x_theta_of, lambda *_: log_x, z, eps, grid[:, k])
      nfe = nfe + changed.astype(jnp.int32)
    else:
      log_x, nfe = x_theta_of(z, eps, grid[:, k]), nfe + 1
    last = k == scfg.steps - 1
    alpha_t = schedule.alpha(grid[:, k], alpha_min)[:, None]  # [B, 1]
    alpha_s = jnp.where(last, 1.0, schedule.alpha(grid[:, k + 1], alpha_min))[:, None]
    x_theta = jnp.exp(log_x.astype(draw_dtype))
    if scfg.top_p < 1.0:
      x_theta = nucleus(x_theta, scfg.top_p)
    new_z, reset = reverse_step(k_draw, z, x_theta, alpha_t, alpha_s, mask_id, with_reset)
    if scfg.final == 'greedy':  # the last step takes the argmax instead of a draw
      greedy = jnp.where(z == mask_id, jnp.argmax(log_x, axis=-1).astype(jnp.int32), z)
      new_z, reset = jnp.where(last, greedy, new_z), reset & ~last
    if with_reset:
      eps = noise.resample(k_eps, eps, reset, cfg)
    changed = jnp.any(new_z != z) | jnp.any(reset)
    carry = (new_z, eps, log_x, changed, nfe, resets + jnp.sum(reset, dtype=jnp.int32))
    return carry, jnp.sum(new_z == mask_id, axis=-1, dtype=jnp.int32)

  log_x = jnp.zeros((B, L, cfg.model.vocab_size), jnp.float32)
  init = (z, eps, log_x, jnp.array(True), jnp.int32(0), jnp.int32(0))
  (z, _, _, _, nfe, resets), masks = jax.lax.scan(body, init, jnp.arange(scfg.steps))
  return z, {'nfe': nfe, 'resets': resets, 'masks_per_step': masks.T}
