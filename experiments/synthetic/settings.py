"""Sizes of the synthetic experiment, as named presets
(`python -m experiments.synthetic --preset NAME`).

Each preset's docstring gives its command, its time on a 2-core CPU and what to expect. Any field
can be overridden with `--set field=value` (e.g. `--set vocab=1000`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from imdm_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Setting:
  vocab: int = 64  # V_s, the mask id is V_s
  length: int = 10  # L
  num_data: int = 100_000  # training sequences (method.md §5)
  hidden: int = 64  # DiT width (and conditioning width)
  blocks: int = 2
  heads: int = 4
  noise_dim: int = 8  # D of the IMDM arms; small D was better in the prototype
  batch: int = 256
  lr: float = 1e-3
  # every stage (base, NELBO, SDTT, each ReDi round) decays its rate linearly to 0 over its own
  # steps; false keeps it constant after the warm-up. Decay lifted the oracle from 0.48 to 0.75
  # at 1 step in the same updates (README, Results): Adam's noise at a constant rate blurs the
  # boundaries of the eps -> c map
  lr_decay: bool = True
  # SDTT's own rate (the reference distils at 6e-5, ReDi at 3e-4). At `lr` (1e-3) its kl-bwd
  # self-distillation collapsed the MDM onto one token in 6 rounds in 1 of 3 runs (README, Results)
  sdtt_lr: float = 1e-4
  # the rate of the two arms trained on fresh pairs (`imdm/consensus`, `imdm/oracle`). The
  # consensus arm's self-labelling sharpens faster at 3e-3 than at `lr` (+12 points at 1 step;
  # 1e-2 is no better): README, Results
  online_lr: float = 3e-3
  base_steps: int = 2000  # NELBO training of the MDM every arm starts from
  budget: int = 3150  # student updates of every arm after the base
  sdtt_rounds: int = 6  # the round-0 teacher takes 2^rounds steps; the last student takes 1
  redi_rounds: int = 6  # reflow: round k + 1 re-couples from the round-k student
  redi_first_pairs: int = 2048  # round 1 couplings: few, so the student can fit eps -> c at all
  # couplings of each later round. Few enough that the student fits them closely: with 32768 the
  # spec's ReDi never left the ceiling (README, Results)
  redi_pairs: int = 8192
  redi_first_steps: int = 150  # round 1 short: a smooth eps-dependence for later rounds to sharpen
  teacher_steps: int = 128  # sampler steps of the coupling runs
  teacher_temperature: float = 1.0  # of the teacher from round 2 on (round 1 always samples at 1)
  # An extra IMDM arm beyond the spec: ReDi whose teacher from round 2 samples at this temperature
  # with its values balanced (`arms.Runner.balanced`); 0 leaves the arm out
  balanced_temperature: float = 0.25
  # The other extension (`arms.Runner.consensus`): after ReDi round 1, online self-distillation on
  # fresh eps whose teacher, the student frozen every this many steps, labels a fully masked pair
  # by its balanced consensus over positions; 0 leaves the arm out. Staler teachers do worse (at
  # 1e-3, 150 and 600 steps; at 3e-3, 150 is about level: README, Results)
  consensus_refresh: int = 50
  full_mask_fraction: float = 0.5  # pairs with t = 1; the rest t ~ U(0, 1)
  # the spec's ablation: rectify on fresh eps, not the pair's seeded eps (`redi.ignore_seed`)
  redi_ignore_seed: bool = False
  eval_samples: int = 4096
  eval_steps: tuple[int, ...] = (1, 2, 4, 8, 64)
  seed: int = 0

  @property
  def redi_round_steps(self) -> int:
    """Steps of each ReDi round after the first: the rest of the budget, shared evenly."""
    return (self.budget - self.redi_first_steps) // max(self.redi_rounds - 1, 1)


PRESETS: dict[str, Callable[[], Setting]] = {}


def _preset(fn):
  PRESETS[fn.__name__] = fn
  return fn


@_preset
def default() -> Setting:
  """`python -m experiments.synthetic` — V_s = 64, a 2 x 64 DiT, D = 8; ~35 minutes on 2 cores.

  Expect every MDM arm on the exact ceiling at every step count, and the IMDM ReDi arms above it at
  1-2 steps, `imdm/consensus` highest (0.76 at 1 step, level with the oracle; README, Results,
  gives the measured table).
  """
  return Setting()


@_preset
def quick() -> Setting:
  """`python -m experiments.synthetic --preset quick` — the same protocol, scaled down to a few
  minutes (run by `pytest -m slow tests/test_synthetic.py`). Its numbers are noisy."""
  return Setting(num_data=20_000, base_steps=400, budget=600, sdtt_rounds=3, redi_rounds=2,
                 redi_pairs=2048, teacher_steps=64, eval_samples=1024, eval_steps=(1, 2, 4, 64))


@_preset
def full() -> Setting:
  """`python -m experiments.synthetic --preset full` — 4x the default's updates per arm (12600),
  with rounds of the default's length (24 ReDi rounds): about 2 hours on 2 cores. Expect the
  consensus arm at ~0.88 at 1 step and ~0.91 at 2 (README, Results, gives the measured rows)."""
  return Setting(budget=12_600, redi_rounds=24)


@_preset
def target() -> Setting:
  """`python -m experiments.synthetic --preset target --only imdm/consensus` — 16x the default's
  updates per arm (50400): the budget at which the consensus arm meets the issue's target (0.939
  constant at 1 step and 0.955 at 2 with seed 0, 0.931 and 0.954 with seed 1, 64 of 64 values;
  ~46 minutes on 2 cores). Without `--only`, every arm at this budget (84 ReDi rounds of the
  default's length): many hours, not yet run."""
  return Setting(budget=50_400, redi_rounds=84)


@_preset
def paper() -> Setting:
  """`python -m experiments.synthetic --preset paper [--set vocab=50000]` — the paper's network
  (4 blocks, width 128, 4 heads, no dropout, D = 128). About 10x the default's cost per step:
  sized for an accelerator."""
  return Setting(hidden=128, blocks=4, heads=4, noise_dim=128)


def _parse(field: dataclasses.Field, text: str):
  if field.type in ('tuple[int, ...]',):
    return tuple(int(v) for v in text.split(','))
  if field.type == 'bool':
    if text not in ('true', 'false', '1', '0'):
      raise ValueError(text)
    return text in ('true', '1')
  return {'int': int, 'float': float}[field.type](text)


def resolve(name: str, overrides: list[str]) -> Setting:
  if name not in PRESETS:
    raise UserError(f'--preset {name!r}: expected one of {", ".join(PRESETS)}')
  setting = PRESETS[name]()
  fields = {f.name: f for f in dataclasses.fields(Setting)}
  for item in overrides:
    key, sep, text = item.partition('=')
    if not sep or key not in fields:
      raise UserError(f'--set {item!r}: expected field=value with field one of {", ".join(fields)}')
    try:
      setting = dataclasses.replace(setting, **{key: _parse(fields[key], text)})
    except ValueError:
      raise UserError(f'--set {item!r}: not a valid {fields[key].type}') from None
  if setting.vocab < 2 or setting.length < 2 or setting.redi_rounds < 1 or setting.sdtt_rounds < 1:
    raise UserError('need vocab >= 2, length >= 2, redi_rounds >= 1 and sdtt_rounds >= 1')
  if setting.consensus_refresh < 0:
    raise UserError(f'consensus_refresh={setting.consensus_refresh}: expected >= 1, or 0 (no arm)')
  if setting.redi_first_steps >= setting.budget and setting.redi_rounds > 1:
    raise UserError(f'redi_first_steps={setting.redi_first_steps} leaves no budget for later rounds')
  return setting
