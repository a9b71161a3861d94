"""IMDM mask noise (`noise.py`): eps statistics, finite mask states, seeded eps and resets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imdm_jax import noise
from imdm_jax.config import Config

from helpers import MICRO, as_imdm


@pytest.mark.parametrize('noise_type,scale,mean,var', [('uniform', 1.0, 0.0, 1 / 3),
                                                       ('uniform', 0.5, 0.0, 1 / 12),
                                                       ('normal', 1.0, 0.0, 1.0),
                                                       ('learnable', 1.0, 0.0, 1.0)])
def test_eps_statistics(noise_type, scale, mean, var):
  cfg = as_imdm(Config(model=MICRO), noise_dim=16, noise_type=noise_type, noise_scale=scale)
  eps = np.asarray(noise.draw_eps(jax.random.PRNGKey(0), (64, 128), cfg))
  assert eps.shape == (64, 128, 16)
  n = eps.size
  assert abs(eps.mean() - mean) < 5 * np.sqrt(var / n)
  assert abs(eps.var() - var) < 0.01 * var + 5 * np.sqrt(2 * var ** 2 / n)
  if noise_type == 'uniform':
    assert eps.min() >= -scale and eps.max() < scale
  # positions and dimensions are independent: no correlation between neighbours
  assert abs(np.corrcoef(eps[:, :-1, 0].ravel(), eps[:, 1:, 0].ravel())[0, 1]) < 0.02


def test_finite_states_are_uniform():
  cfg = as_imdm(Config(model=MICRO), noise_dim=0, num_mask_states=5)
  states = np.asarray(noise.draw_eps(jax.random.PRNGKey(0), (200, 100), cfg))
  assert states.dtype.kind == 'i' and states.min() == 0 and states.max() == 4
  counts = np.bincount(states.ravel(), minlength=5)
  expected = states.size / 5
  assert (np.abs(counts - expected) < 5 * np.sqrt(expected)).all()


def test_seeded_eps_is_a_function_of_the_seed_alone():
  cfg = as_imdm(Config(model=MICRO))
  a = noise.seeded_eps(jnp.array([3, 7, 11]), 10, cfg)
  b = noise.seeded_eps(jnp.array([11, 3]), 10, cfg)  # other batch, other places
  np.testing.assert_array_equal(a[0], b[1])
  np.testing.assert_array_equal(a[2], b[0])
  np.testing.assert_array_equal(a, noise.seeded_eps(jnp.array([3, 7, 11]), 10, cfg))
  assert not np.allclose(a[0], a[1])


def test_resample_redraws_only_reset_positions():
  cfg = as_imdm(Config(model=MICRO))
  eps = noise.draw_eps(jax.random.PRNGKey(0), (2, 6), cfg)
  reset = jnp.array([[True, False, False, True, False, False]] * 2)
  new = noise.resample(jax.random.PRNGKey(1), eps, reset, cfg)
  np.testing.assert_array_equal(new[~reset], eps[~reset])
  assert not np.any(np.isclose(new[reset], eps[reset]))


def test_finite_states_are_seeded_and_resampled_like_vectors():
  """The finite-mask ablation's eps is `[B, L]` integer states: the same seeding and resetting."""
  cfg = as_imdm(Config(model=MICRO), noise_dim=0, num_mask_states=7)
  a = noise.seeded_eps(jnp.array([3, 7]), 50, cfg)
  assert a.shape == (2, 50) and a.dtype == jnp.int32
  np.testing.assert_array_equal(a[1], noise.seeded_eps(jnp.array([7]), 50, cfg)[0])
  reset = jnp.zeros((2, 50), bool).at[:, ::2].set(True)
  new = noise.resample(jax.random.PRNGKey(1), a, reset, cfg)
  np.testing.assert_array_equal(new[~reset], a[~reset])
  assert (new[reset] != a[reset]).any() and new.min() >= 0 and new.max() < 7


def test_is_imdm():
  plain = Config(model=MICRO)
  assert not noise.is_imdm(plain)
  assert noise.is_imdm(as_imdm(plain, noise_dim=4))
  assert noise.is_imdm(as_imdm(plain, noise_dim=0, num_mask_states=1))  # K = 1: MDLM's law
