"""Packing, splits, sources (local files, a tfds stand-in), per-process sharding, exact eval."""

import dataclasses
import json

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from imdm_jax.config import DataConfig
from imdm_jax.data import packing, pipeline, sources, store
from imdm_jax.errors import UserError


def test_wrapped_rows_are_bos_chunk_eos():
  docs = [[10, 11, 12], [20, 21], [30, 31, 32, 33, 34]]
  rows = list(packing.wrapped_rows(docs, seq_len=5, bos=1, eos=2))
  stream = [10, 11, 12, 2, 20, 21, 2, 30, 31, 32, 33, 34, 2]
  assert len(rows) == len(stream) // 3
  for i, row in enumerate(rows):
    assert row['tokens'].tolist() == [1, *stream[3 * i:3 * i + 3], 2]
    assert row['attention_mask'].tolist() == [1] * 5


def test_padded_rows_truncate_and_mask():
  rows = list(packing.padded_rows([[5, 6], [7, 8, 9, 10, 11]], seq_len=5, bos=1, eos=2, pad=0))
  assert rows[0]['tokens'].tolist() == [1, 5, 6, 2, 0]
  assert rows[0]['attention_mask'].tolist() == [1, 1, 1, 1, 0]
  assert rows[1]['tokens'].tolist() == [1, 7, 8, 9, 2]
  assert rows[1]['attention_mask'].tolist() == [1] * 5


def test_split_indices():
  train, val = sources.split_indices(10, 'every:5')
  assert val.tolist() == [4, 9] and len(train) == 8
  train, val = sources.split_indices(10, 'last:3')
  assert val.tolist() == [7, 8, 9]
  for bad in ('every:x', 'last:10', 'nope:3'):
    with pytest.raises(UserError):
      sources.split_indices(10, bad)


def test_bible_corpus_is_real_text():
  chapters = sources.bible_chapters()
  assert len(chapters) == 1189
  assert chapters[0].startswith('In the beginning God created the heavens and the earth.')
  assert not any(c[:1].isdigit() for c in chapters[:50])  # verse numbers stripped


_RNG = np.random.default_rng(0)
WORDS = sorted({''.join(_RNG.choice(list('abcdefghijklmnopqrstuvwxyz'), _RNG.integers(3, 8)))
                for _ in range(400)})


def _write_corpus(tmp_path):
  rng, words = np.random.default_rng(0), WORDS
  with open(tmp_path / 'a.jsonl', 'w') as f:
    for _ in range(120):
      f.write(json.dumps({'text': ' '.join(rng.choice(words, 40))}) + '\n')
  (tmp_path / 'b.txt').write_text(' '.join(rng.choice(words, 400)))
  return str(tmp_path / '*')


def test_local_text_files_build_rows(tmp_path, micro_cfg):
  pattern = _write_corpus(tmp_path)
  cfg = dataclasses.replace(micro_cfg, data=dataclasses.replace(
      micro_cfg.data, source=f'text:{pattern}', data_dir=str(tmp_path / 'cache'), val_split='every:10'),
      model=dataclasses.replace(micro_cfg.model, vocab_size=385))
  docs = sources.documents(cfg.data)
  assert len(docs['train']) + len(docs['validation']) == 121
  data = store.prepare(cfg)
  row = data.train[0]
  assert row['tokens'].shape == (32,) and row['tokens'][0] == data.tokenizer.bos_id
  assert data.tokenizer.mask_id == 384 and row['tokens'].max() < 384
  text = data.tokenizer.decode(row['tokens'].tolist())
  words = text.split()[1:-1]  # the ends of a wrapped row may cut a word
  assert words and set(words) <= set(WORDS)
  # a second call reuses the stored rows (same directory, no rebuild)
  assert store.prepare(cfg).path == data.path


