"""Reading PyTorch MDLM-family checkpoints into one flat state dict: the converter's input side.

Layouts (docs/conversion.md): a Hugging Face `model.safetensors` (or shards listed in
`model.safetensors.index.json`), a `pytorch_model.bin`, a directory holding one of them plus an
optional `config.json`, or a Lightning `.ckpt` whose EMA weights are a positional list. Keys come
out as the backbone's own names (`blocks.0.attn_qkv.weight`): the wrappers' `backbone.` (twice in
some SDTT revisions) and `torch.compile`'s `_orig_mod.` are removed. Values stay in PyTorch layout
(`[out, in]` Linear weights); `dit.py` maps them onto our tree.

safetensors files are read with the numpy API (no torch needed); `.bin` files are unpickled with
`weights_only=True`; `.ckpt` files need full unpickling, which runs code from the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy: bf16 safetensors then load)
import numpy as np

from imdm_jax.convert.dit import BUFFERS
from imdm_jax.errors import UserError

WEIGHT_FILES = ('model.safetensors', 'model.safetensors.index.json', 'pytorch_model.bin')
_WRAPPER = 'backbone.'
_COMPILED = '_orig_mod.'


@dataclasses.dataclass
class Source:
  state: dict[str, np.ndarray]  # backbone key -> tensor in PyTorch layout (buffers included)
  stated: dict[str, Any]  # the directory's config.json ({} when there is none)
  weights: str  # which they are: 'EMA weights', 'raw weights' or 'weights as saved'
  # the EMA's update count (a Lightning checkpoint's `ema.num_updates`; 0 where the file has
  # none): a run started from the conversion inherits it, as the official `load_ema` does
  ema_count: int = 0


def read(path: str, raw: bool = False) -> Source:
  """The state dict and stated config at `path`; `raw` picks a `.ckpt`'s raw weights over EMA."""
  path = os.path.abspath(os.path.expanduser(path))
  stated: dict[str, Any] = {}
  if os.path.isdir(path):
    found = [f for f in WEIGHT_FILES if os.path.isfile(os.path.join(path, f))]
    if not found:
      raise UserError(f'{path} holds none of {", ".join(WEIGHT_FILES)}')
    config_json = os.path.join(path, 'config.json')
    if os.path.isfile(config_json):
      with open(config_json) as f:
        stated = json.load(f)
    path = os.path.join(path, found[0])  # safetensors first: no unpickling
  elif not os.path.isfile(path):
    raise UserError(f'{path}: no such file or directory')
  if raw and not path.endswith('.ckpt'):
    raise UserError('--raw applies to Lightning .ckpt files only (they hold raw and EMA weights)')
  if path.endswith('.ckpt'):
    state, weights, ema_count, hyper = _lightning(path, raw)
    return Source(normalise(state), {**hyper, **stated}, weights, ema_count)
  if path.endswith('.safetensors'):
    state = _safetensors([path])
  elif path.endswith('.safetensors.index.json'):
    with open(path) as f:
      shards = sorted(set(json.load(f)['weight_map'].values()))
    state = _safetensors([os.path.join(os.path.dirname(path), s) for s in shards])
  elif path.endswith(('.bin', '.pt', '.pth')):
    state = _torch_load(path, weights_only=True)
  else:
    raise UserError(f'{path}: expected a .safetensors, .bin, .pt/.pth or Lightning .ckpt file, or '
                    'a directory holding one')
  return Source(normalise(state), stated, 'weights as saved')


