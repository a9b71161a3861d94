"""The log-linear schedule (`schedule.py`): alpha and its derivatives, the NELBO weight, the reveal
probability of a reverse step, and the training times."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imdm_jax import schedule

EPS = 1e-3
ALPHA_MINS = [1e-3, 1e-2, 0.1, 0.5]


def test_alpha_endpoints_and_weight():
  t = jnp.array([0.0, 0.25, 1.0])
  np.testing.assert_allclose(schedule.alpha(t), [1.0, 1 - 0.999 * 0.25, EPS], atol=2e-8)
  # the NELBO weight -alpha'/(1-alpha) is exactly 1/t for the log-linear schedule
  t = jnp.array([0.1, 0.5, 0.9])
  np.testing.assert_allclose(-schedule.dalpha(t) / (1 - schedule.alpha(t)), 1 / t, rtol=1e-5)
  np.testing.assert_allclose(schedule.sigma(t), -np.log(schedule.alpha(t)), rtol=1e-6)


@pytest.mark.parametrize('alpha_min', ALPHA_MINS)
def test_mask_prob_is_one_minus_alpha(alpha_min):
  t = jnp.array([0.0, 1e-3, 0.3, 0.7, 1.0])
  p = schedule.mask_prob(t, alpha_min)
  np.testing.assert_allclose(p, 1 - schedule.alpha(t, alpha_min), rtol=1e-6, atol=1e-7)
  assert float(p[0]) == 0.0  # nothing is masked at t = 0 ...
  np.testing.assert_allclose(float(p[-1]), 1 - alpha_min, rtol=1e-6)  # ... all but alpha_min at 1


@pytest.mark.parametrize('alpha_min', ALPHA_MINS)
def test_nelbo_weighted_is_the_weight_from_dalpha_and_alpha(alpha_min):
  """`nelbo_weighted(nll, t)` = `-alpha'(t)/(1 - alpha(t)) * nll` for every alpha floor (it
  cancels); the reference in float64, where `1 - alpha(t)` loses nothing at small t."""
  t = jnp.array([1e-3, 0.01, 0.25, 0.5, 0.999], jnp.float32)
  nll = jax.random.exponential(jax.random.PRNGKey(0), (5, 7)) * 3
  got = np.asarray(schedule.nelbo_weighted(nll, t))
  with jax.enable_x64(True):
    t64, nll64 = jnp.asarray(np.asarray(t), jnp.float64), jnp.asarray(np.asarray(nll), jnp.float64)
    weight = -schedule.dalpha(t64, alpha_min) / (1.0 - schedule.alpha(t64, alpha_min))
    expected = np.asarray(weight[:, None] * nll64)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize('alpha_min', ALPHA_MINS)
def test_reveal_prob_is_the_alpha_ratio_and_one_past_time_zero(alpha_min):
  """`reveal_prob(start, length)` = `(alpha(start - length) - alpha(start)) / (1 - alpha(start))`
  whenever the step ends at or after time 0 (float64 reference: the float32 difference of two
  close alphas would lose ~1e-4), and 1 once it reaches past it."""
  start = jnp.array([1.0, 1.0, 0.5, 0.5, 0.3, 0.02, 1e-3, 0.75], jnp.float32)
  length = jnp.array([1e-3, 0.5, 0.1, 0.5, 0.299, 0.01, 1e-5, 0.0], jnp.float32)
  got = np.asarray(schedule.reveal_prob(start, length))
  with jax.enable_x64(True):
    s64, l64 = (jnp.asarray(np.asarray(a), jnp.float64) for a in (start, length))
    alpha = lambda u: schedule.alpha(u, alpha_min)
    expected = np.asarray((alpha(s64 - l64) - alpha(s64)) / (1.0 - alpha(s64)))
  assert (np.asarray(start - length) >= 0).all()
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=0)
  assert got[-1] == 0.0  # a step of length 0 reveals nothing
  past = schedule.reveal_prob(jnp.array([0.1, 0.1, 0.4, 1e-5]), jnp.array([0.1, 0.5, 2.0, 1.0]))
  np.testing.assert_array_equal(past, 1.0)


def test_antithetic_times_cover_unit_interval():
  n = 512
  t = np.asarray(schedule.sample_t(jax.random.PRNGKey(3), n))
  assert t.min() >= EPS and t.max() < 1.0
  u = (t - EPS) / (1 - EPS)
  counts = np.bincount(np.floor(u * n + 1e-6).astype(int).clip(0, n - 1), minlength=n)
  assert (counts == 1).all()  # exactly one time in each 1/n stratum
  # the offset is random: two keys give different grids
  assert not np.allclose(t, schedule.sample_t(jax.random.PRNGKey(4), n))
