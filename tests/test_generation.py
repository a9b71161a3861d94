"""sample.py end to end, the Gen PPL evaluator against a direct computation, and entropy."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imdm_jax import evaluate, sharding, trainer
from imdm_jax.config import MeshConfig
from imdm_jax.data import sources

from helpers import assert_one_line_error, replaced, run_script


def _short(cfg, steps, **model):
  return replaced(cfg, model=model, train=dict(num_steps=steps, ckpt_every=steps,
                                               eval_every=steps, eval_batches=1, log_every=steps))


@pytest.fixture(scope='module')
def runs(tmp_path_factory, data_dir):
  """A micro MDLM and a micro causal LM (the evaluator), trained briefly on the embedded corpus."""
  from imdm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  base = config_lib.resolve('micro')
  base = replaced(base, data=dict(data_dir=data_dir))
  root = tmp_path_factory.mktemp('runs')
  trainer.train(_short(base, 4), str(root / 'mdlm'))
  ar = replaced(_short(base, 400, arch='gpt2', dropout=0.0, hidden_size=64), optim=dict(lr=3e-3))
  trainer.train(ar, str(root / 'ar'))
  return root


def _sample(*args):
  return run_script('sample.py', *args)


def test_sample_cli_writes_samples_and_metrics(runs, tmp_path):
  out = tmp_path / 'out'
  result = _sample('--checkpoint', str(runs / 'mdlm'), '--steps', '2,8', '--num_samples', '4',
                   '--eval', '--evaluator', str(runs / 'ar'), '--out', str(out),
                   '--prefix', 'In the beginning')
  assert result.returncode == 0, result.stderr[-2000:]
  lines = [json.loads(l) for l in open(out / 'samples_steps8.jsonl')]
  assert len(lines) == 4 and lines[0]['steps'] == 8 and lines[0]['seed'] == 0
  assert all(len(l['token_ids']) == 32 for l in lines)
  assert all(l['text'].startswith('In the beginning') for l in lines)  # the clamped prefix
  metrics = json.load(open(out / 'metrics.json'))
  assert [r['steps'] for r in metrics['results']] == [2, 8]
  assert all(r['gen_ppl'] > 1 and r['entropy'] > 0 for r in metrics['results'])
  for r in metrics['results']:  # 95 % bootstrap intervals around each estimate
    assert r['gen_ppl_ci'][0] <= r['gen_ppl'] <= r['gen_ppl_ci'][1]
    assert r['entropy_ci'][0] <= r['entropy'] <= r['entropy_ci'][1]
  table = [line.split('|')[1:-1] for line in open(out / 'metrics.md').read().splitlines()
           if line.startswith('|')]
  assert [int(row[0]) for row in table[2:]] == [2, 8]  # a row per step count, after the header
  assert 1 < metrics['val_nelbo_ppl'] < 2 * 513  # 4 training steps: near the uniform bound


@pytest.mark.parametrize('args,message', [
    (['--checkpoint', '/nonexistent/run'], 'no such directory'),
    (['--steps', '0'], '--steps must be >= 1'),
    (['--steps', 'x'], 'expected integers'),
    (['--num_samples', '3'], 'not divisible by the 2 devices'),
    (['--num_samples', '6', '--batch_size', '4'], 'cannot be split into batches of 4'),
    (['--prefix', 'word ' * 40], 'the model length is 32'),
    (['--eval', '--evaluator', 'MDLM'], 'a causal LM checkpoint'),
    (['--eval', '--evaluator', 'gs://bucket/ar'], 'remote URLs are not supported'),
])
def test_sample_cli_bad_input(runs, tmp_path, args, message):
  out = tmp_path / 'out'
  args = [a.replace('MDLM', str(runs / 'mdlm')) for a in args]
  if '--checkpoint' not in args:
    args = ['--checkpoint', str(runs / 'mdlm'), *args]
  result = _sample(*args, '--out', str(out))
  assert_one_line_error(result, message)
  assert not out.exists() or not os.listdir(out)


def _evaluator(runs):
  return evaluate.Evaluator.load(str(runs / 'ar'), sharding.make_mesh(MeshConfig()))


def test_gen_ppl_matches_a_direct_computation(runs):
  ev = _evaluator(runs)
  samples = [['In the beginning God created', 'the heavens'], ['and the earth.']]
  ppl, total, count = ev.score(samples)
  rows, counted = ev.encode(samples)
  tok = ev.tokenizer
  # protocol: BOS, documents joined by EOS; every non-EOS target counts, plus the first EOS
  first = [tok.bos_id] + tok.encode(['In the beginning God created'])[0] + [tok.eos_id]
  assert rows[0][:len(first)].tolist() == first
  assert counted[0].sum() == len(tok.encode(['In the beginning God created'])[0]) + 1 + len(
      tok.encode(['the heavens'])[0])
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from imdm_jax import train_state  # pylint: disable=g-import-not-at-top
  model = nnx.merge(train_state.model_graphdef(ev.cfg), jax.device_get(ev.params))
  expected_total = 0.0
  for row, mask in zip(rows, counted):
    logits = np.asarray(model(jnp.asarray(row[None])))[0].astype(np.float64)
    log_p = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                             keepdims=True)) - \
        logits.max(-1, keepdims=True)
    expected_total += -(log_p[np.arange(len(row) - 1), row[1:]] * mask).sum()
  np.testing.assert_allclose(total, expected_total, rtol=1e-4)
  assert count == int(counted.sum())
  np.testing.assert_allclose(ppl, np.exp(expected_total / counted.sum()), rtol=1e-4)
  nll, per_count = ev.score_samples(samples)  # the same sums, per sample
  assert nll.shape == per_count.shape == (2,)
  np.testing.assert_allclose(nll.sum(), total, rtol=1e-6)
  np.testing.assert_array_equal(per_count, counted.sum(1))


def test_gen_ppl_separates_text_from_shuffled_and_degenerate_text(runs):
  """Real text scores better than its words shuffled; the evaluator's own greedy text — the
  repetitive, low-entropy output that makes Gen PPL alone misleading — scores better still."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from imdm_jax import train_state  # pylint: disable=g-import-not-at-top
  ev = _evaluator(runs)
  text = sources.bible_chapters()[49][:120]  # a held-out chapter (every 50th is validation)
  words = text.split()
  shuffled = ' '.join(np.random.default_rng(0).permutation(words))
  model = nnx.merge(train_state.model_graphdef(ev.cfg), jax.device_get(ev.params))
  ids = [ev.tokenizer.bos_id]
  for _ in range(24):
    ids.append(int(np.argmax(np.asarray(model(jnp.array([ids])))[0, -1])))
  greedy_ids = [i for i in ids[1:] if i != ev.tokenizer.eos_id]
  greedy = ev.tokenizer.decode(greedy_ids)
  real_ppl, shuffled_ppl, greedy_ppl = (ev.score([[t]])[0] for t in (text, shuffled, greedy))
  assert greedy_ppl < real_ppl < shuffled_ppl, (greedy_ppl, real_ppl, shuffled_ppl, greedy)
  real_ids = ev.tokenizer.encode([text])[0][:len(greedy_ids)]
  assert evaluate.unigram_entropy(np.array([greedy_ids])) < \
      evaluate.unigram_entropy(np.array([real_ids]))


