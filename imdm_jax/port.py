"""The 1:1 map between PyTorch DiT state-dict keys and our parameter tree.

`blocks.3.attn_qkv.weight [3d, d]` <-> `params['blocks'][3]['attn_qkv']['kernel'] [d, 3d]`:
PyTorch Linear weights are `[out, in]` and ours `[in, out]`, so 2-D Linear weights are transposed;
`nn.Sequential` indices name our layers (`mlp.0` -> `mlp_in`, `mlp.2` -> `mlp_out`). Keys are
given without the `backbone.` prefix; the converter normalises prefixes before calling this.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from imdm_jax.errors import UserError

_SEQUENTIAL = {'0': 'mlp_in', '2': 'mlp_out'}
BUFFERS = ('rotary_emb.inv_freq',)  # recomputed, never loaded
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
  expected = {path: leaf for path, leaf in _flatten(template)}
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


def params_to_torch(params) -> dict[str, np.ndarray]:
  """The inverse map: a PyTorch state dict (numpy arrays) of our parameters."""
  out = {}
  for path, leaf in _flatten(params):
    value = np.asarray(leaf)
    key = path_to_torch_key(path)
    if key.startswith('vocab_embed.learnable_noise'):
      value = value.reshape(1, 1, -1)
    out[key] = value.T if path[-1] == 'kernel' else value
  return out


def _flatten(tree, prefix=()):
  if isinstance(tree, Mapping):
    for k, v in tree.items():
      yield from _flatten(v, prefix + (k,))
  else:
    yield prefix, tree


def _has(tree, path) -> bool:
  for p in path:
    if not isinstance(tree, Mapping) or p not in tree:
      return False
    tree = tree[p]
  return True
