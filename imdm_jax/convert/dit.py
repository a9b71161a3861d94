"""The PyTorch DiT's state dict -> our parameter tree: the 1:1 key map and the checked port.

`blocks.3.attn_qkv.weight [3d, d]` <-> `params['blocks'][3]['attn_qkv']['kernel'] [d, 3d]`:
PyTorch Linear weights are `[out, in]` and ours `[in, out]`, so 2-D Linear weights are transposed;
`nn.Sequential` indices name our layers (`mlp.0` -> `mlp_in`, `mlp.2` -> `mlp_out`). Keys are
given without the `backbone.` prefix; `sources.py` normalises prefixes before calling this.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import numpy as np

from imdm_jax import init_from, model, train_state
from imdm_jax.config import Config
from imdm_jax.errors import UserError

INV_FREQ = 'rotary_emb.inv_freq'
NOISE_MLP = 'vocab_embed.imdm_mlp.0.weight'  # [4d, D]: continuous mask noise eps
MASK_STATES = 'vocab_embed.imdm_mlp.weight'  # [K, d]: the finite-mask table
LEARNABLE = 'vocab_embed.learnable_noise_mu'

_SEQUENTIAL = {'0': 'mlp_in', '2': 'mlp_out'}
BUFFERS = (INV_FREQ,)  # recomputed, never loaded
# Tensors whose names do not follow the pattern: torch key -> (our path, torch shape -> ours).
_SPECIAL = {
    'vocab_embed.imdm_mlp.weight': (('vocab_embed', 'imdm_states', 'embedding'), lambda x: x),
    'vocab_embed.learnable_noise_mu': (('vocab_embed', 'imdm_mlp', 'noise_mu'),
                                       lambda x: x.reshape(-1)),
    'vocab_embed.learnable_noise_sigma': (('vocab_embed', 'imdm_mlp', 'noise_sigma'),
                                          lambda x: x.reshape(-1)),
}


def torch_key_to_path(key: str) -> tuple[tuple[Any, ...], bool]:
  """(path in our tree, whether the tensor is transposed) of a PyTorch key."""
  if key in _SPECIAL:
    return _SPECIAL[key][0], False
  parts = key.split('.')
  path: list[Any] = []
  i = 0
  while i < len(parts):
    p = parts[i]
    if p in ('mlp', 'imdm_mlp') and i + 1 < len(parts) and parts[i + 1] in _SEQUENTIAL:
      if p == 'imdm_mlp':
        path.append('imdm_mlp')
      path.append(_SEQUENTIAL[parts[i + 1]])
      i += 2
      continue
    path.append(int(p) if p.isdigit() else p)
    i += 1
  transposed = path[-1] == 'weight' and path[-2] not in ('norm1', 'norm2', 'norm_final')
  if transposed:
    path[-1] = 'kernel'
  return tuple(path), transposed


def path_to_torch_key(path: tuple[Any, ...]) -> str:
  """The PyTorch key of a path in our tree (`torch_key_to_path`'s inverse)."""
  for key, (special, _) in _SPECIAL.items():
    if tuple(path) == special:
      return key
  out, parents = [], list(path)
  for j, p in enumerate(parents):
    if p in ('mlp_in', 'mlp_out'):
      seq = '0' if p == 'mlp_in' else '2'
      out.extend([] if parents[j - 1] == 'imdm_mlp' else ['mlp'])
      out.append(seq)
    elif p == 'kernel':
      out.append('weight')
    else:
      out.append(str(p))
  return '.'.join(out)


def params_from_torch(state: Mapping[str, np.ndarray], template) -> dict:
  """Builds our parameter tree from a PyTorch state dict, checking every key and shape against
  `template` (a tree of arrays or ShapeDtypeStructs). Unused or missing keys are errors."""
  params: dict = {}
  expected = {path: leaf for path, leaf in flatten_paths(template)}
  unexpected = [k for k in state if k not in BUFFERS and torch_key_to_path(k)[0] not in expected]
  if unexpected:  # all of them: a whole foreign module (a teacher, a wrapper) is then obvious
    shown = ', '.join(map(repr, unexpected[:4]))
    more = f' and {len(unexpected) - 4} more' if len(unexpected) > 4 else ''
    raise UserError(f'unexpected key{"s" if len(unexpected) > 1 else ""} {shown}{more} '
                    '(no such parameter in this model)')
  for key, value in state.items():
    if key in BUFFERS:
      continue
    path, transposed = torch_key_to_path(key)
    value = np.asarray(value, np.float32)
    value = value.T if transposed else _SPECIAL.get(key, (None, lambda x: x))[1](value)
    if tuple(value.shape) != tuple(expected[path].shape):
      raise UserError(f'{key}: expected shape {tuple(expected[path].shape)}'
                      f'{" (transposed)" if transposed else ""}, got {tuple(value.shape)}')
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  missing = [path_to_torch_key(p) for p in expected if not _has(params, p)]
  if missing:
    raise UserError(f'missing key {missing[0]!r} ({len(missing)} missing)')
  return params


def convert_params(state: dict[str, np.ndarray], cfg: Config,
                   key: jax.Array) -> tuple[train_state.Params, bool]:
  """Our parameter tree (host arrays) and whether a fresh IMDM noise path was added to MDLM weights.

  Every source tensor must be used and every parameter filled, except when the config adds the
  IMDM noise path to weights without one: that path is initialised as a new model's is (second
  layer zero, so the result computes exactly the source MDLM)."""
  extends = bool(cfg.model.noise_dim or cfg.diffusion.num_mask_states) and not (
      NOISE_MLP in state or MASK_STATES in state)
  plain = dataclasses.replace(
      cfg, model=dataclasses.replace(cfg.model, noise_dim=0),
      diffusion=dataclasses.replace(cfg.diffusion, num_mask_states=0)) if extends else cfg
  params = params_from_torch(state, jax.eval_shape(init_params(plain), key))
  _verify_rotary(state, cfg)  # after the shapes: a wrong --set hidden_size is named as such
  if extends:
    params = init_from.graft(init_params(cfg)(key), params, 'convert')
  return params, extends


def init_params(cfg: Config):
  """`key -> a new model's parameters`: the template `params_from_torch` checks against."""
  return lambda key: train_state.init_params(cfg, key)


def _verify_rotary(state: dict[str, np.ndarray], cfg: Config) -> None:
  if INV_FREQ not in state:
    return
  head_dim = cfg.model.hidden_size // cfg.model.n_heads
  saved = np.asarray(state[INV_FREQ], np.float32)
  expected = np.asarray(model.rotary_inv_freq(head_dim))
  # rtol covers a bf16-saved buffer; another base or head size is off by far more.
  if saved.shape != expected.shape or not np.allclose(saved, expected, rtol=1e-2, atol=0):
    raise UserError(f'{INV_FREQ} {saved.shape} is not 1 / 10000^(2i / {head_dim}) for '
                    f'{cfg.model.n_heads} heads of size {head_dim}: another rotary embedding, or '
                    'a wrong model.n_heads')


def flatten_paths(tree, prefix=()):
  """(path tuple, leaf) of every leaf of a nested mapping."""
  if isinstance(tree, Mapping):
    for k, v in tree.items():
      yield from flatten_paths(v, prefix + (k,))
  else:
    yield prefix, tree


def _has(tree, path) -> bool:
  for p in path:
    if not isinstance(tree, Mapping) or p not in tree:
      return False
    tree = tree[p]
  return True
