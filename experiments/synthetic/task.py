"""The repeated-token task of method.md §5: its data, the exact MDM ceiling, and the metrics.

Every sequence is `L` copies of one token `c ~ U{0..V_s-1}`; the mask is the extra id `V_s`. Any
two positions share `log V_s` nats of information, so a sampler that reveals several positions
in one step from independent per-position distributions (an MDM) can only make them agree by
chance, while an IMDM can derive all of them from the same mask noise eps.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from imdm_jax import sampler, schedule


def sequences(rng: np.random.Generator, n: int, vocab: int, length: int) -> np.ndarray:
  """`n` training rows [n, L] int32: each row one token repeated."""
  c = rng.integers(0, vocab, n)
  return np.repeat(c[:, None], length, axis=1).astype(np.int32)


def mdm_ceiling(steps: int, vocab: int, length: int, alpha_min: float = 1e-3) -> float:
  """P(constant) for a *perfect* MDM denoiser under this project's sampler with `steps` steps.

  A perfect denoiser predicts U{0..V_s-1} at every position until something is revealed, and the
  revealed token everywhere afterwards. So a sample is constant iff the first group of positions
  revealed together all drew the same value: probability `V_s^-(K-1)` for a group of K. Each
  masked position reveals w.p. `(a_s - a_t)/(1 - a_t)` per step on `sampler.time_grid`
  independently, and the last step reveals all that remain.
  """
  t = sampler.time_grid(steps)  # the sampler's float32 grid
  with jax.enable_x64(True):  # alpha of that grid in float64
    a = np.array(schedule.alpha(jnp.asarray(t, jnp.float64), alpha_min), np.float64)
  a[-1] = 1.0
  sizes = np.arange(1, length + 1)
  p_none_yet, total = 1.0, 0.0
  for k in range(steps):
    p = (a[k + 1] - a[k]) / (1.0 - a[k])
    total += p_none_yet * np.sum(stats.binom.pmf(sizes, length, p) * float(vocab) ** -(sizes - 1.0))
    p_none_yet *= (1.0 - p) ** length
  return float(total)


def oracle_bits(vocab: int, noise_dim: int) -> int:
  """log2 V_s, the number of eps coordinates `oracle_partition` reads; refuses what it cannot do."""
  bits = vocab.bit_length() - 1
  if vocab != 1 << bits or not 0 < bits <= noise_dim:
    raise ValueError(f'the oracle partition needs V_s a power of 2 and D >= log2 V_s; got '
                     f'V_s={vocab}, D={noise_dim}')
  return bits


def oracle_partition(eps, vocab: int):
  """c [N] of eps [N, L, D]: the sign bits of the position-mean of eps's first log2 V_s
  coordinates (numpy or jax arrays).

  A known eps -> c map that an IMDM can represent with every position agreeing (one uniform
  attention average, then thresholds), and exactly balanced: eps is symmetric about 0, so every
  bit is a fair coin and the bits are independent. Couplings from it are the best any teacher
  could give, which makes it a reference for how much sharpness the student can learn.
  """
  bits = oracle_bits(vocab, eps.shape[-1])
  mean = eps[..., :bits].mean(axis=1)  # [N, bits]
  return ((mean > 0) * (1 << np.arange(bits))).sum(-1)


def coupling_targets(x, z, c, mask_id: int):
  """x_hat [N, L] of a teacher that copies a revealed token, and gives a fully masked row the
  constant row of its value c [N] (jax arrays; x [N, L] constant rows, z [N, L] x masked)."""
  return jnp.where(jnp.all(z == mask_id, axis=1, keepdims=True), c[:, None], x).astype(x.dtype)


def expected_distinct(n: int, vocab: int) -> float:
  """E[number of distinct values] among `n` uniform draws from `vocab` values."""
  return vocab * -math.expm1(n * math.log1p(-1.0 / vocab))


def pairwise_mutual_information(x: np.ndarray, vocab: int) -> float:
  """Mean plug-in mutual information (nats) between pairs of positions of samples `x` [N, L].

  The data has exactly `log V_s` for every pair; independent positions have 0. The full total
  correlation needs the joint over V_s^L outcomes, which no sample size estimates here, so this is
  the part of it that can be computed. The plug-in estimate is biased upwards by about
  `(V_s - 1)^2 / (2N)` nats for independent positions.
  """
  n, length = x.shape
  x = x.astype(np.int64)
  entropy = lambda codes: _entropy(np.unique(codes, return_counts=True)[1] / n)
  h = [entropy(x[:, i]) for i in range(length)]
  total, pairs = 0.0, 0
  for i in range(length):
    for j in range(i + 1, length):  # pair codes, not a V_s x V_s table: V_s may be 50000
      total += h[i] + h[j] - entropy(x[:, i] * vocab + x[:, j])
      pairs += 1
  return total / pairs


def _entropy(p: np.ndarray) -> float:
  return float(-np.sum(p * np.log(p)))


def one_step_diagnosis(log_probs: np.ndarray) -> dict[str, float]:
  """Where one-step constancy is lost, from each position's x_theta on fully masked inputs.

  log_probs: [N, L, V_s], log x_theta over the data values at t = 1 for N draws of eps. A 1-step
  sample is constant w.p. `sum_v prod_l p_l(v)` given eps (`expected_constant`, the noise-free
  version of the sampled `constant`). It is high only if the positions agree on their most likely
  value (`greedy_constant`: argmax decoding is constant) *and* each is sure of it
  (`top_prob`, the mean over positions and draws of max_v p_l(v)). `greedy_distinct` counts the
  values among the constant argmax decodings: an MDM's argmax is one sequence whatever the draw,
  an IMDM's can follow eps and cover every value.
  """
  log_probs = np.asarray(log_probs, np.float64)
  joint = log_probs.sum(1)  # [N, V]: log prod_l p_l(v)
  top = joint.max(-1, keepdims=True)
  expected = np.exp(top[:, 0] + np.log(np.exp(joint - top).sum(-1)))
  argmax = log_probs.argmax(-1)  # [N, L]
  greedy = (argmax == argmax[:, :1]).all(-1)  # [N]
  return {
      'expected_constant': float(expected.mean()),
      'greedy_constant': float(greedy.mean()),
      'greedy_distinct': len(np.unique(argmax[greedy, 0])),
      'top_prob': float(np.exp(log_probs.max(-1)).mean()),
  }


def score(x: np.ndarray, vocab: int) -> dict[str, float]:
  """The metrics of one batch of samples `x` [N, L] (tokens >= vocab, e.g. masks, never match)."""
  constant = (x == x[:, :1]).all(-1) & (x[:, 0] < vocab)
  n_const = int(constant.sum())
  distinct = len(np.unique(x[constant, 0]))
  expected = expected_distinct(n_const, vocab)
  valid = np.clip(x, 0, vocab - 1)
  return {
      'constant': n_const / len(x),
      'constant_se': math.sqrt(n_const * (len(x) - n_const) / len(x) ** 3),  # binomial
      'distinct': distinct,
      'coverage': distinct / vocab,
      # 1 when the constant samples cover as many values as uniform draws would: no collapse
      'distinct_vs_uniform': distinct / expected if n_const else float('nan'),
      'pairwise_mi': pairwise_mutual_information(valid, vocab),
  }
