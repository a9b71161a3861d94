"""The synthetic experiment (method.md §5): its exact ceiling, metrics, presets and one quick run."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imdm_jax import sampler
from imdm_jax.config import Config, ModelConfig
from imdm_jax.errors import UserError

from experiments.synthetic import arms, settings, task

V_S, L = 4, 5
MASK = V_S
CFG = Config(model=ModelConfig(vocab_size=V_S + 1))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def perfect_mdm(params, z, eps, t):
  """The exact x_theta of the repeated-token data: uniform until something is revealed, then the
  revealed token everywhere."""
  del params, eps, t
  revealed = z != MASK
  any_revealed = revealed.any(-1, keepdims=True)  # [B, 1]
  token = jnp.max(jnp.where(revealed, z, -1), axis=-1, keepdims=True)  # [B, 1]
  onehot = jax.nn.one_hot(jnp.broadcast_to(token, z.shape), V_S)  # [B, L, V_s]
  x_theta = jnp.where(any_revealed[..., None], onehot, 1.0 / V_S)
  logits = jnp.log(jnp.maximum(x_theta, 1e-30))
  return jnp.concatenate([logits, jnp.zeros_like(logits[..., :1])], -1)


@pytest.mark.parametrize('steps', [1, 2, 3, 8])
def test_ceiling_is_what_the_sampler_does_with_a_perfect_denoiser(steps):
  n = 20_000
  z = jnp.full((n, L), MASK, jnp.int32)
  scfg = sampler.SamplerConfig(steps=steps)
  with jax.enable_x64(True):
    x, _ = jax.jit(lambda key: sampler.sample(perfect_mdm, None, key, z, None, mask_id=MASK,
                                              cfg=CFG, scfg=scfg))(jax.random.PRNGKey(steps))
  got = task.score(np.asarray(x), V_S)['constant']
  exact = task.mdm_ceiling(steps, V_S, L)
  se = np.sqrt(exact * (1 - exact) / n)
  assert abs(got - exact) < 4 * se, (got, exact)
  if steps == 1:
    assert exact == pytest.approx(V_S ** -(L - 1))  # one step: L independent uniform draws


def test_score_of_perfect_and_independent_samples():
  rng = np.random.default_rng(0)
  perfect = task.score(task.sequences(rng, 8192, V_S, L), V_S)
  assert perfect['constant'] == 1.0 and perfect['distinct'] == V_S
  assert perfect['pairwise_mi'] == pytest.approx(np.log(V_S), abs=0.01)
  assert perfect['distinct_vs_uniform'] == pytest.approx(1.0)
  independent = task.score(rng.integers(0, V_S, (8192, L)), V_S)
  assert independent['constant'] == pytest.approx(V_S ** -(L - 1), abs=0.01)
  assert independent['pairwise_mi'] < 0.01
  collapsed = np.zeros((100, L), np.int64)
  assert task.score(collapsed, V_S)['distinct_vs_uniform'] == pytest.approx(1 / V_S, rel=0.01)
  masks_left = np.full((10, L), MASK)
  assert task.score(masks_left, V_S)['constant'] == 0.0  # an all-mask row is not a sequence


def test_oracle_partition_is_balanced_and_refuses_what_it_cannot_do():
  """Every value of V_s = 64 gets 1/64 of uniform eps (the bits are fair, independent coins), the
  map is the same in numpy and jax, and it depends on eps only through the position-means."""
  # odd multiples of 1/128, symmetric about 0: an odd number (L) of them never sums to 0 and sums
  # exactly in float32, so numpy, jax and any order of positions give the same signs
  assert L % 2
  eps = ((2 * np.random.default_rng(0).integers(-64, 64, (128_000, L, 8)) + 1) / 128).astype(
      np.float32)
  c = task.oracle_partition(eps, 64)
  counts = np.bincount(c, minlength=64)
  assert c.min() >= 0 and c.max() < 64
  chi2 = ((counts - len(c) / 64) ** 2 / (len(c) / 64)).sum()
  assert chi2 < 120, chi2  # 63 degrees of freedom: P(chi2 > 120) < 1e-4
  np.testing.assert_array_equal(np.asarray(task.oracle_partition(jnp.asarray(eps), 64)), c)
  np.testing.assert_array_equal(task.oracle_partition(eps[:, ::-1], 64), c)  # order-free
  flipped = eps.copy()
  flipped[..., 0] *= -1  # bit 0 flips, the others stay
  np.testing.assert_array_equal(task.oracle_partition(flipped, 64), c ^ 1)
  for vocab, dim in ((1000, 16), (64, 5), (1, 8)):
    with pytest.raises(ValueError, match='power of 2'):
      task.oracle_bits(vocab, dim)


def test_coupling_targets_copy_what_is_revealed_and_map_eps_otherwise():
  rng = np.random.default_rng(0)
  x = task.sequences(rng, 512, V_S, L)
  z = np.where(rng.random((512, L)) < 0.9, V_S, x)  # 0.9 ** L of the rows fully masked
  eps = rng.uniform(-1, 1, (512, L, 8)).astype(np.float32)
  c = task.oracle_partition(jnp.asarray(eps), V_S)
  x_hat = np.asarray(task.coupling_targets(jnp.asarray(x), jnp.asarray(z), c, V_S))
  full = (z == V_S).all(1)
  assert 0.1 < full.mean() < 0.9  # both kinds of row are there
  np.testing.assert_array_equal(x_hat[~full], x[~full])
  np.testing.assert_array_equal(x_hat[full], np.repeat(task.oracle_partition(eps[full], V_S)[:, None],
                                                      L, 1))


def test_balancing_offsets_make_every_value_equally_likely():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(4096, 3, V_S)) + np.arange(V_S) * 2.0  # strongly prefers the last
  b = arms.balancing_offsets(scores, iterations=200)
  probs = np.exp(scores - b)
  marginal = (probs / probs.sum(-1, keepdims=True)).mean((0, 1))
  np.testing.assert_allclose(marginal, 1 / V_S, atol=1e-3)
  before = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
  assert before.mean((0, 1))[-1] > 0.5  # it had something to correct


def test_one_step_diagnosis_of_known_denoisers():
  rng = np.random.default_rng(0)
  c = rng.integers(0, V_S, 64)
  sure = np.log(np.maximum(jax.nn.one_hot(np.repeat(c[:, None], L, 1), V_S), 1e-30))
  assert task.one_step_diagnosis(sure) == pytest.approx(
      {'expected_constant': 1.0, 'greedy_constant': 1.0, 'greedy_distinct': len(np.unique(c)),
       'top_prob': 1.0})
  # independent uniform positions: the exact ceiling of one step
  uniform = task.one_step_diagnosis(np.full((64, L, V_S), -np.log(V_S)))
  assert uniform['expected_constant'] == pytest.approx(task.mdm_ceiling(1, V_S, L))
  assert uniform['top_prob'] == pytest.approx(1 / V_S)
  # an eps-blind denoiser's argmax is one sequence for every draw: constant, and collapsed
  assert uniform['greedy_constant'] == 1.0 and uniform['greedy_distinct'] == 1
  # agreeing but unsure: p = 0.7 on the same value everywhere, the rest spread evenly
  p = np.full((64, L, V_S), 0.3 / (V_S - 1))
  p[np.arange(64), :, c] = 0.7
  unsure = task.one_step_diagnosis(np.log(p))
  assert unsure['greedy_constant'] == 1.0 and unsure['top_prob'] == pytest.approx(0.7)
  assert unsure['expected_constant'] == pytest.approx(0.7 ** L + (V_S - 1) * (0.1 ** L))


def test_expected_distinct_matches_simulation():
  rng = np.random.default_rng(1)
  sims = [len(np.unique(rng.integers(0, 64, 50))) for _ in range(4000)]
  assert np.mean(sims) == pytest.approx(task.expected_distinct(50, 64), abs=0.1)


def test_settings_overrides_and_refusals():
  s = settings.resolve('quick',
                       ['vocab=1000', 'eval_steps=1,2', 'lr=0.01', 'redi_ignore_seed=true'])
  assert (s.vocab, s.eval_steps, s.lr, s.redi_ignore_seed) == (1000, (1, 2), 0.01, True)
  assert settings.resolve('paper', []).noise_dim == 128
  for bad in (['nope=1'], ['vocab'], ['vocab=x'], ['vocab=1'], ['redi_ignore_seed=maybe']):
    with pytest.raises(UserError):
      settings.resolve('quick', bad)
  with pytest.raises(UserError, match='preset'):
    settings.resolve('huge', [])


def test_longer_presets_keep_the_default_round_length():
  """`full` and `target` buy updates, not longer ReDi rounds: each round is as long as the
  default's, so the arms differ from the default only in how many rounds and updates they get."""
  default = settings.resolve('default', []).redi_round_steps
  for name in ('full', 'target'):
    assert settings.resolve(name, []).redi_round_steps == pytest.approx(default, rel=0.1), name


