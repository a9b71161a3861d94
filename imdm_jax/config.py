"""Frozen configuration dataclasses and `--set a.b=value` overrides.

A run is fully described by one `Config`. The named presets live in `presets.py`;
`resolve(preset, overrides)` is the single entry point used by every script, and the resolved
config is written next to every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import typing

from imdm_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The MDLM DiT (reference_checkpoints.md). `noise_dim > 0` adds the IMDM mask-noise MLP."""
  vocab_size: int = 2049  # V, the mask token included
  hidden_size: int = 128  # d
  n_blocks: int = 4
  n_heads: int = 4
  cond_dim: int = 128  # C, width of the conditioning vector c
  mlp_ratio: int = 4
  dropout: float = 0.1
  attn_softcap: float = 0.0  # 0 disables the attention-logit soft-cap
  time_conditioning: bool = False  # released models feed sigma = 0
  noise_dim: int = 0  # D of the IMDM mask noise eps; 0 (and no mask states) is plain MDLM
  arch: str = 'dit'  # or 'gpt2': a causal LM trained by next-token NLL (the Gen PPL evaluator)
  dtype: str = 'float32'  # or 'bfloat16': matmuls in bf16; params, norms, softmax, loss in fp32
  remat: bool = False  # recompute each block's activations in the backward pass (saves memory)


NOISE_TYPES = ('uniform', 'normal', 'learnable')
ARCHS = ('dit', 'gpt2')
DTYPES = ('float32', 'bfloat16')


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
  eps: float = 1e-3  # alpha(1) = eps; t is sampled in [eps, 1)
  antithetic: bool = True
  noise_type: str = 'uniform'  # IMDM eps: U[-1, 1)^D, N(0, I), or learnable mu + sigma N(0, I)
  noise_scale: float = 1.0  # eps is multiplied by this (must be 1 for 'learnable')
  num_mask_states: int = 0  # K > 0: the finite-mask ablation (K = 1 is exactly MDLM)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where rows come from. `source`: 'bible' (embedded corpus), 'text:GLOB' (local .txt/.jsonl
  files) or 'tfds:NAME' (a tfds dataset prepared as ArrayRecord in `data_dir`)."""
  source: str = 'bible'
  seq_len: int = 128  # L
  wrap: bool = True  # pack documents into full rows; False pads each document to L
  tokenizer: str = 'sentencepiece'  # or 'gpt2', 'bert-base-uncased'
  tokenizer_path: str = ''  # local vocabulary files of 'gpt2' / 'bert-base-uncased'
  val_split: str = 'every:50'  # a tfds split name, 'every:K' or 'last:N' documents of train
  text_key: str = 'text'  # the text feature of a tfds or .jsonl source
  data_dir: str = '~/.cache/imdm_jax'


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float = 3e-4
  warmup_steps: int = 2500  # linear warm-up, then constant
  # > warmup_steps: after the warm-up, decay linearly to 0 at this step (an annealed end sharpens
  # what Adam's noise at a constant rate blurs; README, synthetic results). 0: stay constant
  decay_steps: int = 0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  grad_clip: float = 1.0
  ema_decay: float = 0.9999


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  batch_size: int = 32  # global, over all devices and processes
  num_steps: int = 1000
  seed: int = 0
  log_every: int = 25
  eval_every: int = 250
  eval_batches: int = 0  # 0 evaluates the whole validation split
  ckpt_every: int = 250
  keep_checkpoints: int = 2
  grad_accum: int = 1  # micro-batches per step, run one after another (same update, less memory)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = -1  # -1: all devices not used by the other axis
  fsdp: int = 1


DIVERGENCES = ('kl-bwd', 'kl-fwd', 'mse', 'tvd')
TEACHER_GRIDS = ('intended', 'wide', 'slip')  # sdtt.teacher_steps documents each


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """SDTT (method.md §3) and ReDi (§4). Used by `distill.py` only."""
  # SDTT: round r distils a teacher of step (1 - eps)/teacher_base_steps * 2^r into a student of
  # twice that step
  round_steps: int = 10_000
  num_rounds: int = 7
  divergence: str = 'kl-bwd'  # KL(student || teacher); or kl-fwd, mse (log-probs), tvd
  teacher_grid: str = 'intended'  # t -> t-dt -> t-2dt; or 'wide', 'slip' (sdtt.teacher_steps)
  teacher_base_steps: int = 1024  # round 0's teacher steps (fewer: a coarse teacher, small tasks)
  # ReDi: couplings (z_T, x_hat_0, t, seed) from the current model, then rectification
  num_pairs: int = 100_000
  teacher_steps: int = 1024  # sampler steps of the coupling run
  teacher_temperature: float = 1.0
  teacher_final: str = 'ancestral'  # 'greedy': argmax at the last step
  teacher_fix_eps: bool = False  # hold the starting eps through the coupling run
  full_mask_fraction: float = 0.0  # share of pairs with t = 1 (the rest t ~ U(0, 1))
  ignore_seed: bool = False  # rectify with fresh eps instead of the pair's seeded eps (ablation)
  reflow_rounds: int = 1  # round k + 1 re-couples from the round-k student


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = ModelConfig()
  diffusion: DiffusionConfig = DiffusionConfig()
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  train: TrainConfig = TrainConfig()
  mesh: MeshConfig = MeshConfig()
  distill: DistillConfig = DistillConfig()


# ----------------------------------------------------------------------------------------------
# Overrides and (de)serialisation

def _parse_value(key: str, text: str, typ: type):
  if typ is bool:
    if text.lower() in ('true', '1', 'yes'):
      return True
    if text.lower() in ('false', '0', 'no'):
      return False
    raise UserError(f'--set {key}: expected a bool (true/false), got {text!r}')
  try:
    return typ(text)
  except ValueError:
    raise UserError(f'--set {key}: expected {typ.__name__}, got {text!r}') from None


def _field_type(section_cls, name: str) -> type:
  return typing.get_type_hints(section_cls)[name]


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
  """Applies `section.key=value` strings, checking that the key exists and the value's type."""
  for item in overrides:
    key, sep, text = item.partition('=')
    section, dot, name = key.partition('.')
    if not sep or not dot:
      raise UserError(f'--set {item!r}: expected section.key=value')
    if section not in {f.name for f in dataclasses.fields(Config)}:
      raise UserError(f'--set {key}: unknown config section {section!r}')
    sub = getattr(cfg, section)
    if name not in {f.name for f in dataclasses.fields(sub)}:
      raise UserError(f'--set {key}: unknown key {name!r} in section {section!r}')
    value = _parse_value(key, text, _field_type(type(sub), name))
    cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(sub, **{name: value})})
  return cfg


