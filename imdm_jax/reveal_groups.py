"""The ancestral sampler in at most min(S, L) network calls, for denoisers that ignore t with eps
held fixed (MDLM; IMDM with `fix_eps`): exactly `sampler.sample`'s distribution, other draws.

Why it is exact: without resets, a masked position of `sampler.sample` stays masked at step k
w.p. `(1 - a_{k+1})/(1 - a_k)`, so it is revealed at step k w.p. `(a_{k+1} - a_k)/(1 - a_0)`
whatever the others do, and its token is drawn from x_theta of the sequence at that step. A
time-agnostic x_theta changes only when some position is revealed. So: draw every masked
position's reveal step first, then visit each sequence's reveal groups in order, one network
call per group, drawing the group's tokens from x_theta of the sequence so far. A 128-step
coupling run of a length-10 sequence makes at most 10 calls instead of up to 128 (the step
sampler's cache skips a step only when nothing in the whole batch changed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from imdm_jax import loss, schedule
from imdm_jax.config import Config
from imdm_jax.loss import Denoise
from imdm_jax.sampler import SamplerConfig, categorical, nucleus, time_grid


def exact_for(cfg: Config, scfg: SamplerConfig, imdm: bool) -> bool:
  """Whether `sample` has `sampler.sample`'s distribution under `cfg` and `scfg`."""
  return not cfg.model.time_conditioning and (scfg.fix_eps or not imdm)


def reveal_steps(key: PRNGKeyArray, z: Int[Array, 'B L'], grid: Float[Array, 'B T'],
                 mask_id: int, alpha_min: float) -> Int[Array, 'B L']:
  """The step (0 .. S-1) at which each masked position is revealed; S for given positions."""
  S = grid.shape[1] - 1
  alpha = schedule.alpha(grid, alpha_min)  # [B, S + 1]
  # P(revealed by the end of step k) = (a_{k+1} - a_0)/(1 - a_0); the last step ends at a = 1
  revealed_by = (alpha[:, 1:] - alpha[:, :1]) / (1.0 - alpha[:, :1])  # [B, S]
  revealed_by = revealed_by.at[:, -1].set(1.0)
  u = jax.random.uniform(key, z.shape, grid.dtype)  # [B, L]
  step = jax.vmap(lambda c, u: jnp.searchsorted(c, u, side='right'))(revealed_by, u)
  return jnp.where(z == mask_id, jnp.minimum(step, S - 1), S).astype(jnp.int32)


def sample(denoise: Denoise, params, key: PRNGKeyArray, z: Int[Array, 'B L'], eps, *,
           mask_id: int, cfg: Config, scfg: SamplerConfig, t0: Float[Array, 'B'] | None = None
           ) -> tuple[Int[Array, 'B L'], dict[str, Array]]:
  """`sampler.sample`'s contract (same arguments, same outputs; `resets` is always 0). Only for
  what `exact_for` accepts; `eps` is never re-drawn."""
  draw_dtype = jnp.float64 if scfg.float64 else jnp.float32
  (B, L), S = z.shape, scfg.steps
  starts = jnp.full((B,), 1.0) if t0 is None else t0
  grid = (starts[:, None] * time_grid(S)[None]).astype(draw_dtype)  # [B, S + 1]
  k_steps, k_draws = jax.random.split(key)
  step = reveal_steps(k_steps, z, grid, mask_id, cfg.diffusion.alpha_min)  # [B, L]

  def body(carry, r):
    z, nfe = carry
    group = jnp.min(jnp.where(z == mask_id, step, S), axis=1)  # [B]: next group's step, S: done
    t = jnp.take_along_axis(grid, jnp.minimum(group, S - 1)[:, None], 1)[:, 0]
    live = jnp.any(group < S)
    log_x = jax.lax.cond(  # the last rounds of a batch often have nothing left to reveal
        live, lambda: loss.subs_log_probs(denoise(params, z, eps, t) / scfg.temperature, z,
                                          mask_id),
        lambda: jnp.zeros((B, L, cfg.model.vocab_size), jnp.float32))  # [B, L, V]
    x_theta = jnp.exp(log_x.astype(draw_dtype))
    if scfg.top_p < 1.0:
      x_theta = nucleus(x_theta, scfg.top_p)
    draw = categorical(jax.random.fold_in(k_draws, r), x_theta)  # [B, L]
    if scfg.final == 'greedy':
      greedy = jnp.argmax(log_x, axis=-1).astype(jnp.int32)
      draw = jnp.where((group == S - 1)[:, None], greedy, draw)
    reveal = (z == mask_id) & (step == group[:, None])
    return (jnp.where(reveal, draw, z), nfe + live.astype(jnp.int32)), None

  (z, nfe), _ = jax.lax.scan(body, (z, jnp.int32(0)), jnp.arange(min(S, L)))
  left = (step[:, :, None] > jnp.arange(S)) & (step < S)[:, :, None]  # [B, L, S]
  masks = jnp.sum(left, axis=1, dtype=jnp.int32)  # [B, S]: masks left after each step
  return z, {'nfe': nfe, 'resets': jnp.int32(0), 'masks_per_step': masks}
