"""The config of a PyTorch DiT release: read off its tensors, its `config.json`, a preset, `--set`.

The architecture is read off the tensors (docs/conversion.md): V and d from
`vocab_embed.embedding [V, d]`, the depth from the block indices, C from `sigma_map.mlp.0.weight
[C, 256]`, the MLP ratio from `mlp.0.weight [r d, d]`, the head size from the rotary buffer
`inv_freq [Dh/2]` when it was saved, and the IMDM mask noise from `vocab_embed.imdm_mlp`. What the
tensors cannot say (the heads when `inv_freq` is absent, the attention soft-cap, time conditioning,
uniform vs normal eps) comes from the source's `config.json`, else the preset, else `--set`, which
has the last word. A `config.json` that contradicts the tensors is refused.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import numpy as np

from imdm_jax import config as config_lib
from imdm_jax.config import Config
from imdm_jax.convert.dit import INV_FREQ, LEARNABLE, MASK_STATES, NOISE_MLP
from imdm_jax.convert.sources import Source
from imdm_jax.data import pretrained
from imdm_jax.errors import UserError

Field = tuple[str, str]  # (config section, key)

KNOWN_HEADS = {768: 12, 1024: 16, 1536: 16}  # the released sizes (small, medium, SDTT large)
PRESET_OF_TOKENIZER = {'gpt2': 'owt-small', 'bert-base-uncased': 'lm1b-small'}
# config.json keys (Hugging Face MDLM / SDTT configs, IMDM's, ours) -> our field; others ignored.
STATED_KEYS: dict[str, Field] = {
    'vocab_size': ('model', 'vocab_size'), 'hidden_dim': ('model', 'hidden_size'),
    'hidden_size': ('model', 'hidden_size'), 'n_blocks': ('model', 'n_blocks'),
    'n_heads': ('model', 'n_heads'), 'cond_dim': ('model', 'cond_dim'),
    'mlp_ratio': ('model', 'mlp_ratio'), 'dropout': ('model', 'dropout'),
    'softcap': ('model', 'attn_softcap'), 'attn_softcap': ('model', 'attn_softcap'),
    'time_conditioning': ('model', 'time_conditioning'), 'noise_dim': ('model', 'noise_dim'),
    'noise_type': ('diffusion', 'noise_type'), 'num_mask_states': ('diffusion', 'num_mask_states'),
    'model_length': ('data', 'seq_len'),
}


def resolve_config(source: Source, preset: str | None = None,
                   overrides: Sequence[str] = (), tokenizer_path: str = '') -> Config:
  """preset -> config.json -> tensors (config.json must agree with them) -> `--set`."""
  inferred = infer(source.state)
  base = config_lib.resolve(preset or default_preset(inferred))
  stated = _stated(source.stated, base)
  for field in sorted(inferred.keys() & stated.keys()):
    if stated[field] != inferred[field]:
      raise UserError(f'config.json says {".".join(field)}={stated[field]!r}, the tensors '
                      f'{inferred[field]!r}')
  fields = {**stated, **inferred}
  d = inferred[('model', 'hidden_size')]
  # A preset's head count describes its own width only; 0 marks "unknown" until --set.
  fields.setdefault(('model', 'n_heads'),
                    base.model.n_heads if base.model.hidden_size == d else KNOWN_HEADS.get(d, 0))
  if tokenizer_path:
    fields[('data', 'tokenizer_path')] = tokenizer_path
  cfg = config_lib.apply_overrides(_replace(base, fields), list(overrides))
  if not cfg.model.n_heads:
    raise UserError(f'the head count of a d={d} model is neither in the tensors (no {INV_FREQ}) '
                    'nor in a config.json: pass --set model.n_heads=H')
  cfg.validate()
  _check_vocabulary(cfg)
  return cfg


def infer(state: dict[str, np.ndarray]) -> dict[Field, Any]:
  """The config fields the tensors determine. Only a few shapes are read here; every tensor's
  shape is checked against the resulting model in `dit.params_from_torch`."""
  v, d = _tensor(state, 'vocab_embed.embedding', 2).shape  # [V, d]
  fields: dict[Field, Any] = {
      ('model', 'arch'): 'dit',  # every layout read here is the MDLM DiT's
      ('model', 'vocab_size'): v, ('model', 'hidden_size'): d,
      ('model', 'cond_dim'): _tensor(state, 'sigma_map.mlp.0.weight', 2).shape[0]}  # [C, 256]
  blocks = {int(m.group(1)) for m in map(re.compile(r'blocks\.(\d+)\.').match, state) if m}
  fields[('model', 'n_blocks')] = max(blocks) + 1 if blocks else 0
  if blocks:
    hidden = _tensor(state, 'blocks.0.mlp.0.weight', 2).shape[0]  # [r d, d]
    if hidden % d:
      raise UserError(f'blocks.0.mlp.0.weight has {hidden} rows, not a multiple of d={d}')
    fields[('model', 'mlp_ratio')] = hidden // d
  if INV_FREQ in state:
    half = _tensor(state, INV_FREQ, 1).shape[0]  # [Dh/2]
    if d % (2 * half):
      raise UserError(f'{INV_FREQ} has {half} entries: no head size 2x{half} divides d={d}')
    fields[('model', 'n_heads')] = d // (2 * half)
  if NOISE_MLP in state:
    fields[('model', 'noise_dim')] = _tensor(state, NOISE_MLP, 2).shape[1]
    fields[('diffusion', 'num_mask_states')] = 0
    if LEARNABLE in state:
      fields[('diffusion', 'noise_type')] = 'learnable'
  elif MASK_STATES in state:
    fields[('diffusion', 'num_mask_states')] = _tensor(state, MASK_STATES, 2).shape[0]
    fields[('model', 'noise_dim')] = 0
  return fields


def default_preset(inferred: dict[Field, Any]) -> str:
  """The paper's preset for the vocabulary; its `-imdm` variant (e.g. soft-cap 50 on LM1B) for
  IMDM weights."""
  v = inferred[('model', 'vocab_size')]
  names = [t for t, size in pretrained.VOCAB_SIZES.items() if size == v]
  if not names:
    known = ', '.join(f'{t} {size}' for t, size in pretrained.VOCAB_SIZES.items())
    raise UserError(f'vocabulary size V={v} is not one of the known tokenizers ({known}): pass '
                    '--preset with a config for this vocabulary')
  name = PRESET_OF_TOKENIZER[names[0]]
  imdm = inferred.get(('model', 'noise_dim')) or inferred.get(('diffusion', 'num_mask_states'))
  return f'{name}-imdm' if imdm else name


def _check_vocabulary(cfg: Config) -> None:
  v, name = cfg.model.vocab_size, cfg.data.tokenizer
  implied = pretrained.VOCAB_SIZES.get(name)
  if implied is not None and implied != v:
    raise UserError(f'the tensors have V={v}, but data.tokenizer={name} means V={implied}: choose '
                    'a --preset for this vocabulary')
  if cfg.data.tokenizer_path:
    if implied is None:
      raise UserError(f'--tokenizer_path: data.tokenizer={name} is not read from files')
    tokenizer = pretrained.load(name, cfg.data.tokenizer_path)
    if tokenizer.vocab_size != v:
      raise UserError(f'the {name} tokenizer at {cfg.data.tokenizer_path} gives V='
                      f'{tokenizer.vocab_size}, the tensors V={v}')


# Upstream spellings of values (IMDM's `algo.noise_type`; `softcap: -1` for off).
STATED_VALUES: dict[Field, dict[Any, Any]] = {
    ('diffusion', 'noise_type'): {'rand': 'uniform', 'randn': 'normal'}}


def _stated(config_json: dict[str, Any], base: Config) -> dict[Field, Any]:
  fields = {}
  for key, value in config_json.items():
    if key in STATED_KEYS and value is not None:
      section, name = STATED_KEYS[key]
      value = STATED_VALUES.get((section, name), {}).get(value, value)
      if (section, name) == ('model', 'attn_softcap') and isinstance(value, (int, float)) and \
          value <= 0:
        value = 0.0  # upstream's -1 (or 0): no soft-cap
      typ = type(getattr(getattr(base, section), name))
      if typ in (int, float) and type(value) in (int, float) and typ(value) == value:
        value = typ(value)  # JSON's 50 for a float field, 12.0 for an int one
      if not isinstance(value, typ):
        raise UserError(f'config.json: {key}={value!r} is not a {typ.__name__}')
      fields[(section, name)] = value
  return fields


def _replace(cfg: Config, fields: dict[Field, Any]) -> Config:
  sections: dict[str, dict[str, Any]] = {}
  for (section, name), value in fields.items():
    sections.setdefault(section, {})[name] = value
  return dataclasses.replace(cfg, **{s: dataclasses.replace(getattr(cfg, s), **values)
                                     for s, values in sections.items()})


def _tensor(state: dict[str, np.ndarray], key: str, ndim: int) -> np.ndarray:
  if key not in state:
    raise UserError(f'missing key {key!r}: not an MDLM-family DiT checkpoint? (it has '
                    f'{", ".join(list(state)[:3]) or "no tensors"}, ...)')
  if state[key].ndim != ndim:
    raise UserError(f'{key} has shape {tuple(state[key].shape)}, expected {ndim} dimensions')
  return state[key]
