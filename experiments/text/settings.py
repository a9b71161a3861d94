"""Sizes of the text study, as named presets (`python -m experiments.text --preset NAME`).

A study names the two base presets of the library (`imdm_jax/presets.py`: the MDLM and its IMDM,
which fix the network, data and tokenizer) and, per stage, the `--set` overrides that make that
stage's config from its family's base preset. Each preset's docstring gives its command, its time
and what to expect.

Overrides on the command line: `--set field=value` for a scalar field (`num_samples=512`,
`eval_steps=1,2,8`), `--set STAGE:section.key=value` to add an override to one stage's config
(`--set sdtt:optim.lr=1e-4`), or to every stage with `all:` (`--set all:data.source=text:/x/*.txt`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from imdm_jax.errors import UserError

# The stages whose configs are made from a base preset plus overrides ('couplings' configures the
# coupling runs: the number of pairs and the teacher's sampler). `redi_only` is added on top of
# `redi` for the IMDM's ReDi-only arm, `reflow` on top of `couplings` for the coupling runs of
# ReDi rounds after the first (`Study.reflow_rounds`).
STAGES = ('all', 'mdlm', 'imdm', 'evaluator', 'sdtt', 'couplings', 'redi', 'redi_only', 'reflow')
FAMILIES = ('mdlm', 'imdm')
METHODS = ('base', 'sdtt', 'redi', 'sdtt+redi')
ARMS = tuple(f'{f}/{m}' for f in FAMILIES for m in METHODS)  # the order of every table


@dataclasses.dataclass(frozen=True)
class Study:
  mdlm: str  # the MDLM base preset (network, data, tokenizer)
  imdm: str  # the IMDM preset: the MDLM plus the noise path
  # a causal-LM preset trained on the same data as a stage, or the path of a causal-LM checkpoint
  # or conversion (contains '/'): GPT-2 Large converted by convert.py for the paper's recipes
  evaluator: str
  sets: dict[str, tuple[str, ...]]  # stage -> its `--set` overrides (keys among STAGES)
  # Where the IMDM's distillation starts. 'mdlm' (the official scripts): IM-SDTT distils the
  # MDLM base into an IMDM student (its noise path starts at zero), and the ReDi-only arm
  # rectifies an IMDM student from the MDLM base on the MDLM's couplings with fresh eps
  # (`redi_only` sets `redi.ignore_seed`: an MDLM's couplings do not depend on eps). 'imdm': both
  # start from the IMDM base (trained by the NELBO from the MDLM) and its couplings.
  imdm_start: str = 'mdlm'
  eval_steps: tuple[int, ...] = (1, 2, 4, 8, 16, 128)
  num_samples: int = 256  # per cell; the same seeds in every arm
  # docs/sampling.md: 'official' (the IMDM code's: literal special tokens, no BOS) for GPT-2
  # evaluators; 'ours' for an evaluator trained here, which knows our BOS/EOS and no literal
  # special-token text
  gen_ppl_protocol: str = 'ours'
  sample_batch: int = 64
  seed: int = 0

  # An extension beyond the paper's single round: the SDTT -> ReDi arms continue for this many
  # rounds of ReDi, round k + 1 coupling from the round-k student with fresh seeds (arms
  # `{family}/sdtt+redi{k}`). In the synthetic experiment the IMDM's gain appeared from round 2,
  # once its own couplings, made with eps held fixed, depend on eps.
  reflow_rounds: int = 1

  def stage_sets(self, stage: str) -> tuple[str, ...]:
    base = {'redi_only': 'redi', 'reflow': 'couplings'}.get(stage)
    extra = self.sets.get(base, ()) if base else ()
    return self.sets.get('all', ()) + extra + self.sets.get(stage, ())


PRESETS: dict[str, Callable[[], Study]] = {}


def _preset(fn):
  PRESETS[fn.__name__.replace('_', '-')] = fn
  return fn


def _steps(n: int, every: int | None = None) -> tuple[str, ...]:
  every = every or n
  return (f'train.num_steps={n}', f'train.eval_every={every}', f'train.ckpt_every={every}')


@_preset
def micro() -> Study:
  """`python -m experiments.text --preset micro` — the whole chain on the `micro` network in about
  a minute (the default test suite runs it). Its numbers mean nothing beyond "the chain runs"."""
  return Study(
      mdlm='micro', imdm='micro-imdm', evaluator='micro',
      sets={'imdm': _steps(20),
            'mdlm': _steps(40),
            'evaluator': ('model.arch=gpt2',) + _steps(20),
            'sdtt': ('sdtt.base_steps=8', 'sdtt.num_rounds=2', 'sdtt.round_steps=5',
                     'train.eval_every=10', 'train.ckpt_every=10'),
            'couplings': ('redi.num_pairs=32', 'redi.sampler_steps=8'),
            'redi': _steps(10),
            'redi_only': ('redi.ignore_seed=true',),
            'reflow': ('redi.fix_eps=true',)},
      eval_steps=(1, 2), num_samples=16, sample_batch=16)


@_preset
def cpu() -> Study:
  """`python -m experiments.text --preset cpu --out runs/text-cpu` — the embedded corpus and the
  `tiny` network (4 x 128, L = 128), every stage scaled down so that the whole study runs in
  under 3 hours on 2 CPU cores (docs/results_text.md gives the measured time and table).

  The MDLM base is `python train.py`'s run (1000 steps); the IMDM trains 300 more from it. SDTT
  halves a 128-step teacher 4 times (an 8-step student, as the paper's 1024 / 2^7) in 125 steps a
  round at 1e-4 (the paper's 6e-5 barely moves a student in so few steps). Couplings: 1024 pairs
  from a 32-step teacher; ReDi 400 steps at 3e-4 (12 passes over the pairs; the paper's 50k steps
  of 512 make 256 passes over 100k)."""
  return Study(
      mdlm='tiny', imdm='tiny-imdm', evaluator='tiny-ar',
      sets={'mdlm': _steps(1000, 500),
            'imdm': _steps(300),
            'evaluator': _steps(1000, 500),
            'sdtt': ('sdtt.base_steps=128', 'sdtt.num_rounds=4', 'sdtt.round_steps=125',
                     'optim.lr=1e-4', 'optim.warmup_steps=10', 'train.eval_every=250',
                     'train.ckpt_every=125'),
            'couplings': ('redi.num_pairs=1024', 'redi.sampler_steps=32',
                          'train.batch_size=128'),
            'redi': ('optim.lr=3e-4', 'optim.warmup_steps=50') + _steps(400, 200),
            'redi_only': ('redi.ignore_seed=true',),
            'reflow': ('redi.fix_eps=true',)})


def _paper(sdtt_batch: int, datagen_batch: int) -> dict:
  """The official scripts' stages (Ugness/IMDM `scripts/`; docs/results_text.md lists each
  number against its script): IM-SDTT 7 rounds x 10k steps at 6e-5 (warm-up 500, EMA 0.9999,
  clip 1, 16 rows a device micro-batch), couplings 100k pairs from a 1024-step ancestral
  teacher, ReDi 50k steps at 3e-4 with batch 512 (the default 2500 warm-up), the ReDi-only arm
  60k steps on MDLM couplings with fresh eps."""
  return {
      'sdtt': ('optim.lr=6e-5', 'optim.warmup_steps=500', 'optim.ema_decay=0.9999',
               'optim.grad_clip=1.0', f'train.batch_size={sdtt_batch}', 'sdtt.base_steps=1024',
               'sdtt.num_rounds=7', 'sdtt.round_steps=10000', 'sdtt.divergence=kl-bwd',
               'sdtt.stratum_rows=16', 'train.eval_every=10000', 'train.ckpt_every=5000'),
      'couplings': ('redi.num_pairs=100000', 'redi.sampler_steps=1024', 'redi.temperature=1.0',
                    f'train.batch_size={datagen_batch}'),
      'redi': ('optim.lr=3e-4', 'optim.warmup_steps=2500', 'optim.ema_decay=0.9999',
               'train.batch_size=512', 'train.num_steps=50000', 'train.eval_every=10000',
               'train.ckpt_every=5000'),
      'redi_only': ('redi.ignore_seed=true', 'train.num_steps=60000'),
      'reflow': ('redi.fix_eps=true',),
  }


@_preset
def lm1b() -> Study:
  """`python -m experiments.text --preset lm1b --set evaluator=runs/gpt2-large` — the paper's LM1B
  recipe on an accelerator: `lm1b-small` (packed, soft-cap 50) for 1M steps, its IMDM, and the
  official distillation stages (`_paper`); 1024 samples a cell scored by GPT-2 Large (converted
  with convert.py). LM1B must be built once (`lm1b-small`'s docstring). Table 4 of the paper: 2-step
  Gen PPL after SDTT -> ReDi 353.90 (MDLM) against 165.85 (IMDM); 55.36 against 52.51 at 16."""
  sets = _paper(sdtt_batch=32, datagen_batch=128)
  sets.update({'mdlm': (), 'imdm': ('train.num_steps=100000',)})
  return Study(mdlm='lm1b-small', imdm='lm1b-small-imdm', evaluator='runs/gpt2-large', sets=sets,
               num_samples=1024, sample_batch=64, gen_ppl_protocol='official')


@_preset
def owt() -> Study:
  """`python -m experiments.text --preset owt --set all:data.source='text:/data/owt/*.jsonl'
  --set evaluator=runs/gpt2-large` — the paper's OpenWebText recipe (`owt-small`, L = 1024,
  D = 2048, no soft-cap; SDTT batch 128, couplings in chunks of 32); 1024 samples a cell. To start
  from the released MDLM instead of training one, convert it (docs/conversion.md) into
  `OUT/mdlm/base` and write `OUT/mdlm/base/stage.json` as `{"stage": "mdlm/base", "seconds": 0}`."""
  sets = _paper(sdtt_batch=128, datagen_batch=32)
  sets.update({'mdlm': (), 'imdm': ('train.num_steps=100000',)})
  return Study(mdlm='owt-small', imdm='owt-small-imdm', evaluator='runs/gpt2-large', sets=sets,
               num_samples=1024, sample_batch=32, gen_ppl_protocol='official')


def _parse_scalar(field: dataclasses.Field, text: str):
  if field.type == 'tuple[int, ...]':
    return tuple(int(v) for v in text.split(','))
  return {'int': int, 'str': str}[field.type](text)


def resolve(name: str, overrides: list[str]) -> Study:
  if name not in PRESETS:
    raise UserError(f'--preset {name!r}: expected one of {", ".join(PRESETS)}')
  study = PRESETS[name]()
  scalars = {f.name: f for f in dataclasses.fields(Study) if f.name != 'sets'}
  for item in overrides:
    key, sep, text = item.partition('=')
    stage, colon, cfg_key = key.partition(':')
    if colon:
      if stage not in STAGES or '.' not in cfg_key or not sep:
        raise UserError(f'--set {item!r}: expected STAGE:section.key=value with STAGE one of '
                        f'{", ".join(STAGES)}')
      sets = dict(study.sets)
      sets[stage] = sets.get(stage, ()) + (f'{cfg_key}={text}',)
      study = dataclasses.replace(study, sets=sets)
      continue
    if not sep or key not in scalars:
      raise UserError(f'--set {item!r}: expected field=value with field one of '
                      f'{", ".join(scalars)}, or STAGE:section.key=value')
    try:
      study = dataclasses.replace(study, **{key: _parse_scalar(scalars[key], text)})
    except ValueError:
      raise UserError(f'--set {item!r}: not a valid {scalars[key].type}') from None
  if not study.eval_steps or min(study.eval_steps) < 1:
    raise UserError(f'eval_steps={study.eval_steps}: expected step counts >= 1')
  if study.num_samples < 1 or study.sample_batch < 1 or study.num_samples % study.sample_batch:
    raise UserError(f'num_samples={study.num_samples} must be a positive multiple of '
                    f'sample_batch={study.sample_batch}')
  if study.gen_ppl_protocol not in ('official', 'ours'):
    raise UserError(f'gen_ppl_protocol={study.gen_ppl_protocol!r}: expected official or ours')
  if study.reflow_rounds < 1:
    raise UserError(f'reflow_rounds={study.reflow_rounds}: expected >= 1')
  if study.imdm_start not in ('mdlm', 'imdm'):
    raise UserError(f'imdm_start={study.imdm_start!r}: expected mdlm or imdm')
  return study
