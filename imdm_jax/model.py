"""The MDLM denoiser: a diffusion transformer ("DiT") with adaLN, rotary attention and SUBS output.

Written from `docs/conversion.md`; attribute names mirror the PyTorch state-dict keys
(`blocks.{i}.attn_qkv`, `adaLN_modulation`, ...) so that `convert` maps each tensor 1:1 (PyTorch
Linear weights are `[out, in]`, ours `[in, out]`). With `model.noise_dim > 0` the input embedding
adds the IMDM mask-noise MLP `1[z = mask] * MLP(eps)` (docs/method.md §2), with
`diffusion.num_mask_states = K > 0` the finite-mask ablation's table; otherwise the network is
exactly MDLM. One class serves all three.

Randomness is explicit: dropout takes a key at call time, so the module can be `nnx.merge`d
inside a plain `jax.jit` + `jax.grad` (dropout keys are arguments, not module state).

Mixed precision (`model.dtype='bfloat16'`): parameters stay float32 and every Linear casts its
input and kernel to bfloat16, so matmuls and their outputs (q, k, v, the MLP) are bf16. As under
the reference's torch autocast, the residual stream (embeddings plus block outputs) stays float32
by type promotion, LayerNorm and the attention softmax compute in float32, and the output layer
accumulates and returns float32 logits; the loss is float32. `model.remat` recomputes each
block's activations in the backward pass instead of keeping them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int, PRNGKeyArray

from imdm_jax.config import Config, ModelConfig

LN_EPS = 1e-5
ROPE_BASE = 10_000.0
FREQ_DIM = 256  # sinusoidal features of sigma


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
  """The dtype matmuls run in; parameters are float32 whatever it is (master weights)."""
  return jnp.dtype(cfg.dtype)


def with_axes(init: nnx.initializers.Initializer, *axes: str) -> nnx.initializers.Initializer:
  """`init`, declaring the logical axes of the parameter it makes: one name per dimension
  (`'embed'`, `'mlp'`, ...), kept as the parameter's `out_sharding` metadata. `sharding.py` reads
  them and maps them to the mesh (`sharding.RULES`); a parameter that declares none (biases, norm
  scales) is replicated. The names are logical, not mesh axes, so Flax must not shard the value
  at creation (`eager_sharding=False`); the metadata changes nothing in the values."""
  return nnx.with_partitioning(init, axes, eager_sharding=False)


def _torch_linear(rngs: nnx.Rngs, d_in: int, d_out: int, dtype: jnp.dtype, axes: tuple[str, str],
                  bias: bool = True, zero: bool = False,
                  out_dtype: jax.typing.DTypeLike | None = None) -> nnx.Linear:
  """nn.Linear with PyTorch's default init (uniform, bound 1/sqrt(fan_in)), or all zeros,
  computing in `dtype` (float32 parameters cast at use) and returning `out_dtype` if given; the
  kernel `[d_in, d_out]` declares the logical `axes`."""
  bound = 1.0 / math.sqrt(d_in)
  uniform = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
  init = nnx.initializers.zeros if zero else uniform
  return nnx.Linear(d_in, d_out, use_bias=bias, kernel_init=with_axes(init, *axes),
                    bias_init=init, dtype=dtype, preferred_element_type=out_dtype, rngs=rngs)


class LayerNorm(nnx.Module):
  """Weight-only LayerNorm in float32 (the reference has no bias, eps 1e-5)."""

  def __init__(self, dim: int):
    self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))

  def __call__(self, x: Float[Array, '... d']) -> Float[Array, '... d']:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + LN_EPS) * self.weight[...]).astype(x.dtype)


def modulate(x: Float[Array, 'B L d'], shift: Float[Array, '#B 1 d'],
             scale: Float[Array, '#B 1 d']) -> Float[Array, 'B L d']:
  return x * (1.0 + scale) + shift


def dropout(x: Array, rate: float, key: PRNGKeyArray | None) -> Array:
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


def timestep_features(sigma: Float[Array, 'B']) -> Float[Array, 'B 256']:
  """Sinusoidal features, cosine half first, frequencies exp(-ln(10000) k / 128)."""
  half = FREQ_DIM // 2
  freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  args = sigma[:, None].astype(jnp.float32) * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def rotary_inv_freq(head_dim: int) -> Float[Array, '{head_dim}//2']:
  return 1.0 / (ROPE_BASE ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rotary(x: Float[Array, 'B L H Dh'], positions: Int[Array, 'L']) -> Float[Array, 'B L H Dh']:
  """Rotate-half (non-interleaved) rotary embedding over the full head dimension."""
  freqs = positions[:, None].astype(jnp.float32) * rotary_inv_freq(x.shape[-1])[None]  # [L, Dh/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[None, :, None, :]  # [1, L, 1, Dh]
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * jnp.cos(emb) + rotated * jnp.sin(emb)).astype(x.dtype)


def attention(q: Float[Array, 'B L H Dh'], k: Float[Array, 'B L H Dh'],
              v: Float[Array, 'B L H Dh'], softcap: float) -> Float[Array, 'B L H Dh']:
  """Full bidirectional softmax attention, no mask (padding is attended to, as in the reference),
  with the optional logit soft-cap `softcap * tanh(logits / softcap)`."""
  q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # head-major: plain batched matmuls
  return jnp.swapaxes(_attention(q, k, v, softcap), 1, 2)


def _attention_fwd(q, k, v, softcap):  # [B, H, L, Dh] each, float32 or bfloat16
  # logits, soft-cap and softmax in float32 whatever the inputs; the saved probabilities (and
  # tanh) are kept in the input dtype: they are the largest residuals, [B, H, L, L]
  logits = jnp.einsum('bhld,bhmd->bhlm', q, k,
                      preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
  capped = jnp.tanh(logits / softcap) if softcap > 0 else None
  if capped is not None:
    logits = softcap * capped
    capped = capped.astype(v.dtype)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('bhlm,bhmd->bhld', probs, v), (q, k, v, probs, capped)


def _attention_bwd(softcap, residuals, d_out):
  """The textbook softmax-attention gradient. Written out because XLA:CPU runs the autodiff
  version of the same math 2x slower (it re-lays out the softmax backward); see bench/. The
  softmax backward runs in float32; the matmuls in the input dtype, which the gradients keep."""
  q, k, v, probs, capped = residuals
  f32 = jnp.float32
  d_v = jnp.einsum('bhlm,bhld->bhmd', probs, d_out)
  d_probs = jnp.einsum('bhld,bhmd->bhlm', d_out, v, preferred_element_type=f32)
  p = probs.astype(f32)
  d_logits = p * (d_probs - jnp.sum(d_probs * p, axis=-1, keepdims=True))
  if capped is not None:
    d_logits = d_logits * (1.0 - jnp.square(capped.astype(f32)))
  d_logits = (d_logits / math.sqrt(q.shape[-1])).astype(q.dtype)
  d_q = jnp.einsum('bhlm,bhmd->bhld', d_logits, k)
  d_k = jnp.einsum('bhlm,bhld->bhmd', d_logits, q)
  return d_q, d_k, d_v


_attention = jax.custom_vjp(lambda q, k, v, softcap: _attention_fwd(q, k, v, softcap)[0],
                            nondiff_argnums=(3,))
_attention.defvjp(_attention_fwd, _attention_bwd)


class SigmaMap(nnx.Module):
  """`c = SiLU(MLP(freq(sigma)))` with `MLP = Linear(256 -> C) -> SiLU -> Linear(C -> C)`."""

  def __init__(self, cond_dim: int, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.mlp_in = _torch_linear(rngs, FREQ_DIM, cond_dim, dtype, ('freq', 'cond'))
    self.mlp_out = _torch_linear(rngs, cond_dim, cond_dim, dtype, ('cond', 'cond'))

  def __call__(self, sigma: Float[Array, 'B']) -> Float[Array, 'B C']:
    return jax.nn.silu(self.mlp_out(jax.nn.silu(self.mlp_in(timestep_features(sigma)))))


class MaskNoiseEmbedding(nnx.Module):
  """IMDM's `MLP(eps)`: Linear(D -> 4d, bias) -> exact GELU -> Linear(4d -> d, no bias).

  The second layer starts at zero so that a fresh IMDM computes exactly the MDLM it extends.
  With learnable noise the network sees `mu + sigma * eps` (eps standard normal, mu = 0 and
  sigma = 1 at init), so the noise distribution itself is trained.
  """

  def __init__(self, noise_dim: int, hidden_size: int, learnable: bool, dtype: jnp.dtype,
               rngs: nnx.Rngs):
    init = nnx.initializers.truncated_normal(stddev=0.02, lower=-2.0, upper=2.0)
    self.mlp_in = nnx.Linear(noise_dim, 4 * hidden_size,
                             kernel_init=with_axes(init, 'noise', 'mlp'),
                             bias_init=nnx.initializers.zeros, dtype=dtype, rngs=rngs)
    self.mlp_out = nnx.Linear(4 * hidden_size, hidden_size, use_bias=False,
                              kernel_init=with_axes(nnx.initializers.zeros, 'mlp', 'embed'),
                              dtype=dtype, rngs=rngs)
    self.noise_mu = nnx.Param(jnp.zeros((noise_dim,))) if learnable else None
    self.noise_sigma = nnx.Param(jnp.ones((noise_dim,))) if learnable else None

  def __call__(self, eps: Float[Array, 'B L D']) -> Float[Array, 'B L d']:
    if self.noise_mu is not None:
      eps = self.noise_mu[...] + self.noise_sigma[...] * eps
    return self.mlp_out(jax.nn.gelu(self.mlp_in(eps), approximate=False))


class MaskStateEmbedding(nnx.Module):
  """The finite-mask ablation: K mask states embedded by a zero-initialised `[K, d]` table.

  With K = 1 there is one mask state, which MDLM's mask embedding already represents: the row is
  held at zero (no gradient), so K = 1 is exactly MDLM, as in the reference.
  """

  def __init__(self, num_states: int, hidden_size: int):
    self.embedding = nnx.Param(jnp.zeros((num_states, hidden_size)))

  def __call__(self, state: Int[Array, 'B L']) -> Float[Array, 'B L d']:
    table = self.embedding[...]
    if table.shape[0] == 1:
      table = jax.lax.stop_gradient(table)
    return jnp.take(table, state, axis=0)


# The IMDM mask-noise path: the parameters an IMDM adds to an MDLM (absent from an MDLM; zero
# output at init, so an IMDM made from an MDLM's weights computes that MDLM).
NOISE_PATH_PREFIXES = ('vocab_embed/imdm_mlp/', 'vocab_embed/imdm_states/')


def noise_output(params) -> Float[Array, '... d']:
  """The layer that turns eps into the mask embedding: the noise MLP's last kernel `[4d, d]`, or
  the finite-state table `[K, d]`. It starts at 0; its growth shows the network using eps."""
  embed = params['vocab_embed']
  if 'imdm_mlp' in embed:
    return embed['imdm_mlp']['mlp_out']['kernel']
  return embed['imdm_states']['embedding']


class VocabEmbedding(nnx.Module):
  """`E[z] + 1[z = mask] * noise_embedding(eps)` (docs/method.md §2); just `E[z]` for MDLM."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    m = cfg.model
    bound = 1.0 / math.sqrt(m.hidden_size)  # torch's kaiming_uniform(a=sqrt(5)) on [V, d]
    uniform = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
    self.embedding = nnx.Param(with_axes(uniform, 'vocab', 'embed')(
        rngs.params(), (m.vocab_size, m.hidden_size), jnp.float32))
    k = cfg.diffusion.num_mask_states
    self.imdm_mlp = (MaskNoiseEmbedding(m.noise_dim, m.hidden_size,
                                        cfg.diffusion.noise_type == 'learnable',
                                        compute_dtype(m), rngs)
                     if m.noise_dim and not k else None)
    self.imdm_states = MaskStateEmbedding(k, m.hidden_size) if k else None

  def __call__(self, z: Int[Array, 'B L'], mask_id: int | None,
               eps: Float[Array, 'B L D'] | Int[Array, 'B L'] | None) -> Float[Array, 'B L d']:
    h = jnp.take(self.embedding[...], z, axis=0)
    noise = self.imdm_mlp or self.imdm_states
    if noise is not None:
      if eps is None or mask_id is None:
        raise ValueError('an IMDM denoiser needs the mask noise eps ([B, L, D], or [B, L] states) '
                         'and mask_id')
      h = h + jnp.where((z == mask_id)[..., None], noise(eps), 0.0)
    return h


