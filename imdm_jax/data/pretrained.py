"""The vocabularies of ported PyTorch weights: GPT-2 BPE and bert-base-uncased WordPiece.

Loaded from local files (`data.tokenizer_path`: a directory or file) with the `tokenizers`
library; never downloaded at run time. Ids follow docs/conversion.md:
GPT-2 `V = 50258`, mask appended at 50257, BOS = EOS = 50256 (the reference pads with the mask
id; we pad with 50256 — padding never reaches the loss, rows carry an explicit attention mask);
BERT `V = 30522`, mask 103 (`[MASK]`), BOS/EOS = `[CLS]`/`[SEP]`, pad 0.
"""

from __future__ import annotations

import os

from imdm_jax.data import tokenizers as tokenizers_lib
from imdm_jax.errors import UserError

# The model vocabulary V each tokenizer implies (its own tokens, plus GPT-2's appended mask).
VOCAB_SIZES = {'gpt2': 50258, 'bert-base-uncased': 30522}


class _HFTokenizer:
  """Adapts a `tokenizers.Tokenizer` to the project's `Tokenizer` interface.

  `literal` (text -> id): the special tokens Hugging Face's own tokenizer splits out of text (GPT-2:
  `<|endoftext|>` alone; BERT: `[CLS]`, `[SEP]`, `[PAD]`, `[MASK]`, `[UNK]`); `sep` joins them to
  the text around them when decoding (WordPiece joins tokens with spaces, byte-level BPE with
  nothing)."""

  def __init__(self, tok, name: str, vocab_size: int, bos: int, eos: int, pad: int, mask: int,
               unk: int | None = None, literal: dict[str, int] | None = None, sep: str = ''):
    self._tok, self.name, self.vocab_size = tok, name, vocab_size
    self.bos_id, self.eos_id, self.pad_id, self.mask_id = bos, eos, pad, mask
    self.unk_id = unk  # None: byte-level BPE encodes any text
    self._literal, self._sep = literal or {}, sep

  def encode(self, texts: list[str], keep_special: bool = False) -> list[list[int]]:
    if keep_special:  # the vocab.json + merges.txt BPE would read `<|endoftext|>` as plain text
      return tokenizers_lib.encode_keeping_special(texts, self._literal, self.encode)
    return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids: list[int], keep_special: bool = False) -> str:
    if keep_special:
      # GPT-2's appended mask is no GPT-2 token: it is written `[MASK]` (read back as plain text)
      literal = {i: t for t, i in self._literal.items()} | {self.mask_id: '[MASK]'}
      return tokenizers_lib.decode_keeping_special(ids, literal, self._decode_run, self._sep)
    special = {self.bos_id, self.eos_id, self.pad_id, self.mask_id}
    return self._tok.decode([int(i) for i in ids if int(i) not in special])

  def _decode_run(self, run: list[int], at_start: bool) -> str:
    del at_start  # both decoders keep a run's opening space
    return self._tok.decode(run)


def _find(path: str, *names: str) -> list[str]:
  files = [os.path.join(path, n) if os.path.isdir(path) else path for n in names]
  missing = [f for f in files if not os.path.isfile(f)]
  if missing:
    raise UserError(f'tokenizer file not found: {missing[0]} (set data.tokenizer_path)')
  return files


def load(name: str, path: str):
  try:
    import tokenizers  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError(f'tokenizer {name!r} needs the `tokenizers` package') from None
  path = os.path.expanduser(path)
  if name == 'bert-base-uncased':
    (vocab,) = _find(path, 'vocab.txt')
    tok = tokenizers.BertWordPieceTokenizer(vocab, lowercase=True)
    size = tok.get_vocab_size()
    ids = {s: tok.token_to_id(s) for s in ('[CLS]', '[SEP]', '[PAD]', '[MASK]', '[UNK]')}
    return _HFTokenizer(tok, name, size, ids['[CLS]'], ids['[SEP]'], ids['[PAD]'], ids['[MASK]'],
                        ids['[UNK]'], literal=ids, sep=' ')
  if name == 'gpt2':
    tok = _gpt2(tokenizers, path)
    eot = tok.token_to_id('<|endoftext|>')
    n = tok.get_vocab_size()
    return _HFTokenizer(tok, name, n + 1, eot, eot, eot, n, literal={'<|endoftext|>': eot})
  raise UserError(f'unknown tokenizer {name!r}; known: sentencepiece, gpt2, bert-base-uncased')


def _gpt2(tokenizers, path: str):
  """GPT-2's BPE from `vocab.json` + `merges.txt`, or from the single `tokenizer.json` some
  Hugging Face snapshots ship instead (`path`: that file or its directory); same ids either way."""
  single = os.path.join(path, 'tokenizer.json') if os.path.isdir(path) else path
  if not os.path.isfile(os.path.join(path, 'vocab.json')) and os.path.isfile(single):
    return tokenizers.Tokenizer.from_file(single)
  vocab, merges = _find(path, 'vocab.json', 'merges.txt')
  return tokenizers.ByteLevelBPETokenizer(vocab, merges)
