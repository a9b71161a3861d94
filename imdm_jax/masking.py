"""The forward masking kernel q(z_t | x) (docs/method.md §1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from imdm_jax import schedule


def mask_with_prob(key: PRNGKeyArray, x: Int[Array, 'B L'], p: Float[Array, 'B'],
                   mask_id: int) -> Int[Array, 'B L']:
  """Each position of row b independently becomes `mask_id` with probability `p[b]`."""
  move = jax.random.uniform(key, x.shape, jnp.float32) < p[:, None]
  return jnp.where(move, mask_id, x)


def mask_tokens(key: PRNGKeyArray, x: Int[Array, 'B L'], t: Float[Array, 'B'], mask_id: int,
                alpha_min: float = 1e-3) -> Int[Array, 'B L']:
  """Draws z_t ~ q(z_t | x): each position independently becomes `mask_id` w.p. 1 - alpha(t)."""
  return mask_with_prob(key, x, schedule.mask_prob(t, alpha_min), mask_id)