def resolve(preset_name: str, overrides: list[str] = ()) -> Config:
  from imdm_jax.presets import PRESETS  # pylint: disable=g-import-not-at-top  # presets import us
  if preset_name not in PRESETS:
    raise UserError(f'unknown preset {preset_name!r}; known: {", ".join(sorted(PRESETS))}')
  cfg = apply_overrides(PRESETS[preset_name](), list(overrides))
  validate(cfg)
  return cfg


def validate(cfg: Config) -> None:
  m = cfg.model
  for key in ('data_dir', 'tokenizer_path'):
    if '://' in getattr(cfg.data, key):  # see runtime.refuse_remote_paths
      raise UserError(f'data.{key}={getattr(cfg.data, key)!r}: remote URLs are not supported; use '
                      'a local path or a mounted bucket (e.g. gcsfuse)')
  if m.hidden_size % m.n_heads or (m.hidden_size // m.n_heads) % 2:
    raise UserError(f'model.hidden_size={m.hidden_size} must split into model.n_heads={m.n_heads} '
                    'heads of even size (rotary embeddings)')
  d = cfg.diffusion
  if d.noise_type not in NOISE_TYPES:
    raise UserError(f'diffusion.noise_type={d.noise_type!r}: expected one of {", ".join(NOISE_TYPES)}')
  if d.noise_type == 'learnable' and d.noise_scale != 1.0:
    raise UserError('diffusion.noise_scale must be 1 with learnable noise (sigma is learned)')
  if d.num_mask_states < 0 or m.noise_dim < 0:
    raise UserError('diffusion.num_mask_states and model.noise_dim must be >= 0')
  if m.arch not in ARCHS:
    raise UserError(f'model.arch={m.arch!r}: expected one of {", ".join(ARCHS)}')
  if m.arch == 'gpt2' and (m.noise_dim or d.num_mask_states):
    raise UserError('model.arch=gpt2 is autoregressive: it takes no IMDM mask noise')
  if d.num_mask_states and m.noise_dim:
    raise UserError('diffusion.num_mask_states (finite mask) and model.noise_dim (continuous eps) '
                    'are alternatives: set one of them to 0')
  if cfg.distill.divergence not in DIVERGENCES:
    raise UserError(f'distill.divergence={cfg.distill.divergence!r}: expected one of '
                    f'{", ".join(DIVERGENCES)}')
  if cfg.distill.teacher_grid not in TEACHER_GRIDS:
    raise UserError(f'distill.teacher_grid={cfg.distill.teacher_grid!r}: expected one of '
                    f'{", ".join(TEACHER_GRIDS)}')
  if min(cfg.distill.round_steps, cfg.distill.num_rounds, cfg.distill.teacher_base_steps) < 1:
    raise UserError('distill.round_steps, num_rounds and teacher_base_steps must be >= 1')
  if cfg.optim.decay_steps and cfg.optim.decay_steps <= max(cfg.optim.warmup_steps, 1):
    raise UserError(f'optim.decay_steps={cfg.optim.decay_steps} must exceed optim.warmup_steps='
                    f'{cfg.optim.warmup_steps} (or be 0: no decay)')
  if cfg.data.seq_len < 3:
    raise UserError(f'data.seq_len={cfg.data.seq_len} is too short for BOS + token + EOS')
  if m.dtype not in DTYPES:
    raise UserError(f'model.dtype={m.dtype!r}: expected one of {", ".join(DTYPES)}')
  for name in ('batch_size', 'num_steps', 'log_every', 'eval_every', 'ckpt_every', 'grad_accum'):
    if getattr(cfg.train, name) < 1:
      raise UserError(f'train.{name} must be >= 1, got {getattr(cfg.train, name)}')
  if cfg.train.batch_size % cfg.train.grad_accum:
    raise UserError(f'train.batch_size={cfg.train.batch_size} is not divisible by '
                    f'train.grad_accum={cfg.train.grad_accum}')


def to_dict(cfg: Config) -> dict:
  return dataclasses.asdict(cfg)


def from_dict(d: dict) -> Config:
  """Rebuilds a Config saved by `to_dict`; keys this version does not know are an error."""
  sections = {}
  for f in dataclasses.fields(Config):
    cls = typing.get_type_hints(Config)[f.name]
    values = dict(d.get(f.name, {}))
    unknown = set(values) - {g.name for g in dataclasses.fields(cls)}
    if unknown:
      raise UserError(f'saved config has unknown key {f.name}.{sorted(unknown)[0]}')
    sections[f.name] = cls(**values)
  return Config(**sections)


def dumps(cfg: Config) -> str:
  return json.dumps(to_dict(cfg), indent=2, sort_keys=True)
