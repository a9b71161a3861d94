"""Schedule, forward masking kernel, SUBS and the NELBO against exact values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imdm_jax import loss, masking, schedule

EPS = 1e-3


def test_alpha_endpoints_and_weight():
  t = jnp.array([0.0, 0.25, 1.0])
  np.testing.assert_allclose(schedule.alpha(t), [1.0, 1 - 0.999 * 0.25, EPS], atol=2e-8)
  # the NELBO weight -alpha'/(1-alpha) is exactly 1/t for the log-linear schedule
  t = jnp.array([0.1, 0.5, 0.9])
  np.testing.assert_allclose(-schedule.dalpha(t) / (1 - schedule.alpha(t)), 1 / t, rtol=1e-5)
  np.testing.assert_allclose(schedule.sigma(t), -np.log(schedule.alpha(t)), rtol=1e-6)


@pytest.mark.parametrize('t', [0.05, 0.3, 0.5, 0.9, 1.0])
def test_masking_rate_matches_one_minus_alpha(t):
  x = jnp.zeros((64, 1024), jnp.int32)
  z = masking.mask_tokens(jax.random.PRNGKey(0), x, jnp.full((64,), t), mask_id=7)
  rate = float((z == 7).mean())
  p = 1 - float(schedule.alpha(jnp.float32(t)))
  sd = np.sqrt(p * (1 - p) / x.size)
  assert abs(rate - p) < 5 * sd + 1e-7, (rate, p)
  assert set(np.unique(z)) <= {0, 7}  # only the mask is ever written


def test_antithetic_times_cover_unit_interval():
  n = 512
  t = np.asarray(schedule.sample_t(jax.random.PRNGKey(3), n))
  assert t.min() >= EPS and t.max() < 1.0
  u = (t - EPS) / (1 - EPS)
  counts = np.bincount(np.floor(u * n + 1e-6).astype(int).clip(0, n - 1), minlength=n)
  assert (counts == 1).all()  # exactly one time in each 1/n stratum
  # the offset is random: two keys give different grids
  assert not np.allclose(t, schedule.sample_t(jax.random.PRNGKey(4), n))


def test_subs_never_predicts_mask_and_carries_over():
  V, mask_id = 6, 5
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, 4, V)) * 3
  z = jnp.array([[5, 1, 5, 3], [0, 5, 5, 5]])
  lp = np.asarray(loss.subs_log_probs(logits, z, mask_id))
  probs = np.exp(lp)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
  assert (probs[..., mask_id] == 0).all()
  for b, l in zip(*np.nonzero(np.asarray(z) != mask_id)):
    expected = np.full(V, loss.NEG_INF)
    expected[z[b, l]] = 0.0
    np.testing.assert_array_equal(lp[b, l], expected)  # exact one-hot rows


def test_nelbo_hand_computation():
  # V=4 with mask id 3; one sequence of 3 tokens, position 1 masked, position 2 is padding.
  logits = jnp.array([[[0.0, 1.0, 2.0, 5.0], [1.0, 0.0, -1.0, 9.0], [0.3, 0.2, 0.1, 0.0]]])
  x = jnp.array([[2, 0, 1]])
  z = jnp.array([[2, 3, 3]])
  t = jnp.array([0.4])
  valid = jnp.array([[1, 1, 0]])
  total, count = loss.nelbo(logits, x, z, t, valid, mask_id=3)
  # position 1: softmax over the data tokens {0, 1, 2} with logits (1, 0, -1), target 0
  log_p = 1.0 - np.log(np.exp(1.0) + np.exp(0.0) + np.exp(-1.0))
  np.testing.assert_allclose(float(total), -log_p / 0.4, rtol=1e-6)
  assert float(count) == 2.0  # the unmasked valid token counts, the padding does not


def test_loss_zero_unmasked_positive_masked():
  V, mask_id = 10, 9
  key = jax.random.PRNGKey(1)
  x = jax.random.randint(key, (4, 16), 0, V - 1)
  t = jnp.full((4,), 0.5)
  z = masking.mask_tokens(jax.random.PRNGKey(2), x, t, mask_id)
  per_tok = np.asarray(loss.nelbo_per_token(
      loss.subs_log_probs(jax.random.normal(key, (4, 16, V)), z, mask_id), x, t))
  masked = np.asarray(z == mask_id)
  assert masked.any() and (~masked).any()
  assert (per_tok[~masked] == 0).all()
  assert np.isfinite(per_tok).all() and (per_tok[masked] > 0).all()


def test_nelbo_equals_subs_route():
  V, mask_id = 12, 4  # a mask id inside the vocabulary, as with BERT's [MASK] = 103
  key = jax.random.PRNGKey(7)
  x = jax.random.randint(key, (3, 20), 0, V)
  x = jnp.where(x == mask_id, 0, x)
  t = jnp.array([0.2, 0.6, 0.95])
  z = masking.mask_tokens(jax.random.PRNGKey(8), x, t, mask_id)
  logits = jax.random.normal(key, (3, 20, V)) * 4
  valid = (jax.random.uniform(jax.random.PRNGKey(9), (3, 20)) < 0.8).astype(jnp.int32)
  total, count = loss.nelbo(logits, x, z, t, valid, mask_id)
  ref = loss.nelbo_per_token(loss.subs_log_probs(logits, z, mask_id), x, t)
  np.testing.assert_allclose(total, float((ref * valid).sum()), rtol=1e-6)
  assert float(count) == float(valid.sum())
