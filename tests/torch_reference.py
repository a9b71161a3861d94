"""A PyTorch implementation of the reference DiT, written from `docs/conversion.md`.

It exists to check ours: parity tests copy weights between the two and compare outputs
(`torch_weights.params_to_torch` gives ours as its state dict), the converter's tests save it in
the PyTorch checkpoint layouts, and `bench/train_step.py` times it as the baseline. Its state-dict
keys are the reference's (`vocab_embed.embedding`, `blocks.{i}.attn_qkv.weight`,
`sigma_map.mlp.0.weight`, ...). Needs `torch` (requirements-dev.txt); the library never imports it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from imdm_jax.config import Config


class LayerNorm(nn.Module):

  def __init__(self, dim: int):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(dim))

  def forward(self, x):
    return F.layer_norm(x.float(), [x.shape[-1]], eps=1e-5) * self.weight[None, None, :]


class TimestepEmbedder(nn.Module):

  def __init__(self, cond_dim: int, freq_dim: int = 256):
    super().__init__()
    self.freq_dim = freq_dim
    self.mlp = nn.Sequential(nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

  def forward(self, sigma):  # [B] -> [B, C]
    half = self.freq_dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = sigma[:, None].float() * freqs[None]
    return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class Rotary(nn.Module):

  def __init__(self, head_dim: int):
    super().__init__()
    self.register_buffer('inv_freq', 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)))

  def forward(self, seq_len: int):  # cos, sin: [L, Dh]
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), self.inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def _rotate(x, cos, sin):  # x [B, L, H, Dh]; rotate-half layout
  x1, x2 = x.chunk(2, dim=-1)
  return x * cos[None, :, None] + torch.cat([-x2, x1], dim=-1) * sin[None, :, None]


class EmbeddingLayer(nn.Module):
  """Token embedding plus, for IMDM, the mask-noise MLP (`imdm_mlp`, an nn.Sequential), its
  learnable noise (`learnable_noise_mu/sigma`, [1, 1, D]) or the finite-state table (`imdm_mlp`,
  an nn.Embedding) — the reference's names."""

  def __init__(self, dim: int, vocab: int, noise_dim: int = 0, learnable: bool = False,
               num_states: int = 0):
    super().__init__()
    self.embedding = nn.Parameter(torch.empty(vocab, dim))
    nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))
    self.learnable = learnable
    if num_states:
      self.imdm_mlp = nn.Embedding(num_states, dim)
      nn.init.zeros_(self.imdm_mlp.weight)
    elif noise_dim:
      self.imdm_mlp = nn.Sequential(nn.Linear(noise_dim, 4 * dim), nn.GELU(),
                                    nn.Linear(4 * dim, dim, bias=False))
      if learnable:
        self.learnable_noise_mu = nn.Parameter(torch.zeros(1, 1, noise_dim))
        self.learnable_noise_sigma = nn.Parameter(torch.ones(1, 1, noise_dim))

  def forward(self, z, mask_id: int, eps=None):
    h = self.embedding[z]
    if hasattr(self, 'imdm_mlp'):
      if self.learnable:
        eps = self.learnable_noise_mu + self.learnable_noise_sigma * eps
      h = h + (z == mask_id)[..., None].float() * self.imdm_mlp(eps)
    return h


class DDiTBlock(nn.Module):

  def __init__(self, dim: int, n_heads: int, cond_dim: int, mlp_ratio: int, dropout: float,
               softcap: float):
    super().__init__()
    self.n_heads, self.dropout, self.softcap = n_heads, dropout, softcap
    self.norm1 = LayerNorm(dim)
    self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
    self.attn_out = nn.Linear(dim, dim, bias=False)
    self.norm2 = LayerNorm(dim)
    self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate='tanh'),
                             nn.Linear(mlp_ratio * dim, dim))
    self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim)

  def forward(self, x, cos, sin, c):
    B, L, d = x.shape
    shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c)[:, None].chunk(6, dim=2)
    h = self.norm1(x) * (1 + scale1) + shift1
    qkv = self.attn_qkv(h).view(B, L, 3, self.n_heads, d // self.n_heads)
    q, k, v = _rotate(qkv[:, :, 0], cos, sin), _rotate(qkv[:, :, 1], cos, sin), qkv[:, :, 2]
    if self.softcap > 0:
      logits = torch.einsum('blhd,bmhd->bhlm', q, k) / math.sqrt(q.shape[-1])
      logits = self.softcap * torch.tanh(logits / self.softcap)
      attn = torch.einsum('bhlm,bmhd->blhd', logits.softmax(-1), v)
    else:  # the fused kernel the reference uses (flash attention / SDPA)
      attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                            v.transpose(1, 2)).transpose(1, 2)
    x = x + gate1 * F.dropout(self.attn_out(attn.reshape(B, L, d)), self.dropout, self.training)
    h = self.mlp(self.norm2(x) * (1 + scale2) + shift2)
    return x + gate2 * F.dropout(h, self.dropout, self.training)


class DDitFinalLayer(nn.Module):

  def __init__(self, dim: int, vocab: int, cond_dim: int):
    super().__init__()
    self.norm_final = LayerNorm(dim)
    self.linear = nn.Linear(dim, vocab)
    self.adaLN_modulation = nn.Linear(cond_dim, 2 * dim)
    for layer in (self.linear, self.adaLN_modulation):
      nn.init.zeros_(layer.weight)
      nn.init.zeros_(layer.bias)

  def forward(self, x, c):
    shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)
    return self.linear(self.norm_final(x) * (1 + scale) + shift)


class DIT(nn.Module):
  """The backbone; `state_dict()` keys equal the reference's without the `backbone.` prefix."""

  def __init__(self, config: Config, mask_id: int):
    super().__init__()
    cfg = config.model
    d = cfg.hidden_size
    self.cfg, self.mask_id = cfg, mask_id
    self.vocab_embed = EmbeddingLayer(d, cfg.vocab_size, cfg.noise_dim,
                                      config.diffusion.noise_type == 'learnable',
                                      config.diffusion.num_mask_states)
    self.sigma_map = TimestepEmbedder(cfg.cond_dim)
    self.rotary_emb = Rotary(d // cfg.n_heads)
    self.blocks = nn.ModuleList([
        DDiTBlock(d, cfg.n_heads, cfg.cond_dim, cfg.mlp_ratio, cfg.dropout, cfg.attn_softcap)
        for _ in range(cfg.n_blocks)])
    self.output_layer = DDitFinalLayer(d, cfg.vocab_size, cfg.cond_dim)
    for block in self.blocks:
      nn.init.zeros_(block.adaLN_modulation.weight)
      nn.init.zeros_(block.adaLN_modulation.bias)

  def forward(self, z, sigma=None, eps=None):
    x = self.vocab_embed(z, self.mask_id, eps)
    if not self.cfg.time_conditioning:
      sigma = torch.zeros(1)
    c = F.silu(self.sigma_map(sigma))
    cos, sin = self.rotary_emb(z.shape[1])
    for block in self.blocks:
      x = block(x, cos, sin, c)
    return self.output_layer(x, c)
