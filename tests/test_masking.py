"""The forward masking kernel q(z_t | x) (`masking.py`) against its exact rates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imdm_jax import masking, schedule


@pytest.mark.parametrize('t', [0.05, 0.3, 0.5, 0.9, 1.0])
def test_masking_rate_matches_one_minus_alpha(t):
  x = jnp.zeros((64, 1024), jnp.int32)
  z = masking.mask_tokens(jax.random.PRNGKey(0), x, jnp.full((64,), t), mask_id=7)
  rate = float((z == 7).mean())
  p = 1 - float(schedule.alpha(jnp.float32(t)))
  sd = np.sqrt(p * (1 - p) / x.size)
  assert abs(rate - p) < 5 * sd + 1e-7, (rate, p)
  assert set(np.unique(z)) <= {0, 7}  # only the mask is ever written


def test_mask_with_prob_masks_each_row_at_its_own_rate():
  """Row b is masked at rate p[b], exactly never at 0 and always at 1; unmasked positions keep
  their tokens."""
  p = jnp.array([0.0, 0.1, 0.5, 0.9, 1.0])
  B, L, mask_id = len(p), 20_000, 9
  x = jax.random.randint(jax.random.PRNGKey(1), (B, L), 0, mask_id)
  z = np.asarray(masking.mask_with_prob(jax.random.PRNGKey(2), x, p, mask_id))
  masked = z == mask_id
  assert not masked[0].any() and masked[-1].all()
  for b in range(1, B - 1):
    q = float(p[b])
    assert abs(masked[b].mean() - q) < 5 * np.sqrt(q * (1 - q) / L), (b, masked[b].mean())
  np.testing.assert_array_equal(z[~masked], np.asarray(x)[~masked])
  # neighbouring positions are masked independently
  m = masked[2].astype(np.float64)
  assert abs(np.corrcoef(m[:-1], m[1:])[0, 1]) < 5 / np.sqrt(L)


def test_mask_tokens_is_mask_with_prob_at_the_schedule_probability():
  x = jax.random.randint(jax.random.PRNGKey(3), (4, 64), 0, 30)
  t = jnp.array([0.1, 0.4, 0.8, 1.0])
  for alpha_min in (1e-3, 0.2):
    np.testing.assert_array_equal(
        masking.mask_tokens(jax.random.PRNGKey(4), x, t, 31, alpha_min),
        masking.mask_with_prob(jax.random.PRNGKey(4), x, schedule.mask_prob(t, alpha_min), 31))
