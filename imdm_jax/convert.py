"""Porting a PyTorch MDLM / SDTT / IMDM DiT to this project's checkpoint format (`convert.py`).

The architecture is read off the tensors (reference_checkpoints.md): V and d from
`vocab_embed.embedding [V, d]`, the depth from the block indices, C from `sigma_map.mlp.0.weight
[C, 256]`, the MLP ratio from `mlp.0.weight [r d, d]`, the head size from the rotary buffer
`inv_freq [Dh/2]` when it was saved, and the IMDM mask noise from `vocab_embed.imdm_mlp`. What the
tensors cannot say (the heads when `inv_freq` is absent, the attention soft-cap, time conditioning,
uniform vs normal eps) comes from the source's `config.json`, else the preset, else `--set`, which
has the last word. A `config.json` that contradicts the tensors is refused.

Everything is built and checked in memory before anything is written. The result is a step-0 train
state whose params and EMA are both the converted weights, so `train.py --init_from`, sampling and
distillation read it like any run of ours.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from imdm_jax import (checkpoint, config as config_lib, convert_gpt2, convert_sources, init_from,
                      model, port)
from imdm_jax import train_state
from imdm_jax.config import Config
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
_INV_FREQ = 'rotary_emb.inv_freq'
_NOISE_MLP = 'vocab_embed.imdm_mlp.0.weight'  # [4d, D]: continuous mask noise eps
_MASK_STATES = 'vocab_embed.imdm_mlp.weight'  # [K, d]: the finite-mask table
_LEARNABLE = 'vocab_embed.learnable_noise_mu'


@dataclasses.dataclass(frozen=True)
class Converted:
  description: str
  n_params: int
  weights: str
  directory: str

  def __str__(self) -> str:
    return (f'converted {self.description}: {self.n_params:,} parameters, {self.weights} -> '
            f'{self.directory}')


def convert(src: str, out: str, raw: bool = False, force: bool = False, tokenizer_path: str = '',
            preset: str | None = None, overrides: list[str] = ()) -> Converted:
  """Ports the checkpoint at `src` into the run directory `out` (checkpoints/, config.json)."""
  out = os.path.abspath(os.path.expanduser(out))
  check_output(out, force)
  source = convert_sources.read(src, raw)
  if convert_gpt2.is_gpt2(source.state):  # the Gen PPL evaluator, not a diffusion model
    params, cfg = _gpt2(source, overrides, tokenizer_path)
    grafted, k_rng = False, jax.random.PRNGKey(cfg.train.seed)
  else:
    cfg = resolve_config(source, preset, overrides, tokenizer_path)
    k_params, k_rng = jax.random.split(jax.random.PRNGKey(cfg.train.seed))  # as init_state does
    params, grafted = convert_params(source.state, cfg, k_params)
  weights = source.weights
  del source
  params = jax.tree.map(jnp.array, params)  # copies, so the host tensors are freed here
  state = _train_state(cfg, params, k_rng)
  write(out, state, cfg)
  return Converted(describe(cfg, grafted), train_state.param_count(state.params), weights, out)


def check_output(out: str, force: bool) -> None:
  if os.path.exists(out) and not os.path.isdir(out):
    raise UserError(f'--out {out} is a file, not a directory')
  ckpt_dir = os.path.join(out, 'checkpoints')
  if not force and os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise UserError(f'{out} already holds a checkpoint: pass --force to replace it')


def infer(state: dict[str, np.ndarray]) -> dict[Field, Any]:
  """The config fields the tensors determine. Only a few shapes are read here; every tensor's
  shape is checked against the resulting model in `port.params_from_torch`."""
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
  if _INV_FREQ in state:
    half = _tensor(state, _INV_FREQ, 1).shape[0]  # [Dh/2]
    if d % (2 * half):
      raise UserError(f'{_INV_FREQ} has {half} entries: no head size 2x{half} divides d={d}')
    fields[('model', 'n_heads')] = d // (2 * half)
  if _NOISE_MLP in state:
    fields[('model', 'noise_dim')] = _tensor(state, _NOISE_MLP, 2).shape[1]
    fields[('diffusion', 'num_mask_states')] = 0
    if _LEARNABLE in state:
      fields[('diffusion', 'noise_type')] = 'learnable'
  elif _MASK_STATES in state:
    fields[('diffusion', 'num_mask_states')] = _tensor(state, _MASK_STATES, 2).shape[0]
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


def resolve_config(source: convert_sources.Source, preset: str | None = None,
                   overrides: list[str] = (), tokenizer_path: str = '') -> Config:
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
    raise UserError(f'the head count of a d={d} model is neither in the tensors (no {_INV_FREQ}) '
                    'nor in a config.json: pass --set model.n_heads=H')
  config_lib.validate(cfg)
  _check_vocabulary(cfg)
  return cfg


def convert_params(state: dict[str, np.ndarray], cfg: Config,
                   key: jax.Array) -> tuple[train_state.Params, bool]:
  """Our parameter tree (host arrays) and whether a fresh IMDM noise path was added to MDLM weights.

  Every source tensor must be used and every parameter filled, except when the config adds the
  IMDM noise path to weights without one: that path is initialised as a new model's is (second
  layer zero, so the result computes exactly the source MDLM)."""
  extends = bool(cfg.model.noise_dim or cfg.diffusion.num_mask_states) and not (
      _NOISE_MLP in state or _MASK_STATES in state)
  plain = dataclasses.replace(
      cfg, model=dataclasses.replace(cfg.model, noise_dim=0),
      diffusion=dataclasses.replace(cfg.diffusion, num_mask_states=0)) if extends else cfg
  params = port.params_from_torch(state, jax.eval_shape(_init_params(plain), key))
  _verify_rotary(state, cfg)  # after the shapes: a wrong --set hidden_size is named as such
  if extends:
    params = init_from.graft(_init_params(cfg)(key), params, 'convert')
  return params, extends


def _gpt2(source: convert_sources.Source, overrides, tokenizer_path: str):
  params, sizes = convert_gpt2.params_from_hf(source.state)
  cfg = convert_gpt2.config_for(sizes, source.stated.get('n_head'), list(overrides))
  if tokenizer_path:
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer_path=tokenizer_path))
    tokenizer = pretrained.load('gpt2', tokenizer_path)
    if tokenizer.mask_id != cfg.model.vocab_size:  # the BPE ids, without our appended mask
      raise UserError(f'the gpt2 tokenizer at {tokenizer_path} has {tokenizer.mask_id} ids, the '
                      f'tensors V={cfg.model.vocab_size}')
  template = jax.eval_shape(_init_params(cfg), jax.random.PRNGKey(0))
  init_from.graft(template, params, 'convert')  # every parameter present, every shape right
  return params, cfg


def describe(cfg: Config, grafted: bool) -> str:
  m, diff = cfg.model, cfg.diffusion
  if m.arch == 'gpt2':
    return f'GPT-2 {m.n_blocks}x{m.hidden_size}, {m.n_heads} heads, V={m.vocab_size}'
  kind = 'MDLM'
  if m.noise_dim:
    kind = f'IMDM (noise_dim {m.noise_dim}, {diff.noise_type} eps)'
  elif diff.num_mask_states:
    kind = f'finite-mask IMDM (K={diff.num_mask_states})'
  if grafted:
    kind += ' with a fresh noise path on MDLM weights'
  cap = f', soft-cap {m.attn_softcap:g}' if m.attn_softcap else ''
  return f'{kind} DiT {m.n_blocks}x{m.hidden_size}, {m.n_heads} heads{cap}, V={m.vocab_size}'


def write(out: str, state: train_state.TrainState, cfg: Config) -> None:
  """Saves into a staging directory, then swaps it in, so a failed save leaves `out` as it was."""
  created = not os.path.exists(out)
  staging = os.path.join(out, f'.checkpoints.tmp{os.getpid()}')
  try:
    ckpt = checkpoint.Checkpointer(staging)
    ckpt.save(0, state, cfg, force=True)
    ckpt.wait()
    ckpt.close()
  except BaseException:
    shutil.rmtree(out if created else staging, ignore_errors=True)
    raise
  ckpt_dir = os.path.join(out, 'checkpoints')
  if os.path.isdir(ckpt_dir):  # --force (checked before reading anything)
    shutil.rmtree(ckpt_dir)
  os.replace(staging, ckpt_dir)
  checkpoint.write_json_atomic(os.path.join(out, 'config.json'), config_lib.to_dict(cfg))


def _train_state(cfg: Config, params: train_state.Params, rng: jax.Array) -> train_state.TrainState:
  """Step 0 with a fresh optimizer; params and EMA are separate buffers (the train step donates
  its input state, and a buffer donated twice crashes)."""
  return train_state.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, ema=jax.tree.map(jnp.copy, params),
      opt_state=train_state.make_optimizer(cfg.optim).init(params), rng=rng)


def _init_params(cfg: Config):
  # Parameters do not depend on the mask id; any id builds the same tree.
  return lambda key: train_state.init_params(cfg, cfg.model.vocab_size - 1, key)


def _verify_rotary(state: dict[str, np.ndarray], cfg: Config) -> None:
  if _INV_FREQ not in state:
    return
  head_dim = cfg.model.hidden_size // cfg.model.n_heads
  saved = np.asarray(state[_INV_FREQ], np.float32)
  expected = np.asarray(model.rotary_inv_freq(head_dim))
  # rtol covers a bf16-saved buffer; another base or head size is off by far more.
  if saved.shape != expected.shape or not np.allclose(saved, expected, rtol=1e-2, atol=0):
    raise UserError(f'{_INV_FREQ} {saved.shape} is not 1 / 10000^(2i / {head_dim}) for '
                    f'{cfg.model.n_heads} heads of size {head_dim}: another rotary embedding, or '
                    'a wrong model.n_heads')


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


def _stated(config_json: dict[str, Any], base: Config) -> dict[Field, Any]:
  fields = {}
  for key, value in config_json.items():
    if key in STATED_KEYS and value is not None:
      section, name = STATED_KEYS[key]
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
