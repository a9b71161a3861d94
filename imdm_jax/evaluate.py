"""Sample quality (docs/method.md §6): generative perplexity under a causal LM, and unigram entropy.

Gen PPL protocol: decode each sample, re-tokenize it with the evaluator's tokenizer (documents
inside a wrapped sample stay separated by the evaluator's EOS), prepend its BOS, truncate to its
context, and score every next token; count every non-EOS token plus the first EOS; report the
corpus-level `exp(sum NLL / sum counted tokens)`. Entropy: the unigram entropy (nats) of each
sample's tokens, averaged — low entropy with low Gen PPL means degenerate repetition.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from imdm_jax import gpt2, init_from, sharding, train_state
from imdm_jax.config import Config
from imdm_jax.data import store, tokenizers
from imdm_jax.errors import UserError


def sample_entropies(ids: np.ndarray) -> np.ndarray:
  """The entropy (nats) of each sample's token histogram: `[N, L]` -> `[N]`."""
  out = np.empty(len(ids))
  for n, row in enumerate(ids):
    _, counts = np.unique(row, return_counts=True)
    p = counts / counts.sum()
    out[n] = -(p * np.log(p)).sum()
  return out


def unigram_entropy(ids: np.ndarray) -> float:
  """Mean over samples `[N, L]` of the entropy (nats) of each sample's token histogram."""
  return float(np.mean(sample_entropies(ids)))


def gen_ppl(nll: np.ndarray, counted: np.ndarray) -> float:
  """Corpus-level Gen PPL from per-sample NLL sums and counted tokens `[N]`."""
  return math.exp(float(np.sum(nll)) / max(float(np.sum(counted)), 1.0))


def bootstrap_interval(statistic, arrays: tuple[np.ndarray, ...], level: float = 0.95,
                       draws: int = 2000, seed: int = 0) -> tuple[float, float]:
  """Percentile bootstrap interval of `statistic(*arrays)` over samples: each draw resamples the
  rows `[N]` of every array together (a sample's NLL goes with its token count)."""
  n = len(arrays[0])
  rows = np.random.default_rng(seed).integers(0, n, (draws, n))
  values = np.array([statistic(*(a[r] for a in arrays)) for r in rows])
  low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
  return float(low), float(high)


def split_documents(ids, tok: tokenizers.Tokenizer) -> list[str]:
  """The texts of the documents in one sample (split at EOS; BOS, pad and mask dropped)."""
  docs, current = [], []
  for i in ids:
    if int(i) == tok.eos_id:
      docs.append(current)
      current = []
    else:
      current.append(int(i))
  docs.append(current)
  return [tok.decode(d) for d in docs if d]


@dataclasses.dataclass
class Evaluator:
  """A causal LM with its tokenizer: `score(texts)` gives Gen PPL over them."""
  params: train_state.Params
  cfg: Config
  tokenizer: tokenizers.Tokenizer
  mesh: Mesh

  @classmethod
  def load(cls, path: str, mesh: Mesh) -> 'Evaluator':
    params, ckpt_cfg = init_from.load_weights(path, mesh)[:2]
    if ckpt_cfg.model.arch != 'gpt2':
      raise UserError(f'--evaluator {path}: a causal LM checkpoint (model.arch=gpt2) is needed, '
                      f'this one is {ckpt_cfg.model.arch!r}')
    return cls(params, ckpt_cfg, store.load_tokenizer(ckpt_cfg), mesh)

  def encode(self, samples: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """Token rows `[N, C]` ([BOS] + documents joined by EOS, EOS-padded) and the mask `[N, C-1]`
    of the targets that count."""
    ctx, tok = self.cfg.data.seq_len, self.tokenizer
    rows = np.full((len(samples), ctx), tok.eos_id, np.int32)
    counted = np.zeros((len(samples), ctx - 1), np.float32)
    for n, docs in enumerate(samples):
      ids = [tok.bos_id]
      for i, doc in enumerate(tok.encode(docs)):
        ids += ([tok.eos_id] if i else []) + doc
      ids = ids[:ctx]
      rows[n, :len(ids)] = ids
      targets = np.asarray(ids[1:])
      is_eos = targets == tok.eos_id
      first_eos = is_eos & (np.cumsum(is_eos) == 1)
      counted[n, :len(targets)] = (~is_eos | first_eos).astype(np.float32)
    return rows, counted

  def score(self, samples: list[list[str]], batch_size: int = 0) -> tuple[float, float, int]:
    """(Gen PPL, total NLL, counted tokens) of samples given as lists of document texts."""
    nll, counted = self.score_samples(samples, batch_size)
    return gen_ppl(nll, counted), float(np.sum(nll)), int(np.sum(counted))

  def score_samples(self, samples: list[list[str]],
                    batch_size: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: the NLL summed over its counted tokens `[N]`, and their number `[N]`."""
    rows, counted = self.encode(samples)
    n_dev = self.mesh.devices.size
    batch_size = batch_size or max(n_dev, 8)
    batch_size = -(-batch_size // n_dev) * n_dev
    nll, count = [], []
    for start in range(0, len(rows), batch_size):
      r, c = rows[start:start + batch_size], counted[start:start + batch_size]
      pad = batch_size - len(r)  # rows of zero weight keep every batch the same shape
      r = np.concatenate([r, np.zeros((pad, r.shape[1]), np.int32)])
      c = np.concatenate([c, np.zeros((pad, c.shape[1]), np.float32)])
      # every process scores the same samples: each feeds its own devices' rows, and all read
      # the per-row sums (gathered to every device)
      rows_on = sharding.batch_sharding(self.mesh)
      out = jax.device_get(_scorer(self.cfg, self.mesh)(
          self.params, sharding.host_to_global(r, rows_on), sharding.host_to_global(c, rows_on)))
      nll.append(np.asarray(out[0], np.float64)[:len(r) - pad])
      count.append(np.asarray(out[1], np.float64)[:len(r) - pad])
    return np.concatenate(nll), np.concatenate(count)


@functools.cache
def _scorer(cfg: Config, mesh: Mesh):
  """One compiled scorer per evaluator config; input shardings come from the arguments, and the
  per-row sums are gathered to every device (so every process can read them)."""
  graphdef = train_state.model_graphdef(cfg)

  @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
  def score(params, rows, counted):
    nll = gpt2.token_nll(nnx.merge(graphdef, params)(rows), rows)
    return jnp.sum(nll * counted, axis=1), jnp.sum(counted, axis=1)  # [B], [B]

  return score
