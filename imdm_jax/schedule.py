"""The log-linear masking schedule and training-time sampling (method.md §1).

`alpha(t)` is the probability that a token is still clean at time t: `alpha(t) = 1 - (1 - eps) t`,
so `alpha(0) = 1` and `alpha(1) = eps`. With this schedule the NELBO weight `alpha'/(1 - alpha)`
is exactly `-1/t`, which `loss.py` uses directly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray


def alpha(t: Float[Array, '*s'], eps: float = 1e-3) -> Float[Array, '*s']:
  return 1.0 - (1.0 - eps) * t


def dalpha(t: Float[Array, '*s'], eps: float = 1e-3) -> Float[Array, '*s']:
  """d alpha / dt, constant for the log-linear schedule."""
  return jnp.full_like(t, -(1.0 - eps))


def sigma(t: Float[Array, '*s'], eps: float = 1e-3) -> Float[Array, '*s']:
  """Total noise `-log alpha(t)`: the time input of time-conditioned checkpoints."""
  return -jnp.log1p(-(1.0 - eps) * t)


def sample_t(key: PRNGKeyArray, n: int, eps: float = 1e-3,
             antithetic: bool = True) -> Float[Array, 'n']:
  """Training times in [eps, 1): with `antithetic`, `u_i = (u0 + i/n) mod 1` for one u0.

  The n times are evenly spread over the unit interval, which lowers the variance of the batch
  NELBO estimate; `n` is the *global* batch so the spread holds across all devices.
  """
  if antithetic:
    u = (jax.random.uniform(key, ()) + jnp.arange(n) / n) % 1.0
  else:
    u = jax.random.uniform(key, (n,))
  return (1.0 - eps) * u + eps
