"""Sample quality (docs/method.md §6): generative perplexity under a causal LM, and unigram entropy.

Two Gen PPL protocols (docs/sampling.md), both reporting the corpus-level
`exp(sum NLL / sum counted tokens)`:
- `official` (the IMDM reference's `Metrics.record_generative_perplexity`): decode each sample
  whole, special tokens kept as literal text; re-tokenize with the evaluator's tokenizer (no BOS),
  truncated at the diffusion model's length in evaluator tokens and EOS-padded to the longest text
  of its sampling batch; score chunks of the evaluator's context, each chunk's first token
  unscored; count every non-EOS target plus a target that is the chunk's first EOS.
- `ours`: decode each sample dropping special tokens, split at EOS into documents, re-tokenize
  them joined by the evaluator's EOS, prepend its BOS, truncate to its context, and score every
  next token; count every non-EOS target plus the first EOS target.
Entropy: the unigram entropy (nats) of each sample's tokens, averaged — low entropy with low
Gen PPL means degenerate repetition.
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

PROTOCOLS = ('official', 'ours')  # how samples become the evaluator's scored tokens


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


def check_protocol(protocol: str) -> None:
  if protocol not in PROTOCOLS:
    raise UserError(f'unknown Gen PPL protocol {protocol!r}; known: {", ".join(PROTOCOLS)}')


def sample_texts(ids: np.ndarray, tok: tokenizers.Tokenizer, protocol: str) -> list:
  """What `Evaluator.score_samples(..., protocol)` scores, from sample ids `[N, L]`: `ours`, each
  sample's document texts; `official`, each sample's whole text, special tokens written literally
  (what the reference's `tokenizer.batch_decode(samples)` gives)."""
  check_protocol(protocol)
  if protocol == 'ours':
    return [split_documents(row, tok) for row in ids]
  return [tok.decode([int(i) for i in row], keep_special=True) for row in ids]


def pad_groups(ids: list[list[int]], group: int, pad_id: int) -> list[list[int]]:
  """Each token list padded with `pad_id` to the longest of its group of `group` consecutive lists
  (0: one group of all)."""
  group = group or max(len(ids), 1)
  out = []
  for start in range(0, len(ids), group):
    width = max(len(t) for t in ids[start:start + group])
    out += [t + [pad_id] * (width - len(t)) for t in ids[start:start + group]]
  return out


def official_counted(chunk: np.ndarray, eos_id: int) -> np.ndarray:
  """The targets `chunk[1:]` that count under the official protocol, from a chunk `[W]` -> `[W-1]`:
  every non-EOS token, and the chunk's first EOS — found over the whole chunk, so an EOS in the
  unscored first position takes that role and no EOS target counts."""
  is_eos = chunk == eos_id
  first_eos = is_eos & (np.cumsum(is_eos) == 1)
  return (~is_eos | first_eos)[1:]


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

  def encode_official(self, texts: list[str], model_length: int,
                      group: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The official protocol's token rows `[R, C]` (EOS-padded), the mask `[R, C-1]` of the targets
    that count, and the text each row belongs to `[R]`. Each text is tokenized without BOS and cut
    at `model_length` tokens; each `group` of texts (0: all) is EOS-padded to its longest, as the
    reference tokenizes a sampling batch in one padded call; a padded text is scored in chunks of
    the evaluator's context C (one chunk unless `model_length > C`)."""
    if model_length < 1:
      raise UserError(f'the official Gen PPL protocol needs the model length, got {model_length}')
    tok, ctx = self.tokenizer, self.cfg.data.seq_len
    ids = pad_groups([t[:model_length] for t in tok.encode(texts, keep_special=True)], group,
                     tok.eos_id)
    chunks = [(n, row, mask) for n, t in enumerate(ids) for row, mask in self._official_chunks(t)]
    return (np.array([c[1] for c in chunks], np.int32).reshape(-1, ctx),
            np.array([c[2] for c in chunks], np.float32).reshape(-1, ctx - 1),
            np.array([c[0] for c in chunks], np.int64))

  def _official_chunks(self, padded: list[int]):
    """(row `[C]`, counted `[C-1]`) for each context-sized chunk of one padded text: the reference
    splits the padded batch along its length (`torch.split(..., eval_context_size)`); our rows are
    EOS-padded to C, and the padding's targets never count."""
    ctx, eos = self.cfg.data.seq_len, self.tokenizer.eos_id
    for c in range(0, len(padded), ctx):
      chunk = np.asarray(padded[c:c + ctx], np.int32)
      row = np.full(ctx, eos, np.int32)
      row[:len(chunk)] = chunk
      mask = np.zeros(ctx - 1, np.float32)
      mask[:len(chunk) - 1] = official_counted(chunk, eos)
      yield row, mask

  def score(self, samples: list, batch_size: int = 0, **protocol) -> tuple[float, float, int]:
    """(Gen PPL, total NLL, counted tokens) of samples (as `score_samples` takes them)."""
    nll, counted = self.score_samples(samples, batch_size, **protocol)
    return gen_ppl(nll, counted), float(np.sum(nll)), int(np.sum(counted))

  def score_samples(self, samples: list, batch_size: int = 0, protocol: str = 'ours',
                    model_length: int = 0, group: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: the NLL summed over its counted tokens `[N]`, and their number `[N]`. `ours`:
    samples as lists of document texts; `official`: one text per sample (`sample_texts`), with the
    diffusion model's length and its sampling batch (`encode_official`)."""
    check_protocol(protocol)
    if protocol == 'ours':
      return self._score_rows(*self.encode(samples), batch_size)
    rows, counted, owner = self.encode_official(samples, model_length, group)
    nll, count = self._score_rows(rows, counted, batch_size)
    return (np.bincount(owner, nll, minlength=len(samples)),  # a text's chunks summed: [N]
            np.bincount(owner, count, minlength=len(samples)))

  def _score_rows(self, rows: np.ndarray, counted: np.ndarray,
                  batch_size: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per row `[R, C]`: the NLL summed over its counted targets (`counted` `[R, C-1]`) `[R]`, and
    their number `[R]`."""
    if not len(rows):  # official: texts that all tokenize to nothing leave no row
      return np.zeros(0), np.zeros(0)
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
