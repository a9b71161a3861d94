"""Tokenized, packed rows stored as a tfds ArrayRecord dataset (catalogue + random-access storage).

`prepare(cfg)` resolves the tokenizer, builds the rows once per (corpus, tokenizer, length,
packing, split) into `data_dir/packed/...` and returns tfds data sources that grain reads by
index. tfds writes into an `incomplete.*` directory and renames it when done, so an interrupted
build never leaves a half dataset that looks finished.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Iterator, Sequence

import jax
import numpy as np
import tensorflow_datasets as tfds

from imdm_jax import runtime
from imdm_jax.config import Config
from imdm_jax.data import packing, sources, tokenizers
from imdm_jax.errors import UserError

_ENCODE_BATCH = 256


class PackedRows(tfds.core.GeneratorBasedBuilder):
  """Rows `{'tokens': int32[L], 'attention_mask': int32[L]}` made from text documents."""

  VERSION = tfds.core.Version('1.0.0')

  def __init__(self, *, docs: dict[str, Sequence[str]], tokenizer: tokenizers.Tokenizer,
               seq_len: int, wrap: bool, **kwargs):
    self._docs, self._tok, self._seq_len, self._wrap = docs, tokenizer, seq_len, wrap
    super().__init__(file_format='array_record', **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    row = tfds.features.Tensor(shape=(self._seq_len,), dtype=np.int32)
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({'tokens': row, 'attention_mask': row}),
        description=f'{"wrapped" if self._wrap else "padded"} rows, tokenizer {self._tok.name}')

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(docs) for split, docs in self._docs.items()}

  def _generate_examples(self, docs: Sequence[str]):
    tok = self._tok

    def encoded() -> Iterator[list[int]]:
      for start in range(0, len(docs), _ENCODE_BATCH):
        yield from tok.encode([docs[i] for i in range(start, min(start + _ENCODE_BATCH, len(docs)))])

    if self._wrap:
      rows = packing.wrapped_rows(encoded(), self._seq_len, tok.bos_id, tok.eos_id)
    else:
      rows = packing.padded_rows(encoded(), self._seq_len, tok.bos_id, tok.eos_id, tok.pad_id)
    yield from enumerate(rows)


@dataclasses.dataclass
class Dataset:
  tokenizer: tokenizers.Tokenizer
  train: Sequence[dict[str, np.ndarray]]  # random-access rows
  validation: Sequence[dict[str, np.ndarray]]
  path: str


def load_tokenizer(cfg: Config, docs: dict[str, Sequence[str]] | None = None
                   ) -> tokenizers.Tokenizer:
  """The run's tokenizer. A sentencepiece model missing from the cache is trained on the
  training documents (read only then). Every process of a job calls it: process 0 loads first
  (training into the shared `data.data_dir` if need be), the others once it has, so they read
  its model rather than all training the same one at once."""
  if jax.process_index() == 0:
    try:
      return _load_tokenizer(cfg, docs)
    finally:  # even on failure, so the others fail alike rather than wait for a timeout
      runtime.barrier('imdm_jax.data.tokenizer')
  runtime.barrier('imdm_jax.data.tokenizer')
  return _load_tokenizer(cfg, docs)


def _load_tokenizer(cfg: Config, docs: dict[str, Sequence[str]] | None) -> tokenizers.Tokenizer:
  data = cfg.data

  def training_texts():
    train = (docs or sources.documents(data))['train']
    return (train[i] for i in range(len(train)))

  tok = tokenizers.load_tokenizer(data.tokenizer, cfg.model.vocab_size,
                                  os.path.expanduser(data.data_dir), sources.corpus_id(data),
                                  training_texts, data.tokenizer_path)
  # A causal LM may lack the mask id appended after a pretrained vocabulary (ported GPT-2).
  without_mask = cfg.model.arch == 'gpt2' and tok.mask_id == cfg.model.vocab_size
  if tok.vocab_size != cfg.model.vocab_size and not without_mask:
    raise UserError(f'model.vocab_size={cfg.model.vocab_size} but tokenizer {tok.name} has '
                    f'{tok.vocab_size} ids (mask included)')
  return tok


def prepare(cfg: Config) -> Dataset:
  """Tokenizer and packed rows for `cfg.data`, built on first use (by process 0 only)."""
  data = cfg.data
  docs = sources.documents(data)
  corpus = sources.corpus_id(data)
  tok = load_tokenizer(cfg, docs)
  packing_name = 'wrap' if data.wrap else 'pad'
  split = sources.corpus_id(dataclasses.replace(data, source=data.val_split))
  name = f'{corpus}-{tok.name}-L{data.seq_len}-{packing_name}-{split}'
  path = os.path.join(os.path.expanduser(data.data_dir), 'packed', name)
  builder = PackedRows(docs=docs, tokenizer=tok, seq_len=data.seq_len, wrap=data.wrap,
                       data_dir=path)
  if jax.process_index() == 0 and not os.path.exists(os.path.join(builder.data_dir,
                                                                   'dataset_info.json')):
    print(f'building {data.seq_len}-token rows of {data.source} in {builder.data_dir}', flush=True)
    tfds.disable_progress_bar()
    builder.download_and_prepare()
  runtime.barrier('imdm_jax.data.prepare')
  rows = tfds.builder_from_directory(builder.data_dir).as_data_source()
  for name in ('train', 'validation'):
    if len(rows[name]) == 0:
      raise UserError(f'data.source={data.source!r}: the {name} split has no rows of length '
                      f'{data.seq_len} (corpus too small?)')
  return Dataset(tok, rows['train'], rows['validation'], builder.data_dir)


def unigram_perplexity(train, validation, vocab_size: int, max_rows: int = 20_000) -> float:
  """exp(cross-entropy) of validation tokens under the train unigram distribution (add-one
  smoothed): the perplexity of a model that ignores context, the bar a denoiser must beat."""
  def counts(rows):
    c = np.zeros((vocab_size,), np.float64)
    for row in itertools.islice((rows[i] for i in range(len(rows))), max_rows):
      np.add.at(c, row['tokens'][row['attention_mask'] > 0], 1.0)
    return c
  p = counts(train) + 1.0
  p /= p.sum()
  val = counts(validation)
  return float(np.exp(-(val * np.log(p)).sum() / val.sum()))