def test_unigram_entropy():
  assert evaluate.unigram_entropy(np.array([[3, 3, 3, 3]])) == 0.0
  np.testing.assert_allclose(evaluate.unigram_entropy(np.array([[1, 2, 3, 4], [5, 5, 6, 6]])),
                             (np.log(4) + np.log(2)) / 2)


def test_bootstrap_interval_covers_the_truth_at_about_its_level():
  """Samples of 256 per-sample (NLL, token count) pairs from a known law: the corpus-level Gen PPL
  interval holds the true exp(E[nll] / E[count]) in about 95 % of 200 repetitions, and the mean's
  interval narrows as 1/sqrt(n)."""
  rng = np.random.default_rng(0)
  truth = np.exp(3.0 * 40 / 40)  # nll ~ 3 per token on average, counts ~ 40
  hits = 0
  for rep in range(200):
    counts = rng.integers(20, 61, 256).astype(float)
    nll = counts * rng.normal(3.0, 0.5, 256)
    low, high = evaluate.bootstrap_interval(evaluate.gen_ppl, (nll, counts), draws=400, seed=rep)
    hits += low <= truth <= high
  assert 0.88 <= hits / 200 <= 0.99, hits
  x = rng.normal(0, 1, 4096)
  wide = np.subtract(*evaluate.bootstrap_interval(np.mean, (x[:256],))[::-1])
  narrow = np.subtract(*evaluate.bootstrap_interval(np.mean, (x,))[::-1])
  np.testing.assert_allclose(wide / narrow, 4.0, rtol=0.25)
