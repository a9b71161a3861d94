"""Frozen configuration dataclasses and `--set a.b=value` overrides.

A run is fully described by one `Config`. The named presets live in `presets.py`;
`resolve(preset, overrides)` is the single entry point used by every script, and the resolved
config is written next to every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing

from imdm_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The MDLM DiT (docs/conversion.md). `noise_dim > 0` adds the IMDM mask-noise MLP."""
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

  def validate(self) -> None:
    if self.hidden_size % self.n_heads or (self.hidden_size // self.n_heads) % 2:
      raise UserError(f'model.hidden_size={self.hidden_size} must split into model.n_heads='
                      f'{self.n_heads} heads of even size (rotary embeddings)')
    _at_least(self, 'model', 2, 'vocab_size')
    _at_least(self, 'model', 1, 'hidden_size', 'n_blocks', 'n_heads', 'cond_dim', 'mlp_ratio')
    _at_least(self, 'model', 0, 'noise_dim')
    _in_range('model.dropout', self.dropout, 0.0, 1.0, high_open=True)
    _in_range('model.attn_softcap', self.attn_softcap, 0.0, math.inf, high_open=True)
    _one_of('model.arch', self.arch, ARCHS)
    _one_of('model.dtype', self.dtype, DTYPES)


NOISE_TYPES = ('uniform', 'normal', 'learnable')
ARCHS = ('dit', 'gpt2')
DTYPES = ('float32', 'bfloat16')


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
  # the alpha floor: alpha(1) = alpha_min, and training times are drawn in [alpha_min, 1)
  # (named apart from eps, which is the IMDM mask noise everywhere else)
  alpha_min: float = 1e-3
  antithetic: bool = True
  noise_type: str = 'uniform'  # IMDM eps: U[-1, 1)^D, N(0, I), or learnable mu + sigma N(0, I)
  noise_scale: float = 1.0  # eps is multiplied by this (must be 1 for 'learnable')
  num_mask_states: int = 0  # K > 0: the finite-mask ablation (K = 1 is exactly MDLM)

  def validate(self) -> None:
    _one_of('diffusion.noise_type', self.noise_type, NOISE_TYPES)
    if self.noise_type == 'learnable' and self.noise_scale != 1.0:
      raise UserError('diffusion.noise_scale must be 1 with learnable noise (sigma is learned)')
    _at_least(self, 'diffusion', 0, 'num_mask_states')
    _in_range('diffusion.alpha_min', self.alpha_min, 0.0, 1.0, low_open=True, high_open=True)
    _in_range('diffusion.noise_scale', self.noise_scale, 0.0, math.inf, low_open=True,
              high_open=True)


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

  def validate(self) -> None:
    for key in ('data_dir', 'tokenizer_path'):
      if '://' in getattr(self, key):  # see runtime.refuse_remote_paths
        raise UserError(f'data.{key}={getattr(self, key)!r}: remote URLs are not supported; use '
                        'a local path or a mounted bucket (e.g. gcsfuse)')
    if self.seq_len < 3:
      raise UserError(f'data.seq_len={self.seq_len} is too short for BOS + token + EOS')


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float = 3e-4
  warmup_steps: int = 2500  # linear warm-up, then constant
  # > warmup_steps: after the warm-up, decay linearly to 0 at this step (an annealed end sharpens
  # what Adam's noise at a constant rate blurs; docs/results_synthetic.md). 0: stay constant
  decay_steps: int = 0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  grad_clip: float = 1.0
  ema_decay: float = 0.9999

  def validate(self) -> None:
    _in_range('optim.lr', self.lr, 0.0, math.inf, low_open=True, high_open=True)
    _at_least(self, 'optim', 0, 'warmup_steps', 'decay_steps')
    for key in ('b1', 'b2'):
      _in_range(f'optim.{key}', getattr(self, key), 0.0, 1.0, high_open=True)
    _in_range('optim.eps', self.eps, 0.0, math.inf, low_open=True, high_open=True)
    _in_range('optim.weight_decay', self.weight_decay, 0.0, math.inf, high_open=True)
    _in_range('optim.grad_clip', self.grad_clip, 0.0, math.inf, low_open=True, high_open=True)
    _in_range('optim.ema_decay', self.ema_decay, 0.0, 1.0)
    if self.decay_steps and self.decay_steps <= max(self.warmup_steps, 1):
      raise UserError(f'optim.decay_steps={self.decay_steps} must exceed optim.warmup_steps='
                      f'{self.warmup_steps} (or be 0: no decay)')


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

  def validate(self) -> None:
    _at_least(self, 'train', 1, 'batch_size', 'num_steps', 'log_every', 'eval_every', 'ckpt_every',
              'grad_accum', 'keep_checkpoints')
    _at_least(self, 'train', 0, 'seed', 'eval_batches')
    if self.batch_size % self.grad_accum:
      raise UserError(f'train.batch_size={self.batch_size} is not divisible by '
                      f'train.grad_accum={self.grad_accum}')


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = -1  # -1: all devices not used by the other axis
  fsdp: int = 1

  def validate(self) -> None:
    pass  # checked against the devices by sharding.make_mesh


DIVERGENCES = ('kl-bwd', 'kl-fwd', 'mse', 'tvd')
TEACHER_GRIDS = ('intended', 'slip')  # sdtt.two_teacher_steps documents each
FINAL_MODES = ('ancestral', 'greedy')


@dataclasses.dataclass(frozen=True)
class SdttConfig:
  """SDTT (docs/method.md §3): round r distils a teacher of step (1 - alpha_min)/base_steps * 2^r
  into a student of twice that step. Used by `distill.py sdtt` only."""
  round_steps: int = 10_000
  num_rounds: int = 7
  divergence: str = 'kl-bwd'  # KL(student || teacher); or kl-fwd, mse (log-probs), tvd
  teacher_grid: str = 'intended'  # t -> t-dt -> t-2dt; or 'slip' (sdtt.two_teacher_steps)
  base_steps: int = 1024  # round 0's teacher sampler steps (fewer: a coarse teacher, small tasks)
  # The loss is the mean, over blocks of this many consecutive rows (a block of the antithetic t),
  # of each block's mean over its masked positions: the official code's reduction, whose blocks
  # are its per-device micro-batches (16 rows in every released SDTT script). 0: one mean over
  # every masked position of the batch (weights each row by its number of masks, so large t more)
  stratum_rows: int = 16

  def validate(self) -> None:
    _one_of('sdtt.divergence', self.divergence, DIVERGENCES)
    _one_of('sdtt.teacher_grid', self.teacher_grid, TEACHER_GRIDS)
    _at_least(self, 'sdtt', 1, 'round_steps', 'num_rounds', 'base_steps')
    _at_least(self, 'sdtt', 0, 'stratum_rows')


@dataclasses.dataclass(frozen=True)
class RediConfig:
  """ReDi (docs/method.md §4): couplings (z_T, x_hat_0, t, seed) from the current model, then
  rectification on them. Used by `distill.py redi-generate / redi-train / redi` only."""
  num_pairs: int = 100_000
  sampler_steps: int = 1024  # steps of the coupling run's sampler
  temperature: float = 1.0
  final: str = 'ancestral'  # 'greedy': argmax at the last step
  fix_eps: bool = False  # hold the starting eps through the coupling run
  full_mask_fraction: float = 0.0  # share of pairs with t = 1 (the rest t ~ U(0, 1))
  ignore_seed: bool = False  # rectify with fresh eps instead of the pair's seeded eps (ablation)
  rounds: int = 1  # `distill.py redi`: round k + 1 re-couples from the round-k student

  def validate(self) -> None:
    _at_least(self, 'redi', 1, 'num_pairs', 'sampler_steps', 'rounds')
    _one_of('redi.final', self.final, FINAL_MODES)
    _in_range('redi.temperature', self.temperature, 0.0, math.inf, low_open=True, high_open=True)
    if not 0.0 <= self.full_mask_fraction <= 1.0:
      raise UserError(f'redi.full_mask_fraction={self.full_mask_fraction} must be in [0, 1]')


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = ModelConfig()
  diffusion: DiffusionConfig = DiffusionConfig()
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  train: TrainConfig = TrainConfig()
  mesh: MeshConfig = MeshConfig()
  sdtt: SdttConfig = SdttConfig()
  redi: RediConfig = RediConfig()

  def validate(self) -> None:
    """Each section checks itself; then what spans sections."""
    for f in dataclasses.fields(self):
      getattr(self, f.name).validate()
    if self.model.arch == 'gpt2' and (self.model.noise_dim or self.diffusion.num_mask_states):
      raise UserError('model.arch=gpt2 is autoregressive: it takes no IMDM mask noise')
    if self.diffusion.num_mask_states and self.model.noise_dim:
      raise UserError('diffusion.num_mask_states (finite mask) and model.noise_dim (continuous '
                      'eps) are alternatives: set one of them to 0')


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise UserError(f'{key}={value!r}: expected one of {", ".join(allowed)}')


def _in_range(key: str, value: float, low: float, high: float, low_open: bool = False,
              high_open: bool = False) -> None:
  """Refuses a value outside [low, high] (or the open ends asked for), and NaN."""
  inside = ((low < value if low_open else low <= value) and
            (value < high if high_open else value <= high))
  if not inside:  # NaN is never inside
    interval = f'{"(" if low_open else "["}{low:g}, {high:g}{")" if high_open else "]"}'
    raise UserError(f'{key}={value} must be in {interval}')


def _at_least(section, name: str, low: int, *keys: str) -> None:
  for key in keys:
    if getattr(section, key) < low:
      raise UserError(f'{name}.{key} must be >= {low}, got {getattr(section, key)}')


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


def resolve(preset_name: str, overrides: typing.Sequence[str] = ()) -> Config:
  from imdm_jax.presets import PRESETS  # pylint: disable=g-import-not-at-top  # presets import us
  if preset_name not in PRESETS:
    raise UserError(f'unknown preset {preset_name!r}; known: {", ".join(sorted(PRESETS))}')
  cfg = apply_overrides(PRESETS[preset_name](), list(overrides))
  cfg.validate()
  return cfg


def to_dict(cfg: Config) -> dict:
  return dataclasses.asdict(cfg)


# Saved configs from before the `distill` section split and the `diffusion.eps` rename still load
# (converted and trained runs on disk): old key -> (section, new key).
_RENAMED = {
    ('diffusion', 'eps'): ('diffusion', 'alpha_min'),
    **{('distill', k): ('sdtt', k) for k in ('round_steps', 'num_rounds', 'divergence',
                                               'teacher_grid')},
    ('distill', 'teacher_base_steps'): ('sdtt', 'base_steps'),
    ('distill', 'teacher_steps'): ('redi', 'sampler_steps'),
    ('distill', 'teacher_temperature'): ('redi', 'temperature'),
    ('distill', 'teacher_final'): ('redi', 'final'),
    ('distill', 'teacher_fix_eps'): ('redi', 'fix_eps'),
    ('distill', 'reflow_rounds'): ('redi', 'rounds'),
    **{('distill', k): ('redi', k) for k in ('num_pairs', 'full_mask_fraction', 'ignore_seed')},
}


def _upgrade(d: dict) -> dict:
  out = {}
  for section, values in d.items():
    for key, value in values.items():
      new_section, new_key = _RENAMED.get((section, key), (section, key))
      out.setdefault(new_section, {})[new_key] = value
  return out


def from_dict(d: dict) -> Config:
  """Rebuilds a Config saved by `to_dict` (or by a version before the key renames of
  `_RENAMED`); keys this version does not know are an error."""
  d = _upgrade(d)
  sections = {}
  for f in dataclasses.fields(Config):
    cls = typing.get_type_hints(Config)[f.name]
    values = dict(d.get(f.name, {}))
    unknown = set(values) - {g.name for g in dataclasses.fields(cls)}
    if unknown:
      raise UserError(f'saved config has unknown key {f.name}.{sorted(unknown)[0]}')
    sections[f.name] = cls(**values)
  unknown = set(d) - {f.name for f in dataclasses.fields(Config)}
  if unknown:
    raise UserError(f'saved config has unknown section {sorted(unknown)[0]}')
  return Config(**sections)


def dumps(cfg: Config) -> str:
  return json.dumps(to_dict(cfg), indent=2, sort_keys=True)
