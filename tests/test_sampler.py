"""Samplers against exactly known distributions (an oracle denoiser of a small joint)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imdm_jax import reveal_groups, sampler, sampling, sharding, train_state
from imdm_jax.config import Config, MeshConfig, ModelConfig

from helpers import oracle_denoiser, perturbed

V0, L = 3, 3  # data tokens {0, 1, 2}, mask id 3
MASK = V0
CONFIGS = np.array(list(itertools.product(range(V0), repeat=L)))  # [27, L]
# A strongly correlated joint: mass on near-constant sequences, so the product of its marginals
# is far from it (the factorisation error the paper is about).
_W = np.array([8.0 if len(set(c)) == 1 else (1.0 if len(set(c)) == 2 else 0.2) for c in CONFIGS])
_W[5] = 3.0  # break symmetries
JOINT = _W / _W.sum()

CFG = Config(model=ModelConfig(vocab_size=V0 + 1, noise_dim=4))  # eps is used only when given


oracle = oracle_denoiser(CONFIGS, JOINT, MASK)  # the exact x_theta under JOINT


def _empirical(samples):
  idx = (samples * np.array([V0 ** (L - 1 - i) for i in range(L)])).sum(-1)
  return np.bincount(idx, minlength=len(CONFIGS)) / len(samples)


def _tv(p, q):
  return 0.5 * np.abs(p - q).sum()


def _tv_bound(n):
  """~4x the expected TV of an n-sample empirical distribution over 27 cells."""
  return 4 * 0.5 * np.sqrt(2 / (np.pi * n)) * np.sqrt(JOINT).sum()


def _product_of_marginals():
  marg = [np.array([JOINT[CONFIGS[:, l] == v].sum() for v in range(V0)]) for l in range(L)]
  return np.array([np.prod([marg[l][c[l]] for l in range(L)]) for c in CONFIGS])


def _run(steps, n=20_000, imdm=False, seed=0, sample=sampler.sample, z=None, t0=None, **kw):
  scfg = sampler.SamplerConfig(steps=steps, **kw)
  z = jnp.full((n, L), MASK, jnp.int32) if z is None else z
  eps = jnp.zeros((n, L, 4)) if imdm else None
  with jax.enable_x64(scfg.float64):
    run = jax.jit(lambda key, z, eps: sample(oracle, None, key, z, eps, mask_id=MASK, cfg=CFG, scfg=scfg,
                                             t0=t0))
    x, stats = run(jax.random.PRNGKey(seed), z, eps)
  return np.asarray(x), jax.device_get(stats)


@pytest.mark.parametrize('imdm', [False, True])
def test_many_steps_reproduce_the_joint(imdm):
  x, stats = _run(1000, imdm=imdm)
  assert (x < V0).all()
  assert _tv(_empirical(x), JOINT) < _tv_bound(len(x))
  # the product of marginals is far away: the test can tell the two apart
  assert _tv(_product_of_marginals(), JOINT) > 5 * _tv_bound(len(x))
  if imdm:
    assert stats['resets'] > 0
  else:  # cached: for one sequence only the first step and those after a reveal call the network
    assert _run(1000, n=1)[1]['nfe'] <= L + 1


@pytest.mark.parametrize('imdm', [False, True])
def test_one_step_gives_the_product_of_marginals(imdm):
  x, _ = _run(1, imdm=imdm)
  assert _tv(_empirical(x), _product_of_marginals()) < _tv_bound(len(x))


def _exact_few_steps(steps, start, given=None, temperature=1.0, greedy=False):
  """The exact law of a `steps`-step run from `start` under `oracle`, over the 27 sequences: a
  sum over every way to assign the masked positions to the steps that reveal them."""
  t = start * np.linspace(1, 1e-5, steps + 1)
  alpha = 1 - (1 - 1e-3) * t
  alpha[-1] = 1.0  # the last step reveals everything
  p_step = np.diff(alpha) / (1 - alpha[0])  # P(revealed at step k)
  masked = [l for l in range(L) if given is None or l not in given]
  fixed = {} if given is None else dict(given)

  def conditional(l, known):  # x_theta of position l given the known tokens
    ok = np.all([CONFIGS[:, j] == v for j, v in known.items()], axis=0) if known else True
    w = JOINT * ok
    return np.array([w[CONFIGS[:, l] == v].sum() for v in range(V0)]) / w.sum()

  law = np.zeros(len(CONFIGS))
  for assignment in itertools.product(range(steps), repeat=len(masked)):
    p_assign = np.prod([p_step[k] for k in assignment])
    for i, x in enumerate(CONFIGS):
      if any(x[l] != v for l, v in fixed.items()):
        continue
      p, known = p_assign, dict(fixed)
      for k in sorted(set(assignment)):
        group = [l for l, a in zip(masked, assignment) if a == k]
        for l in group:
          q = conditional(l, known) ** (1 / temperature)
          q = np.eye(V0)[q.argmax()] if greedy and k == steps - 1 else q / q.sum()
          p *= q[x[l]]
        known.update({l: x[l] for l in group})
      law[i] += p
  return law


@pytest.mark.parametrize('steps,start,kw', [
    (2, 1.0, {}),
    (4, 0.5, {'imdm': True, 'fix_eps': True}),  # a later start, a given token, eps held
    (3, 1.0, {'temperature': 0.5, 'final': 'greedy'}),
])
def test_reveal_groups_sample_as_the_step_sampler(steps, start, kw):
  n = 20_000
  z = jnp.full((n, L), MASK, jnp.int32)
  if start < 1:
    z = z.at[:, 0].set(1)
  t0 = jnp.full((n,), start)
  exact = _exact_few_steps(steps, start, {0: 1} if start < 1 else None,
                           kw.get('temperature', 1.0), kw.get('final') == 'greedy')
  ref, _ = _run(steps, n, z=z, t0=t0, **kw)
  x, stats = _run(steps, n, z=z, t0=t0, seed=1, sample=reveal_groups.sample, **kw)
  assert _tv(_empirical(ref), exact) < _tv_bound(n)  # the step sampler: checks the reference
  assert _tv(_empirical(x), exact) < _tv_bound(n)
  assert stats['nfe'] <= L and stats['resets'] == 0
  masks = stats['masks_per_step']
  assert (np.diff(masks, axis=1) <= 0).all() and (masks[:, -1] == 0).all()
  assert (masks[:, 0] <= (z == MASK).sum(1)).all()
  if steps == 2:  # which positions are revealed together matters: 2 steps are not the joint
    assert _tv(exact, JOINT) > 3 * _tv_bound(n)
  assert reveal_groups.exact_for(CFG, sampler.SamplerConfig(fix_eps=True), imdm=True)
  assert not reveal_groups.exact_for(CFG, sampler.SamplerConfig(), imdm=True)  # resets


def test_imdm_posterior_rows_and_probabilities():
  x_theta = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7)), -1)
  x_theta = x_theta.at[..., 6].set(0.0)
  x_theta = x_theta / x_theta.sum(-1, keepdims=True)
  a_t, a_s = 0.3, 0.7
  probs = np.asarray(sampler.transition_probs(x_theta, a_t, a_s, 6, with_reset=True))
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(probs[..., :6], (a_s - a_t) / (1 - a_t) * x_theta[..., :6], rtol=1e-6)
  np.testing.assert_allclose(probs[..., 6], a_t * (1 - a_s) / (a_s * (1 - a_t)), rtol=1e-6)
  np.testing.assert_allclose(probs[..., 7], (1 - a_t / a_s) * (1 - a_s) / (1 - a_t), rtol=1e-6)
  mdlm = np.asarray(sampler.transition_probs(x_theta, a_t, a_s, 6, with_reset=False))
  np.testing.assert_allclose(mdlm[..., 6], probs[..., 6] + probs[..., 7], rtol=1e-6)


def test_reset_frequency_matches_the_posterior():
  steps, n = 4, 20_000
  _, stats = _run(steps, n=n, imdm=True, seed=3)
  t = np.asarray(sampler.time_grid(steps), np.float64)
  alpha = lambda u: 1 - (1 - 1e-3) * u
  expected = 0.0
  for k in range(steps - 1):  # the last step reveals everything, no reset
    a_t, a_s = alpha(t[k]), alpha(t[k + 1])
    still_masked = (1 - a_t) / (1 - alpha(t[0]))
    expected += still_masked * (1 - a_t / a_s) * (1 - a_s) / (1 - a_t)
  expected *= n * L
  assert abs(stats['resets'] - expected) < 5 * np.sqrt(expected)
  _, fixed = _run(steps, n=n, imdm=True, seed=3, fix_eps=True)
  assert fixed['resets'] == 0


def _dit(noise_dim=0):
  cfg = Config(model=ModelConfig(vocab_size=17, hidden_size=32, n_blocks=2, n_heads=2,
                                 cond_dim=16, dropout=0.0, noise_dim=noise_dim))
  return cfg, perturbed(train_state.init_params(cfg, jax.random.PRNGKey(0)), 1, 0.5)


@pytest.mark.parametrize('noise_dim', [0, 8])
def test_cached_equals_uncached_and_prefix_is_kept(noise_dim):
  cfg, params = _dit(noise_dim)
  mesh = sharding.make_mesh(MeshConfig())
  graphdef = train_state.model_graphdef(cfg)
  z = jnp.full((8, 12), 16, jnp.int32).at[:, :3].set(jnp.array([4, 5, 6]))  # a clamped prefix
  z = z.at[:, 7].set(9)  # and an infilling constraint
  eps = jax.random.uniform(jax.random.PRNGKey(2), (8, 12, noise_dim)) if noise_dim else None
  out = {}
  for cache in (True, False):
    run = sampling.compile_sampler(cfg, graphdef, mesh,
                                   sampler.SamplerConfig(steps=64, cache=cache), 16)
    out[cache] = jax.device_get(run(params, jax.random.PRNGKey(3), z, eps))
  np.testing.assert_array_equal(out[True][0], out[False][0])
  x, stats = out[True]
  assert stats['nfe'] < 64 and out[False][1]['nfe'] == 64
  assert (x[:, :3] == [4, 5, 6]).all() and (x[:, 7] == 9).all() and (x != 16).all()
  masks = stats['masks_per_step']
  assert (np.diff(masks, axis=1) <= 0).all() and (masks[:, -1] == 0).all()


def test_start_time_and_greedy_final():
  cfg, params = _dit()
  graphdef = train_state.model_graphdef(cfg)
  denoise = sampling.model_denoiser(graphdef, cfg, 16)
  z = jnp.full((4, 12), 16, jnp.int32)
  scfg = sampler.SamplerConfig(steps=1, final='greedy')
  x, _ = sampler.sample(denoise, params, jax.random.PRNGKey(0), z, None, mask_id=16, cfg=cfg,
                        scfg=scfg)
  expected = jnp.argmax(denoise(params, z, None, jnp.ones((4,)))[..., :16], -1)
  np.testing.assert_array_equal(x, expected)
  np.testing.assert_allclose(sampler.time_grid(4), np.linspace(1, 1e-5, 5), rtol=1e-6)


def test_float64_draws_keep_the_tail_float32_truncates_it():
  # one token with nearly all the mass, 5000 tail tokens of 2e-8 each (total 1e-4): below the
  # ~1.2e-7 resolution of float32 exponentials, far above float64's
  p = np.full((5001,), 2e-8)
  p[0] = 1 - p[1:].sum()
  counts = {}
  for dtype, x64 in ((np.float64, True), (np.float32, False)):
    with jax.enable_x64(x64):
      draw = jax.jit(lambda key: sampler.categorical(key, jnp.broadcast_to(
          jnp.asarray(p, dtype), (5_000, 5001))))
      counts[x64] = sum(int((draw(jax.random.PRNGKey(i)) != 0).sum()) for i in range(40))
  expected = 200_000 * 1e-4  # 20
  assert abs(counts[True] - expected) < 5 * np.sqrt(expected)
  assert counts[False] < 4 < counts[True]


def test_nucleus():
  p = jnp.array([0.5, 0.3, 0.15, 0.05])
  np.testing.assert_allclose(sampler.nucleus(p, 0.7), [0.625, 0.375, 0, 0], rtol=1e-6)
  np.testing.assert_allclose(sampler.nucleus(p, 1.0), p, rtol=1e-6)
