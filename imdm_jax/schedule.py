"""The log-linear masking schedule: the one source of alpha (docs/method.md §1).

`alpha(t)` is the probability that a token is still clean at time t:
`alpha(t) = 1 - (1 - alpha_min) t`, so `alpha(0) = 1` and `alpha(1) = alpha_min` (the alpha floor,
`diffusion.alpha_min`, 1e-3). Everything else the method needs from the schedule is derived here:
the masking probability, the NELBO weight, the reveal probability of a reverse step, the time
input of time-conditioned networks, and the training times.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray


def alpha(t: Float[Array, '*s'], alpha_min: float = 1e-3) -> Float[Array, '*s']:
  return 1.0 - (1.0 - alpha_min) * t


def dalpha(t: Float[Array, '*s'], alpha_min: float = 1e-3) -> Float[Array, '*s']:
  """d alpha / dt, constant for the log-linear schedule."""
  return jnp.full_like(t, -(1.0 - alpha_min))


def mask_prob(t: Float[Array, '*s'], alpha_min: float = 1e-3) -> Float[Array, '*s']:
  """`1 - alpha(t)`: the probability that the forward process has masked a token by time t."""
  return 1.0 - alpha(t, alpha_min)


def nelbo_weighted(nll: Float[Array, 'B L'], t: Float[Array, 'B']) -> Float[Array, 'B L']:
  """`w(t) * nll` with the NELBO weight `w(t) = -alpha'(t) / (1 - alpha(t))` of a masked token's
  `-log x_theta[x]`. For this schedule `-alpha' = 1 - alpha_min` and `1 - alpha = (1 - alpha_min) t`,
  so `w(t) = 1/t` exactly (alpha_min cancels); applied as a division, one rounding instead of the
  two of a product with `1/t`. (`tests/test_schedule.py` checks it against dalpha and alpha.)"""
  return nll / t[:, None]


def reveal_prob(start: Float[Array, '*s'], length: Float[Array, '*s']) -> Float[Array, '*s']:
  """The probability that a reverse step from time `start` to `start - length` reveals a masked
  token: `(alpha_s - alpha_t) / (1 - alpha_t)`, exactly `length / start` for this schedule, and 1
  once the step reaches time 0 (a step between alphas 0 and r has this same law). Taken from the
  length rather than a difference of float32 alphas, which would lose ~1e-4 of it."""
  return length / jnp.maximum(start, length)


def sigma(t: Float[Array, '*s'], alpha_min: float = 1e-3) -> Float[Array, '*s']:
  """Total noise `-log alpha(t)`: the time input of time-conditioned checkpoints."""
  return -jnp.log1p(-(1.0 - alpha_min) * t)


def sample_t(key: PRNGKeyArray, n: int, alpha_min: float = 1e-3,
             antithetic: bool = True) -> Float[Array, 'n']:
  """Training times in [alpha_min, 1): with `antithetic`, `u_i = (u0 + i/n) mod 1` for one u0.

  The n times are evenly spread over the unit interval, which lowers the variance of the batch
  NELBO estimate; `n` is the *global* batch so the spread holds across all devices.
  """
  if antithetic:
    u = (jax.random.uniform(key, ()) + jnp.arange(n) / n) % 1.0
  else:
    u = jax.random.uniform(key, (n,))
  return (1.0 - alpha_min) * u + alpha_min
