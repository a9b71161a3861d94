"""The SUBS parameterisation, the NELBO and the distillation divergences (`loss.py`) against exact
values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imdm_jax import loss, masking, schedule


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


def _fixed(logits):
  """A denoiser that returns `logits` whatever its input."""
  return lambda params, z_t, eps, t: logits


def nelbo_per_token(log_probs, x, t):
  """The NELBO term by its definition on the SUBS rows: `-alpha'/(1 - alpha) * -log x_theta[x]`,
  the reference `loss.nelbo_loss` (which gathers one logit instead) is checked against."""
  log_p = jnp.take_along_axis(log_probs, x[..., None], axis=-1)[..., 0]
  t = t[:, None]
  return -schedule.dalpha(t) / (1.0 - schedule.alpha(t)) * -log_p


def test_nelbo_hand_computation():
  # V=4 with mask id 3; one sequence of 3 tokens, position 1 masked, position 2 is padding.
  logits = jnp.array([[[0.0, 1.0, 2.0, 5.0], [1.0, 0.0, -1.0, 9.0], [0.3, 0.2, 0.1, 0.0]]])
  x = jnp.array([[2, 0, 1]])
  z = jnp.array([[2, 3, 3]])
  t = jnp.array([0.4])
  valid = jnp.array([[1, 1, 0]])
  total, count = loss.nelbo_loss(_fixed(logits), None, x, z, None, t, valid, mask_id=3)
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
  per_tok = np.asarray(nelbo_per_token(
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
  total, count = loss.nelbo_loss(_fixed(logits), None, x, z, None, t, valid, mask_id)
  ref = nelbo_per_token(loss.subs_log_probs(logits, z, mask_id), x, t)
  np.testing.assert_allclose(total, float((ref * valid).sum()), rtol=1e-6)
  assert float(count) == float(valid.sum())


@pytest.mark.parametrize('kind', ['kl-bwd', 'kl-fwd', 'mse', 'tvd'])
def test_divergences_match_direct_formulas(kind):
  rng = np.random.default_rng(0)
  a = rng.normal(size=(2, 3, 6)) * 2
  b = rng.normal(size=(2, 3, 6)) * 2
  a[..., 5] = b[..., 5] = loss.NEG_INF  # a token neither side can produce (the mask)
  log_s = a - np.log(np.exp(a).sum(-1, keepdims=True))
  log_t = b - np.log(np.exp(b).sum(-1, keepdims=True))
  s, t = np.exp(log_s), np.exp(log_t)
  expected = {'kl-bwd': (s * (log_s - log_t)).sum(-1), 'kl-fwd': (t * (log_t - log_s)).sum(-1),
              'mse': ((log_s - log_t)[..., :5] ** 2).sum(-1) / 6,
              'tvd': 0.5 * np.abs(s - t).sum(-1)}[kind]
  got = loss.divergence(jnp.asarray(log_s, jnp.float32), jnp.asarray(log_t, jnp.float32), kind)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss.divergence(jnp.asarray(log_s), jnp.asarray(log_s), kind), 0.0,
                             atol=1e-6)
