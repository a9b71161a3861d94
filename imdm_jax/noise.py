"""IMDM mask noise eps: the continuous part of the infinite mask state (docs/method.md §2).

eps is explicit state, drawn by pure functions: `[B, L, D]` floats, or `[B, L]` integer states in
the finite-mask ablation. `seeded_eps` derives each sequence's eps from an integer seed alone
(a counter-based draw), so ReDi can store a seed instead of eps and regenerate it exactly,
whatever the batch the sequence lands in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from imdm_jax.config import Config

_SEED_NAMESPACE = 0x1D3D  # the root key of seeded eps; fixed so seeds mean the same everywhere


def is_imdm(cfg: Config) -> bool:
  return cfg.model.noise_dim > 0 or cfg.diffusion.num_mask_states > 0


def draw_eps(key: PRNGKeyArray, shape: tuple[int, ...],
             cfg: Config) -> Float[Array, '*shape D'] | Int[Array, '*shape']:
  """Fresh eps for every position of `shape` (e.g. (B, L)), independently."""
  d = cfg.diffusion
  if d.num_mask_states:
    return jax.random.randint(key, shape, 0, d.num_mask_states, dtype=jnp.int32)
  full = (*shape, cfg.model.noise_dim)
  # float32 explicitly: samplers trace under jax.enable_x64 for their float64 draws
  if d.noise_type == 'uniform':
    return d.noise_scale * jax.random.uniform(key, full, jnp.float32, minval=-1.0, maxval=1.0)
  return d.noise_scale * jax.random.normal(key, full, jnp.float32)  # 'learnable': affine in-model


def seeded_eps(seeds: Int[Array, 'B'], seq_len: int,
               cfg: Config) -> Float[Array, 'B L D'] | Int[Array, 'B L']:
  """eps of each sequence as a function of its seed only."""
  root = jax.random.PRNGKey(_SEED_NAMESPACE)
  return jax.vmap(lambda s: draw_eps(jax.random.fold_in(root, s), (seq_len,), cfg))(seeds)


def resample(key: PRNGKeyArray, eps, reset: jax.Array, cfg: Config):
  """Re-draws eps where `reset` [B, L] is true (a mask state jumping to a fresh mask state)."""
  fresh = draw_eps(key, reset.shape, cfg)
  return jnp.where(reset[..., None] if fresh.ndim == 3 else reset, fresh, eps)