class LmOneBStandin(tfds.core.GeneratorBasedBuilder):
  """A few sentences in the shape of tfds `lm1b` (a `text` feature, train/test splits)."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {'text': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(200), 'test': self._generate_examples(20)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {'text': f'sentence {i} says the river is {" ".join(WORDS[i:i + 30])} .'}


def test_tfds_source_lm1b_route(tmp_path, micro_cfg):
  LmOneBStandin(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  cfg = dataclasses.replace(micro_cfg, data=dataclasses.replace(
      micro_cfg.data, source='tfds:lm_one_b_standin', data_dir=str(tmp_path), val_split='test',
      wrap=False), model=dataclasses.replace(micro_cfg.model, vocab_size=385))
  data = store.prepare(cfg)
  assert len(data.train) == 200 and len(data.validation) == 20  # one padded row per sentence
  row = data.validation[0]
  n = int(row['attention_mask'].sum())
  assert row['tokens'][0] == data.tokenizer.bos_id and row['tokens'][n - 1] == data.tokenizer.eos_id
  assert 'river' in data.tokenizer.decode(row['tokens'].tolist())
  with pytest.raises(UserError, match='tfds build'):
    sources.documents(dataclasses.replace(cfg.data, source='tfds:lm1b'))


def _rows(n, L=4):
  return [{'tokens': np.full((L,), i, np.int32), 'attention_mask': np.ones((L,), np.int32)}
          for i in range(n)]


def test_process_shards_are_disjoint_and_complete(monkeypatch):
  rows, seen = _rows(64), []
  monkeypatch.setattr(jax, 'device_count', lambda: 8)
  for p in range(2):
    monkeypatch.setattr(jax, 'process_index', lambda p=p: p)
    monkeypatch.setattr(jax, 'process_count', lambda: 2)
    it = pipeline.train_iterator(rows, global_batch=16, seed=0)
    epoch = [next(it)['tokens'][:, 0] for _ in range(4)]  # 4 local batches of 8 = 32 rows
    seen.append(np.concatenate(epoch))
  assert not set(seen[0]) & set(seen[1])
  assert sorted(np.concatenate(seen).tolist()) == list(range(64))


def test_train_iterator_reshuffles_epochs_and_restores(monkeypatch):
  it = pipeline.train_iterator(_rows(32), global_batch=8, seed=1)
  first = [next(it)['tokens'][:, 0].tolist() for _ in range(4)]
  second = [next(it)['tokens'][:, 0].tolist() for _ in range(4)]
  assert sorted(sum(first, [])) == sorted(sum(second, [])) == list(range(32))
  assert first != second
  state = it.get_state()
  expected = next(it)['tokens']
  it2 = pipeline.train_iterator(_rows(32), global_batch=8, seed=1)
  it2.set_state(state)
  np.testing.assert_array_equal(next(it2)['tokens'], expected)


def test_eval_batches_cover_every_row_once():
  batches = list(pipeline.eval_batches(_rows(21), global_batch=8))
  assert len(batches) == 3
  toks = np.concatenate([b['tokens'][:, 0] for b in batches])
  masks = np.concatenate([b['attention_mask'][:, 0] for b in batches])
  assert toks[masks == 1].tolist() == list(range(21)) and masks.sum() == 21


def test_bad_batch_size():
  with pytest.raises(UserError, match='not divisible'):
    pipeline.local_batch_size(12)


def test_empty_corpus_is_a_user_error(tmp_path):
  (tmp_path / 'empty.jsonl').write_text('')
  with pytest.raises(UserError):
    sources.documents(DataConfig(source=f'text:{tmp_path}/*.jsonl'))


def test_long_documents_are_split_for_sentencepiece_not_dropped(tmp_path, micro_cfg):
  """A corpus whose every file is one book of over 64 KiB (sentencepiece drops inputs that long)
  trains a tokenizer; pieces fit the limit and put the text back together exactly."""
  from imdm_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  book = lambda n: '\n'.join(' '.join(rng.choice(WORDS, 12)) for _ in range(n)) + '\n'
  long_line = ' '.join(rng.choice(WORDS, 20000)) + ' ' + 'x' * 70000
  for text in (book(3000), long_line, 'short'):
    pieces = list(tokenizers._fit(text))  # pylint: disable=protected-access
    assert ''.join(pieces) == text
    assert all(len(p.encode()) <= tokenizers.MAX_SENTENCE_BYTES for p in pieces)
  for i in range(3):
    (tmp_path / f'book{i}.txt').write_text(book(3000))
  assert min(len((tmp_path / f'book{i}.txt').read_bytes()) for i in range(3)) > 1 << 16
  cfg = dataclasses.replace(micro_cfg, data=dataclasses.replace(
      micro_cfg.data, source=f'text:{tmp_path}/*.txt', data_dir=str(tmp_path / 'cache'),
      val_split='last:1'), model=dataclasses.replace(micro_cfg.model, vocab_size=129))
  with pytest.raises(UserError, match=r'needs at least \d+ pieces .*: set model.vocab_size >= '):
    store.prepare(cfg)  # our terms, not sentencepiece's internal check
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=385))
  data = store.prepare(cfg)
  assert len(data.train) > 0 and data.tokenizer.mask_id == 384
