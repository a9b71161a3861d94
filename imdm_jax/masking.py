"""The forward masking kernel q(z_t | x) (method.md §1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from imdm_jax import schedule


def mask_tokens(key: PRNGKeyArray, x: Int[Array, 'B L'], t: Float[Array, 'B'], mask_id: int,
                eps: float = 1e-3) -> Int[Array, 'B L']:
  """Draws z_t ~ q(z_t | x): each position independently becomes `mask_id` w.p. 1 - alpha(t)."""
  move = jax.random.uniform(key, x.shape, jnp.float32) < (1.0 - schedule.alpha(t, eps))[:, None]
  return jnp.where(move, mask_id, x)
