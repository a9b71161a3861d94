"""GPT-2: the causal language model that scores samples (generative perplexity).

The architecture of Hugging Face's `gpt2` family (learned positions, pre-LayerNorm with biases,
GELU tanh, tied input/output embeddings), with attribute names mirroring its state dict
(`wte`, `wpe`, `h.{i}.attn.c_attn`, `ln_f`, ...; HF's Conv1D weights are already `[in, out]`).
`gpt2-large` weights ported by `convert.py` make the paper's evaluator; the same network trained
here by `train.py --preset tiny-ar` (`model.arch='gpt2'`) is the offline evaluator.
`model.dtype` and `model.remat` act as in the DiT (model.py): bf16 matmuls, float32 parameters,
residual stream, LayerNorm, softmax and logits.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int, PRNGKeyArray

from imdm_jax.config import Config
from imdm_jax.model import compute_dtype, dropout, remat_blocks, with_axes

LN_EPS = 1e-5


class LayerNorm(nnx.Module):

  def __init__(self, dim: int):
    self.weight = nnx.Param(jnp.ones((dim,)))
    self.bias = nnx.Param(jnp.zeros((dim,)))

  def __call__(self, x: Float[Array, '... d']) -> Float[Array, '... d']:
    x = x.astype(jnp.float32)  # the residual stream is float32 already; norms never run in bf16
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + LN_EPS) * self.weight[...] + self.bias[...]


def _linear(rngs: nnx.Rngs, d_in: int, d_out: int, dtype: jnp.dtype, axes: tuple[str, str],
            std: float = 0.02) -> nnx.Linear:
  """The kernel `[d_in, d_out]` declares the logical `axes` (model.with_axes)."""
  return nnx.Linear(d_in, d_out, kernel_init=with_axes(nnx.initializers.normal(std), *axes),
                    bias_init=nnx.initializers.zeros, dtype=dtype, rngs=rngs)


class Attention(nnx.Module):

  def __init__(self, d: int, n_heads: int, n_blocks: int, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.n_heads = n_heads
    self.c_attn = _linear(rngs, d, 3 * d, dtype, ('embed', 'qkv'))
    self.c_proj = _linear(rngs, d, d, dtype, ('qkv', 'embed'), std=0.02 / math.sqrt(2 * n_blocks))

  def __call__(self, x: Float[Array, 'B L d']) -> Float[Array, 'B L d']:
    B, L, d = x.shape
    q, k, v = jnp.split(self.c_attn(x).reshape(B, L, 3, self.n_heads, d // self.n_heads), 3, 2)
    causal = jnp.tril(jnp.ones((L, L), jnp.bool_))
    # bf16 inputs: jax computes the logits and softmax in float32 itself
    out = jax.nn.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], mask=causal)
    return self.c_proj(out.reshape(B, L, d))


class MLP(nnx.Module):

  def __init__(self, d: int, ratio: int, n_blocks: int, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.c_fc = _linear(rngs, d, ratio * d, dtype, ('embed', 'mlp'))
    self.c_proj = _linear(rngs, ratio * d, d, dtype, ('mlp', 'embed'),
                          std=0.02 / math.sqrt(2 * n_blocks))

  def __call__(self, x):
    return self.c_proj(jax.nn.gelu(self.c_fc(x), approximate=True))


class Block(nnx.Module):

  def __init__(self, d: int, n_heads: int, ratio: int, n_blocks: int, rate: float,
               dtype: jnp.dtype, rngs: nnx.Rngs):
    self.rate = rate
    self.ln_1, self.ln_2 = LayerNorm(d), LayerNorm(d)
    self.attn = Attention(d, n_heads, n_blocks, dtype, rngs)
    self.mlp = MLP(d, ratio, n_blocks, dtype, rngs)

  def __call__(self, x, key: PRNGKeyArray | None):
    k1, k2 = jax.random.split(key) if key is not None else (None, None)
    x = x + dropout(self.attn(self.ln_1(x)), self.rate, k1)
    return x + dropout(self.mlp(self.ln_2(x)), self.rate, k2)


class GPT2(nnx.Module):
  """Tokens `[B, L]` -> next-token logits `[B, L, V]` (position i predicts token i + 1)."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    m = cfg.model
    normal = lambda std: lambda key, shape, dtype: std * jax.random.normal(key, shape, dtype)
    self.wte = nnx.Param(with_axes(normal(0.02), 'vocab', 'embed')(
        rngs.params(), (m.vocab_size, m.hidden_size), jnp.float32))
    self.wpe = nnx.Param(with_axes(normal(0.01), 'pos', 'embed')(
        rngs.params(), (cfg.data.seq_len, m.hidden_size), jnp.float32))
    self.h = nnx.List([Block(m.hidden_size, m.n_heads, m.mlp_ratio, m.n_blocks, m.dropout,
                             compute_dtype(m), rngs) for _ in range(m.n_blocks)])
    self.ln_f = LayerNorm(m.hidden_size)
    self.rate = m.dropout
    self.cfg = m

  def __call__(self, tokens: Int[Array, 'B L'], dropout_key: PRNGKeyArray | None = None
               ) -> Float[Array, 'B L V']:
    L = tokens.shape[1]
    x = jnp.take(self.wte[...], tokens, axis=0) + self.wpe[...][None, :L]
    if dropout_key is not None:
      x = dropout(x, self.rate, jax.random.fold_in(dropout_key, len(self.h)))
    call = remat_blocks(self.cfg)
    for i, block in enumerate(self.h):
      x = call(block, x, None if dropout_key is None else jax.random.fold_in(dropout_key, i))
    dtype = compute_dtype(self.cfg)  # the tied output matmul: bf16 inputs, float32 logits
    return jnp.matmul(self.ln_f(x).astype(dtype), self.wte[...].astype(dtype).T,
                      preferred_element_type=jnp.float32)


def token_nll(logits: Float[Array, 'B L V'], tokens: Int[Array, 'B L']) -> Float[Array, 'B L-1']:
  """-log p(token_{i+1} | tokens_{<=i}) for every position but the last."""
  log_p = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(log_p, tokens[:, 1:, None], axis=-1)[..., 0]
