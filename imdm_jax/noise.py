"""IMDM mask noise eps: the continuous part of the infinite mask state (method.md §2)."""

from __future__ import annotations

import jax
from jaxtyping import Array, Float, PRNGKeyArray


def draw_eps(key: PRNGKeyArray, shape: tuple[int, ...]) -> Float[Array, '*shape']:
  """Fresh eps ~ Uniform[-1, 1)^D at every position, e.g. shape (B, L, D)."""
  return jax.random.uniform(key, shape, minval=-1.0, maxval=1.0)
