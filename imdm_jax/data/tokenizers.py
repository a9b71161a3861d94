"""Tokenizers behind one small interface, so that any vocabulary plugs into data and sampling.

`sentencepiece` models are trained on the corpus on first use and cached in `data_dir`; the mask
token is appended after the trained vocabulary. Ported weights come with their own vocabularies
(GPT-2 BPE, bert-base-uncased WordPiece): `pretrained.py` loads those from local files.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Callable, Iterable, Iterator, Protocol, runtime_checkable

import sentencepiece as spm

from imdm_jax.errors import UserError


@runtime_checkable  # `-> Tokenizer` checkable at run time (tests/conftest.py)
class Tokenizer(Protocol):
  vocab_size: int  # V, the mask token included
  bos_id: int
  eos_id: int
  pad_id: int
  mask_id: int
  unk_id: int | None  # the id of text the vocabulary cannot encode (None: it encodes any text)
  name: str  # identifies the vocabulary (used in cache keys)

  def encode(self, texts: list[str], keep_special: bool = False) -> list[list[int]]:
    """Token ids of each text, without BOS/EOS. `keep_special`: the literal text of a special token
    (`<|endoftext|>`, `[SEP]`, `</s>`) is read as that token, as Hugging Face tokenizers read it."""

  def decode(self, ids: list[int], keep_special: bool = False) -> str:
    """Text of ids; special tokens (BOS/EOS/pad/mask) are dropped, or with `keep_special` written
    as their literal text (the official Gen PPL protocol scores that text)."""


def split_special(text: str, literal: dict[str, int]) -> list[str | int]:
  """`text` cut at the literal special tokens `literal` (text -> id): its plain pieces (non-empty)
  and the special ids, in order. Longer literals first, so one that holds another wins."""
  if not literal:
    return [text] if text else []
  pattern = '|'.join(re.escape(s) for s in sorted(literal, key=len, reverse=True))
  parts = re.split(f'({pattern})', text)  # odd positions: the literals matched
  return [literal[p] if k % 2 else p for k, p in enumerate(parts) if k % 2 or p]


def encode_keeping_special(texts: list[str], literal: dict[str, int],
                           encode: Callable[[list[str]], list[list[int]]]) -> list[list[int]]:
  """Each text's ids: its plain pieces through `encode`, its literal special tokens as their ids."""
  out = []
  for text in texts:
    parts = split_special(text, literal)
    plain = iter(encode([p for p in parts if isinstance(p, str)]))
    out.append([i for p in parts for i in ([p] if isinstance(p, int) else next(plain))])
  return out


def decode_keeping_special(ids: list[int], literal: dict[int, str],
                           decode_run: Callable[[list[int], bool], str], sep: str = '') -> str:
  """The text of ids with each special id in `literal` (id -> text) written as its text: the runs
  of other ids go through `decode_run(run, at_start)`; the parts are joined by `sep`."""
  parts, run = [], []
  for i in [int(i) for i in ids] + [None]:
    if i is not None and i not in literal:
      run.append(i)
      continue
    if run:
      parts.append(decode_run(run, not parts))
      run = []
    if i is not None:
      parts.append(literal[i])
  return sep.join(parts)


class SentencePieceTokenizer:
  """A trained sentencepiece model (pad 0, unk 1, bos 2, eos 3) plus a mask id at the end."""

  def __init__(self, model_path: str):
    self._sp = spm.SentencePieceProcessor(model_file=model_path)
    self.bos_id, self.eos_id, self.pad_id = self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id()
    self.unk_id = self._sp.unk_id()  # never produced: byte fallback encodes any text
    self.mask_id = self._sp.get_piece_size()
    self.vocab_size = self.mask_id + 1
    with open(model_path, 'rb') as f:
      self.name = f'sp-{hashlib.sha1(f.read()).hexdigest()[:10]}'

  @property
  def _literal(self) -> dict[int, str]:
    """The text of each special id: sentencepiece's own pieces (`<s>`, `</s>`, `<pad>`), and
    `[MASK]` for the mask appended after the trained vocabulary."""
    ids = (self.bos_id, self.eos_id, self.pad_id)
    return {**{i: self._sp.id_to_piece(i) for i in ids}, self.mask_id: '[MASK]'}

  def encode(self, texts: list[str], keep_special: bool = False) -> list[list[int]]:
    if keep_special:  # sentencepiece itself reads `</s>` as the bytes `<`, `/`, `s`, `>`
      literal = {text: i for i, text in self._literal.items()}
      return encode_keeping_special(texts, literal, self._sp.encode)
    return self._sp.encode(texts)

  def decode(self, ids: list[int], keep_special: bool = False) -> str:
    if keep_special:
      return decode_keeping_special(ids, self._literal, self._decode_run)
    special = {self.bos_id, self.eos_id, self.pad_id, self.mask_id}
    return self._sp.decode([int(i) for i in ids if int(i) not in special])

  def _decode_run(self, run: list[int], at_start: bool) -> str:
    """Sentencepiece drops the space (`▁`) that opens a decoded run; inside a text it is real."""
    text = self._sp.decode(run)
    return text if at_start or not self._sp.id_to_piece(run[0]).startswith('▁') else ' ' + text


