"""The SUBS parameterisation and the losses of the method (docs/method.md §1, §3).

Every loss takes the network as a pure function `denoise(params, z_t, eps, t) -> logits [B, L, V]`
(`sampling.model_denoiser` adapts the DiT; tests pass exact oracles), and returns sums, not
means — `(loss sum, weight sum)` — so callers aggregate exactly over micro-batches and devices.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from imdm_jax import schedule

NEG_INF = -1e6  # the reference's "-infinity": finite, so 0 * NEG_INF stays 0

# (params, z_t [B, L], eps [B, L, D] / [B, L] / None, t [B]) -> logits [B, L, V]; t matters only
# to time-conditioned networks, eps only to an IMDM
Denoise = Callable[[Any, Int[Array, 'B L'], Array | None, Float[Array, 'B']], Float[Array, 'B L V']]


def subs_log_probs(logits: Float[Array, 'B L V'], z_t: Int[Array, 'B L'],
                   mask_id: int) -> Float[Array, 'B L V']:
  """log x_theta(z_t): the mask is never predicted, and unmasked positions carry their token over.

  At a position holding a data token the row is a one-hot in log space (0 on the observed token,
  NEG_INF elsewhere): the reverse process never changes a revealed token.
  """
  logits = logits.astype(jnp.float32)
  logits = logits + NEG_INF * jax.nn.one_hot(mask_id, logits.shape[-1], dtype=logits.dtype)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  carry = jnp.where(jax.nn.one_hot(z_t, logits.shape[-1], dtype=jnp.bool_), 0.0, NEG_INF)
  return jnp.where((z_t == mask_id)[..., None], log_probs, carry)


def nelbo_loss(denoise: Denoise, params, x: Int[Array, 'B L'], z_t: Int[Array, 'B L'], eps,
               t: Float[Array, 'B'], valid: Int[Array, 'B L'],
               mask_id: int) -> tuple[Float[Array, ''], Float[Array, '']]:
  """The continuous-time NELBO of z_t ~ q(z_t | x): `sum_l w(t) (-log x_theta(z_t)[x_l])` over the
  masked positions, with `w(t) = -alpha'(t)/(1 - alpha(t))` (`schedule.nelbo_weighted`).

  Returns (sum over valid tokens, number of valid tokens): their quotient is the reference's
  reduction, which counts masked and unmasked valid tokens alike and excludes padding. ReDi's
  loss is this one on its stored pairs (`redi.redi_loss`). The target logit is gathered rather
  than the SUBS rows materialised (the same numbers, tested): the loss costs one logsumexp over V.
  """
  logits = denoise(params, z_t, eps, t).astype(jnp.float32)  # [B, L, V]
  not_mask = jnp.arange(logits.shape[-1]) != mask_id
  log_norm = jax.nn.logsumexp(jnp.where(not_mask, logits, NEG_INF), axis=-1)
  log_p = jnp.take_along_axis(logits, x[..., None], axis=-1)[..., 0] - log_norm  # [B, L]
  log_p = jnp.where(x == mask_id, NEG_INF, log_p)  # as SUBS: the mask is never a target
  per_token = jnp.where(z_t == mask_id, schedule.nelbo_weighted(-log_p, t), 0.0)
  valid = valid.astype(jnp.float32)
  return jnp.sum(per_token * valid), jnp.sum(valid)


def divergence(student: Float[Array, 'B L V'], teacher: Float[Array, 'B L V'],
               kind: str) -> Float[Array, 'B L']:
  """Per-position divergence between log-probability rows (SDTT's distillation losses)."""
  p_s, p_t = jnp.exp(student), jnp.exp(teacher)
  if kind == 'kl-bwd':  # KL(student || teacher): mode-seeking, the SDTT paper's best
    return jnp.sum(p_s * (student - teacher), axis=-1)
  if kind == 'kl-fwd':  # KL(teacher || student)
    return jnp.sum(p_t * (teacher - student), axis=-1)
  if kind == 'mse':  # on log-probs, over the tokens either side can produce
    live = (p_s > 0) | (p_t > 0)
    return jnp.sum(jnp.where(live, jnp.square(student - teacher), 0.0), -1) / student.shape[-1]
  if kind == 'tvd':
    return 0.5 * jnp.sum(jnp.abs(p_s - p_t), axis=-1)
  raise ValueError(f'unknown divergence {kind!r}')
