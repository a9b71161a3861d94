"""SUBS parameterisation and the continuous-time NELBO (method.md §1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

NEG_INF = -1e6  # the reference's "-infinity": finite, so 0 * NEG_INF stays 0


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


def nelbo_per_token(log_probs: Float[Array, 'B L V'], x: Int[Array, 'B L'],
                    t: Float[Array, 'B']) -> Float[Array, 'B L']:
  """`(1/t) * (-log x_theta[x])`: the NELBO weight `-alpha'(t)/(1 - alpha(t))` is exactly 1/t for
  the log-linear schedule. Unmasked positions contribute 0 through the SUBS carry-over."""
  log_p = jnp.take_along_axis(log_probs, x[..., None], axis=-1)[..., 0]
  return -log_p / t[:, None]


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


def nelbo(logits: Float[Array, 'B L V'], x: Int[Array, 'B L'], z_t: Int[Array, 'B L'],
          t: Float[Array, 'B'], valid: Int[Array, 'B L'],
          mask_id: int) -> tuple[Float[Array, ''], Float[Array, '']]:
  """Returns (sum of per-token NELBO over valid tokens, number of valid tokens).

  Dividing the two gives the reference's reduction: padding is excluded from both, masked and
  unmasked valid tokens alike are counted. Sums (not means) let callers aggregate exactly over
  batches and devices. Equal to `nelbo_per_token(subs_log_probs(...))` (tested), but gathers the
  target logit instead of materialising the SUBS rows: the loss then costs one logsumexp over V.
  """
  logits = logits.astype(jnp.float32)
  not_mask = jnp.arange(logits.shape[-1]) != mask_id
  log_norm = jax.nn.logsumexp(jnp.where(not_mask, logits, NEG_INF), axis=-1)
  log_p = jnp.take_along_axis(logits, x[..., None], axis=-1)[..., 0] - log_norm
  log_p = jnp.where(x == mask_id, NEG_INF, log_p)  # as SUBS: the mask is never a target
  per_token = jnp.where(z_t == mask_id, -log_p / t[:, None], 0.0)
  valid = valid.astype(jnp.float32)
  return jnp.sum(per_token * valid), jnp.sum(valid)