class DDiTBlock(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, dtype = cfg.hidden_size, compute_dtype(cfg)
    self.n_heads, self.dropout, self.softcap = cfg.n_heads, cfg.dropout, cfg.attn_softcap
    self.norm1 = LayerNorm(d)
    self.attn_qkv = _torch_linear(rngs, d, 3 * d, dtype, ('embed', 'qkv'), bias=False)
    self.attn_out = _torch_linear(rngs, d, d, dtype, ('qkv', 'embed'), bias=False)
    self.norm2 = LayerNorm(d)
    self.mlp_in = _torch_linear(rngs, d, cfg.mlp_ratio * d, dtype, ('embed', 'mlp'))
    self.mlp_out = _torch_linear(rngs, cfg.mlp_ratio * d, d, dtype, ('mlp', 'embed'))
    self.adaLN_modulation = _torch_linear(rngs, cfg.cond_dim, 6 * d, dtype, ('cond', 'modulation'),
                                          zero=True)

  def __call__(self, x: Float[Array, 'B L d'], c: Float[Array, '#B C'],
               dropout_key: PRNGKeyArray | None) -> Float[Array, 'B L d']:
    """`x` is the float32 residual stream; the branches it adds are in the compute dtype."""
    B, L, d = x.shape
    k_attn, k_mlp = jax.random.split(dropout_key) if dropout_key is not None else (None, None)
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(
        self.adaLN_modulation(c)[:, None, :], 6, axis=-1)  # 6 x [B, 1, d]

    h = modulate(self.norm1(x), shift1, scale1)
    qkv = self.attn_qkv(h).reshape(B, L, 3, self.n_heads, d // self.n_heads)  # (3, H, Dh) layout
    positions = jnp.arange(L)
    q, k = apply_rotary(qkv[:, :, 0], positions), apply_rotary(qkv[:, :, 1], positions)
    attn = attention(q, k, qkv[:, :, 2], self.softcap).reshape(B, L, d)  # heads-outer (H, Dh)
    x = x + gate1 * dropout(self.attn_out(attn), self.dropout, k_attn)

    h = modulate(self.norm2(x), shift2, scale2)
    h = self.mlp_out(jax.nn.gelu(self.mlp_in(h), approximate=True))
    return x + gate2 * dropout(h, self.dropout, k_mlp)


class FinalLayer(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    dtype = compute_dtype(cfg)
    self.norm_final = LayerNorm(cfg.hidden_size)
    # float32 logits from a bf16 matmul: accumulated and returned in float32
    self.linear = _torch_linear(rngs, cfg.hidden_size, cfg.vocab_size, dtype, ('embed', 'vocab'),
                                zero=True, out_dtype=jnp.float32)
    self.adaLN_modulation = _torch_linear(rngs, cfg.cond_dim, 2 * cfg.hidden_size, dtype,
                                          ('cond', 'modulation'), zero=True)

  def __call__(self, x: Float[Array, 'B L d'], c: Float[Array, '#B C']) -> Float[Array, 'B L V']:
    shift, scale = jnp.split(self.adaLN_modulation(c)[:, None, :], 2, axis=-1)
    return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nnx.Module):
  """The denoiser network: tokens (and mask noise) in, raw logits `[B, L, V]` out."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    self.cfg = cfg.model
    self.vocab_embed = VocabEmbedding(cfg, rngs)
    self.sigma_map = SigmaMap(cfg.model.cond_dim, compute_dtype(cfg.model), rngs)
    self.blocks = nnx.List([DDiTBlock(cfg.model, rngs) for _ in range(cfg.model.n_blocks)])
    self.output_layer = FinalLayer(cfg.model, rngs)

  def __call__(self, z_t: Int[Array, 'B L'], sigma: Float[Array, 'B'] | None = None,
               eps: Float[Array, 'B L D'] | Int[Array, 'B L'] | None = None, *,
               mask_id: int | None = None,
               dropout_key: PRNGKeyArray | None = None) -> Float[Array, 'B L V']:
    """`sigma` is only read when `time_conditioning`; otherwise the model sees sigma = 0, like the
    released checkpoints, and `c` is one constant vector shared by the batch. `mask_id` (which
    positions of `z_t` carry `eps`) is needed only by an IMDM: it belongs to the tokenizer, not to
    the weights, so it is an argument rather than module state."""
    x = self.vocab_embed(z_t, mask_id, eps)
    if self.cfg.time_conditioning:
      if sigma is None:
        raise ValueError('a time-conditioned denoiser needs sigma [B]')
      c = self.sigma_map(sigma)
    else:
      c = self.sigma_map(jnp.zeros((1,), jnp.float32))  # [1, C], broadcast over the batch
    call = remat_blocks(self.cfg)
    for i, block in enumerate(self.blocks):
      key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
      x = call(block, x, c, key)
    return self.output_layer(x, c)


def remat_blocks(cfg: ModelConfig):
  """`call(block, *args)`: the block's forward, rematerialised when `cfg.remat`. The backward
  pass then keeps only each block's input and recomputes the rest, one block at a time."""
  call = lambda block, *args: block(*args)
  return nnx.remat(call) if cfg.remat else call
