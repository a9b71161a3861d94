"""Turning token streams into fixed-length rows, as MDLM does.

- wrapped: documents are joined, each followed by EOS, and cut into chunks of L - 2 tokens; every
  row is `[BOS] + chunk + [EOS]` and every position counts in the loss. The tail that does not
  fill a row is dropped.
- padded: one row per document, `[BOS] + ids[:L-2] + [EOS]` then padding, which the attention
  mask excludes from the loss (the network still attends to it, like the reference).
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

Row = dict[str, np.ndarray]  # 'tokens' int32 [L], 'attention_mask' int32 [L]


def wrapped_rows(docs: Iterable[list[int]], seq_len: int, bos: int, eos: int) -> Iterator[Row]:
  chunk = seq_len - 2
  buffer: list[int] = []
  ones = np.ones((seq_len,), np.int32)
  for ids in docs:
    buffer.extend(ids)
    buffer.append(eos)
    while len(buffer) >= chunk:
      yield {'tokens': np.asarray([bos, *buffer[:chunk], eos], np.int32), 'attention_mask': ones}
      del buffer[:chunk]


def padded_rows(docs: Iterable[list[int]], seq_len: int, bos: int, eos: int,
                pad: int) -> Iterator[Row]:
  for ids in docs:
    row = [bos, *ids[:seq_len - 2], eos]
    n = len(row)
    tokens = np.full((seq_len,), pad, np.int32)
    tokens[:n] = row
    mask = np.zeros((seq_len,), np.int32)
    mask[:n] = 1
    yield {'tokens': tokens, 'attention_mask': mask}