MAX_SENTENCE_BYTES = 1 << 16  # sentencepiece drops longer inputs (`max_sentence_length`)


def _fit(text: str, limit: int = MAX_SENTENCE_BYTES) -> Iterator[str]:
  """`text` itself if it fits in `limit` UTF-8 bytes; otherwise pieces that do: whole lines packed
  together, a longer line cut between words, a longer word cut every `limit // 4` characters (4
  bytes at most each). Sentencepiece would drop the whole document instead."""
  if len(text.encode()) <= limit:
    yield text
    return
  words = []
  for line in text.splitlines(keepends=True):
    parts = [line] if len(line.encode()) <= limit else re.findall(r'\S+\s*|\s+', line)
    for part in parts:
      words += [part[i:i + limit // 4] for i in range(0, len(part), limit // 4)]
  piece, size = [], 0
  for word in words:
    n = len(word.encode())
    if size + n > limit:
      yield ''.join(piece)
      piece, size = [], 0
    piece.append(word)
    size += n
  if piece:
    yield ''.join(piece)


def train_sentencepiece(texts: Iterable[str], vocab_size: int, model_path: str) -> None:
  """Trains a unigram model of `vocab_size` pieces (mask excluded); byte fallback means any text
  can be encoded. Written to a temporary name first so an interrupted run leaves no bad model."""
  os.makedirs(os.path.dirname(model_path), exist_ok=True)
  prefix = model_path[:-len('.model')] + f'.tmp{os.getpid()}'
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(p for t in texts if t.strip() for p in _fit(t)), model_prefix=prefix,
      vocab_size=vocab_size, model_type='unigram', character_coverage=1.0, byte_fallback=True,
      pad_id=0, unk_id=1, bos_id=2, eos_id=3, input_sentence_size=2_000_000,
      shuffle_input_sentence=True, max_sentence_length=MAX_SENTENCE_BYTES,
      num_threads=os.cpu_count() or 1,
      minloglevel=2)
  os.replace(prefix + '.model', model_path)
  os.remove(prefix + '.vocab')


def _explain(error: str, vocab_size: int) -> str:
  """Sentencepiece's internal check, in the terms of our config."""
  need = re.search(r'smaller than required_chars\. (\d+) vs (\d+)', error)
  if need:
    return (f'the corpus needs at least {need.group(2)} pieces (its characters and the 256 byte '
            f'pieces): set model.vocab_size >= {int(need.group(2)) + 1}')
  if 'sentences_.empty()' in error:
    return 'the corpus holds no text to train on'
  return error.strip().splitlines()[-1]


def load_tokenizer(name: str, vocab_size: int, cache_dir: str, corpus_id: str,
                   training_texts, local_path: str = '') -> Tokenizer:
  """The tokenizer a run asks for. `training_texts()` yields the corpus if one must be trained."""
  if name == 'sentencepiece':
    path = os.path.join(cache_dir, 'tokenizers', f'{corpus_id}-sp{vocab_size - 1}.model')
    if not os.path.exists(path):
      try:
        train_sentencepiece(training_texts(), vocab_size - 1, path)
      except RuntimeError as e:
        raise UserError(f'cannot train a {vocab_size - 1}-piece sentencepiece model on '
                        f'{corpus_id}: {_explain(str(e), vocab_size)}') from None
    return SentencePieceTokenizer(path)
  from imdm_jax.data import pretrained  # pylint: disable=g-import-not-at-top
  return pretrained.load(name, local_path)