def normalise(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Backbone names for every key, refusing two keys that name the same tensor."""
  out: dict[str, np.ndarray] = {}
  for key, value in state.items():
    name = backbone_name(key)
    if name in out:
      raise UserError(f'two tensors are named {name!r} once wrappers are removed (one is {key!r})')
    out[name] = _numpy(key, value)
  return out


def backbone_name(key: str) -> str:
  """`backbone.backbone._orig_mod.blocks.0.norm1.weight` -> `blocks.0.norm1.weight`."""
  name = key.replace(_COMPILED, '')
  while name.startswith(_WRAPPER):
    name = name[len(_WRAPPER):]
  return name


def _safetensors(files: list[str]) -> dict[str, np.ndarray]:
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  state: dict[str, np.ndarray] = {}
  for file in files:
    if not os.path.isfile(file):
      raise UserError(f'{file}: shard listed in the index is missing')
    state.update(safetensors.numpy.load_file(file))
  return state


def _torch_load(path: str, weights_only: bool):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError(f'reading {os.path.basename(path)} needs PyTorch (pip install torch); '
                    'safetensors files do not') from None
  try:
    return torch.load(path, map_location='cpu', weights_only=weights_only)
  except ModuleNotFoundError as e:  # a Lightning pickle refers to its training code's packages
    raise UserError(f'{path}: unpickling needs the package {e.name!r} (pip install it)') from None


def hyper_parameters(ckpt: Mapping) -> dict[str, Any]:
  """The settings a Lightning checkpoint's saved run config states, under `config.json` names:
  its `model` section (`softcap`, `length`, sizes), the `algo` section (`noise_type`,
  `noise_dim`, ...) and `time_conditioning` wherever it sits. The tensors cannot tell these (the
  soft-cap above all), and converting without them computes another function."""
  config = (ckpt.get('hyper_parameters') or {}).get('config') if isinstance(
      ckpt.get('hyper_parameters'), Mapping) else None
  if not hasattr(config, 'items'):  # an omegaconf DictConfig or a dict; anything else says nothing
    return {}
  out = {}
  for section in (config, config.get('algo'), config.get('model')):  # the model's say wins
    if hasattr(section, 'items'):
      for key, value in section.items():
        if isinstance(value, (bool, int, float, str)):
          out['model_length' if key == 'length' else key] = value
  if out.pop('as_mdlm', False):  # an MDLM trained by the IMDM code: its noise settings are unused
    out.pop('noise_dim', None)
    out.pop('noise_type', None)
  return out


def _lightning(path: str, raw: bool) -> tuple[dict[str, Any], str, int, dict[str, Any]]:
  """`state_dict` (raw) or the EMA `shadow_params` zipped with the state dict's parameter keys in
  order; buffers (not in the EMA list) come from the state dict so that they can be verified.
  Also the EMA's update count and the saved hyper-parameters."""
  ckpt = _torch_load(path, weights_only=False)
  if not isinstance(ckpt, Mapping) or 'state_dict' not in ckpt:
    raise UserError(f'{path} is not a Lightning checkpoint (no "state_dict")')
  state = ckpt['state_dict']
  ema = ckpt.get('ema')
  count = int(ema.get('num_updates', 0)) if isinstance(ema, Mapping) else 0
  hyper = hyper_parameters(ckpt)
  if raw:
    return dict(state), 'raw weights', count, hyper
  if not isinstance(ema, Mapping) or 'shadow_params' not in ema:
    raise UserError(f'{path} holds no EMA weights (ckpt["ema"]["shadow_params"]); pass --raw to '
                    'convert its raw weights')
  names = [k for k in state if backbone_name(k) not in BUFFERS]
  shadow = list(ema['shadow_params'])
  if len(shadow) != len(names):
    raise UserError(f'{path}: the EMA list holds {len(shadow)} tensors, the state dict '
                    f'{len(names)} parameters')
  for i, (name, value) in enumerate(zip(names, shadow)):
    if tuple(value.shape) != tuple(state[name].shape):
      raise UserError(f'{path}: EMA tensor {i} has shape {tuple(value.shape)}, its parameter '
                      f'{name} {tuple(state[name].shape)}')
  buffers = {k: v for k, v in state.items() if k not in names}
  return {**buffers, **dict(zip(names, shadow))}, 'EMA weights', count, hyper


def _numpy(key: str, value) -> np.ndarray:
  if isinstance(value, np.ndarray):
    return value
  if hasattr(value, 'detach'):  # a torch tensor; bf16 has no numpy twin, so go through float32
    value = value.detach().cpu()
    return (value.float() if value.is_floating_point() else value).numpy()
  raise UserError(f'{key}: expected a tensor, got {type(value).__name__} (a Lightning checkpoint '
                  'must be named .ckpt)')