@pytest.mark.parametrize('args', [['--set', 'vocab=x'], ['--only', 'mdm/nelbo,imdm/magic']])
def test_bad_setting_exits_with_status_2(tmp_path, args):
  proc = subprocess.run([sys.executable, '-m', 'experiments.synthetic', *args, '--out',
                         str(tmp_path)], cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 2 and proc.stderr.count('\n') == 1, proc.stderr
  assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_quick_experiment_end_to_end(tmp_path):
  """`--preset quick` writes its outputs; MDM arms sit on the exact ceiling."""
  env = dict(os.environ, XLA_FLAGS='')
  subprocess.run([sys.executable, '-m', 'experiments.synthetic', '--preset', 'quick', '--out',
                  str(tmp_path)], cwd=REPO, env=env, check=True)
  for name in ('results.json', 'results.md', 'results.png'):
    assert os.path.getsize(tmp_path / name) > 0
  results = json.loads((tmp_path / 'results.json').read_text())
  n = results['setting']['eval_samples']
  for arm in ('mdm/base', 'mdm/nelbo', 'mdm/sdtt', 'mdm/redi', 'mdm/sdtt+redi'):
    for steps, ceiling in results['ceiling'].items():
      got = results['arms'][arm][steps]['constant']
      # no MDM beats the ceiling (up to sampling error); the trained ones also reach it at 64 steps
      assert got < ceiling + 4 * np.sqrt(ceiling * (1 - ceiling) / n) + 2 / n, (arm, steps)
  assert results['arms']['mdm/base']['64']['constant'] > results['ceiling']['64'] - 0.05
  assert {'imdm/redi', 'imdm/redi-balanced', 'imdm/consensus', 'imdm/oracle'} <= set(results['arms'])
  assert 'exact MDM ceiling' in (tmp_path / 'results.md').read_text()


def test_render_from_results_json(tmp_path):
  """The table's columns follow the step counts numerically, whatever order JSON keeps."""
  rng = np.random.default_rng(0)
  steps = (1, 2, 8, 64)
  scores = {str(k): task.score(rng.integers(0, V_S, (256, L)), V_S) for k in steps}
  results = {'command': 'python -m experiments.synthetic', 'total_seconds': 1,
             'setting': {'vocab': V_S, 'length': L, 'eval_samples': 256, 'balanced_temperature': 0},
             'ceiling': {str(k): task.mdm_ceiling(k, V_S, L) for k in steps},
             'arms': {'mdm/redi': scores}, 'rounds': {'mdm/redi': {'1': scores, '2': scores}},
             'one_step': {'mdm/redi': {'expected_constant': 0.0123, 'greedy_constant': 0.5,
                                       'top_prob': 0.25}}}
  (tmp_path / 'results.json').write_text(json.dumps(results, sort_keys=True))
  proc = subprocess.run([sys.executable, '-m', 'experiments.synthetic', '--render', '--out',
                         str(tmp_path)], cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  table = (tmp_path / 'results.md').read_text()
  assert '| 1 step | 2 steps | 8 steps | 64 steps |' in table
  assert 'mdm/redi after round 1' in table and 'mdm/redi after round 2' in table
  assert '| mdm/redi | ' in table and '| 0.012 | 0.500 | 0.250 |' in table
  assert (tmp_path / 'results.png').stat().st_size > 0
