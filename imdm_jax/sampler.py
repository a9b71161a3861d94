"""The reverse process: ancestral MDLM and IMDM samplers, the whole loop one compiled program.

`sample(denoiser, ...)` is pure: `denoiser(z, eps, t) -> logits [B, L, V]` may be the DiT or an exact
oracle (tests). Steps follow method.md §1-§2 on the grid `t_k = t0 * linspace(1, 1e-5, S + 1)`:

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
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int, PRNGKeyArray

from imdm_jax import loss, noise, schedule, sharding
from imdm_jax.config import Config
from imdm_jax.errors import UserError

T_MIN = 1e-5
FINAL_MODES = ('ancestral', 'greedy')

# (z_t, eps or None, t [B]) -> logits; t matters only to time-conditioned networks
Denoiser = Callable[[Int[Array, 'B L'], Array | None, Float[Array, 'B']], Float[Array, 'B L V']]


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  steps: int = 128
  t0: float = 1.0  # start time, for a z_init that is already partly revealed (ReDi couplings)
  final: str = 'ancestral'  # or 'greedy': the last step takes the argmax
  float64: bool = True  # categorical draws in float64
  temperature: float = 1.0
  top_p: float = 1.0  # nucleus sampling when < 1
  cache: bool = True  # reuse x_theta after a step that changed nothing
  fix_eps: bool = False  # IMDM: never re-draw eps (SDTT's teacher)


def time_grid(steps: int, t0: float = 1.0) -> Float[Array, 'S+1']:
  return t0 * jnp.linspace(1.0, T_MIN, steps + 1)


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


def sample(denoiser: Denoiser, key: PRNGKeyArray, z: Int[Array, 'B L'], eps, *, mask_id: int,
           cfg: Config, scfg: SamplerConfig, t0: Float[Array, 'B'] | None = None
           ) -> tuple[Int[Array, 'B L'], dict[str, Array]]:
  """Runs the reverse process from `z` (masks where unknown, tokens where given) to t = 0.

  `t0`: per-sequence start times (ReDi couplings start each pair at its own t); default
  `scfg.t0` for all.

  `eps`: the IMDM mask noise of z ([B, L, D] or [B, L] states), None for MDLM. Returns the
  samples and {'nfe': network calls, 'resets': eps re-draws, 'masks_per_step': [B, S] masks left
  after each step}. Trace under
  `jax.enable_x64(scfg.float64)` (see `compile_sampler`) for float64 draws.
  """
  imdm = eps is not None
  with_reset = imdm and not scfg.fix_eps
  draw_dtype = jnp.float64 if scfg.float64 else jnp.float32
  B, L = z.shape
  starts = jnp.full((B,), scfg.t0) if t0 is None else t0
  grid = (starts[:, None] * time_grid(scfg.steps)[None]).astype(draw_dtype)  # [B, S + 1]
  a_eps = cfg.diffusion.eps

  def x_theta_of(z, eps, t):
    return loss.subs_log_probs(denoiser(z, eps, t) / scfg.temperature, z, mask_id)

  def body(carry, k):
    z, eps, log_x, changed, nfe, resets = carry
    k_draw, k_eps = jax.random.split(jax.random.fold_in(key, k))
    if scfg.cache:
      log_x = jax.lax.cond(changed, x_theta_of, lambda *_: log_x, z, eps, grid[:, k])
      nfe = nfe + changed.astype(jnp.int32)
    else:
      log_x, nfe = x_theta_of(z, eps, grid[:, k]), nfe + 1
    last = k == scfg.steps - 1
    alpha_t = schedule.alpha(grid[:, k], a_eps)[:, None]  # [B, 1]
    alpha_s = jnp.where(last, 1.0, schedule.alpha(grid[:, k + 1], a_eps))[:, None]
    x_theta = jnp.exp(log_x.astype(draw_dtype))
    if scfg.top_p < 1.0:
      x_theta = nucleus(x_theta, scfg.top_p)
    draw = categorical(k_draw, transition_probs(x_theta, alpha_t, alpha_s, mask_id, with_reset))
    if scfg.final == 'greedy':
      draw = jnp.where(last, jnp.argmax(log_x, axis=-1).astype(jnp.int32), draw)
    masked = z == mask_id
    reset = masked & (draw == x_theta.shape[-1])  # the extra slot
    new_z = jnp.where(masked & ~reset, draw, z)
    if with_reset:
      eps = noise.resample(k_eps, eps, reset, cfg)
    changed = jnp.any(new_z != z) | jnp.any(reset)
    carry = (new_z, eps, log_x, changed, nfe, resets + jnp.sum(reset, dtype=jnp.int32))
    return carry, jnp.sum(new_z == mask_id, axis=-1, dtype=jnp.int32)

  log_x = jnp.zeros((B, L, cfg.model.vocab_size), jnp.float32)
  init = (z, eps, log_x, jnp.array(True), jnp.int32(0), jnp.int32(0))
  (z, _, _, _, nfe, resets), masks = jax.lax.scan(body, init, jnp.arange(scfg.steps))
  return z, {'nfe': nfe, 'resets': resets, 'masks_per_step': masks.T}


def validate(scfg: SamplerConfig, cfg: Config) -> None:
  if scfg.steps < 1:
    raise UserError(f'steps must be >= 1, got {scfg.steps}')
  if scfg.final not in FINAL_MODES:
    raise UserError(f'final={scfg.final!r}: expected one of {", ".join(FINAL_MODES)}')
  if not 0.0 < scfg.t0 <= 1.0 or scfg.temperature <= 0 or not 0.0 < scfg.top_p <= 1.0:
    raise UserError('need 0 < t0 <= 1, temperature > 0 and 0 < top_p <= 1')
  if scfg.cache and cfg.model.time_conditioning:
    raise UserError('the cached sampler needs a denoiser that ignores t (model.time_conditioning)')


def model_denoiser(params, graphdef, cfg: Config) -> Denoiser:
  model = nnx.merge(graphdef, params)

  def denoiser(z, eps, t):
    sigma = jnp.broadcast_to(schedule.sigma(t, cfg.diffusion.eps), (z.shape[0],))
    sigma = sigma.astype(jnp.float32)
    return model(z, sigma, eps)

  return denoiser


def compile_sampler(cfg: Config, graphdef, mesh: Mesh, scfg: SamplerConfig, mask_id: int):
  """`run(params, key, z, eps) -> (samples, stats)`: the DiT sampler compiled over the mesh, the
  batch split over all devices, traced in float64 mode when `scfg.float64`. Under several
  processes every process calls it with the same `key`, `z` [B, L] and `eps` (the whole batch);
  each feeds its own devices' rows and gets every sample back."""
  validate(scfg, cfg)

  def program(params, key, z, eps):
    return sample(model_denoiser(params, graphdef, cfg), key, z, eps, mask_id=mask_id, cfg=cfg,
                  scfg=scfg)

  batch, everywhere = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  # the outputs are gathered onto every device, so each process can read them locally
  jitted = jax.jit(program, out_shardings=everywhere)

  def run(params, key, z, eps=None):
    with jax.enable_x64(scfg.float64):
      put = sharding.host_to_global
      return jitted(params, put(key, everywhere), put(z, batch),
                    None if eps is None else put(eps, batch))

  return run
