"""The text study, stage by stage: bases, distillation, couplings, rectification, then every arm
sampled and scored at every step count.

Each stage writes into its own directory under `--out` and is skipped once it has finished (a
`stage.json` beside its outputs); a killed stage resumes where it stopped, as every program of
the library does (training and distillation from their last checkpoint, coupling generation from
its next missing chunk). The arms' scores go to `results.json` as each arm finishes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time
from typing import Callable

import jax

from imdm_jax import config as config_lib, couplings, distillation, generation, sampler, trainer
from imdm_jax.checkpoint import write_json_atomic
from imdm_jax.config import Config

from experiments.text import diagnose, report
from experiments.text.settings import ARMS, FAMILIES, Study


def stage_config(study: Study, family: str, stage: str) -> Config:
  """The config of one stage of one family: its base preset with the stage's overrides."""
  preset = study.evaluator if stage == 'evaluator' else getattr(study, family)
  return config_lib.resolve(preset, study.stage_sets(family if stage == 'base' else stage))


class Stages:
  """Runs stages once: `run(name, fn)` calls `fn(directory)` unless `name` finished before."""

  def __init__(self, out: str, log: Callable[[str], None]):
    self.out, self.log, self.seconds = out, log, {}

  def dir(self, name: str) -> str:
    return os.path.join(self.out, *name.split('/'))

  def run(self, name: str, fn: Callable[[str], object]) -> str:
    where = self.dir(name)
    marker = os.path.join(where, 'stage.json')
    if os.path.exists(marker):
      with open(marker) as f:
        self.seconds[name] = json.load(f)['seconds']
      self.log(f'[{name}] done before ({where})')
      return where
    self.log(f'[{name}] ...')
    os.makedirs(where, exist_ok=True)
    t0 = time.time()
    fn(where)
    self.seconds[name] = round(time.time() - t0)
    write_json_atomic(marker, {'stage': name, 'seconds': self.seconds[name]})
    return where


def reflow_arm(family: str, round_: int) -> str:
  """The SDTT -> ReDi arm after `round_` rounds of ReDi (round 1 is the paper's arm)."""
  return f'{family}/sdtt+redi' + (str(round_) if round_ > 1 else '')


def arms(study: Study) -> tuple[str, ...]:
  return ARMS + tuple(reflow_arm(f, k) for f in FAMILIES for k in range(2, study.reflow_rounds + 1))


def _same_protocol(a: dict | None, b: dict) -> bool:
  """Arms scored under study `a` stand under `b` unless a stage or the sampling differs (more
  reflow rounds only add arms)."""
  def drop(d):  # compared as JSON: tuples read back as lists
    d = {k: v for k, v in json.loads(json.dumps(d)).items() if k != 'reflow_rounds'}
    d.setdefault('gen_ppl_protocol', 'ours')  # results from before the field scored by ours
    d['sets'] = {k: v for k, v in d['sets'].items() if k != 'reflow'}
    return d
  return a is not None and drop(a) == drop(b)


def _train(cfg: Config, init_from: str | None = None, program=trainer.TRAIN):
  return lambda where: trainer.train(cfg, where, init_from=init_from, program=program)


def _commit() -> str:
  """The repository's commit (with `+changes` when the tree differs from it), or '' outside git."""
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    rev = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=here, capture_output=True,
                         text=True, check=True).stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=here,
                           capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return ''
  return rev + ('+changes' if dirty else '')


def run(study: Study, out: str, command: str, log=print) -> dict:
  """Every stage of `study` in `out`; returns (and writes) the results."""
  os.makedirs(out, exist_ok=True)
  start = time.time()
  stages = Stages(out, log)
  cfg = {f: {s: stage_config(study, f, s) for s in ('base', 'sdtt', 'redi', 'couplings')}
         for f in FAMILIES}
  cfg['imdm']['redi_only'] = stage_config(study, 'imdm', 'redi_only')
  for f in FAMILIES:
    cfg[f]['reflow'] = stage_config(study, f, 'reflow')
  evaluator = study.evaluator
  if '/' not in evaluator:  # a preset: trained here, on the study's data
    evaluator_cfg = stage_config(study, 'mdlm', 'evaluator')
    evaluator = stages.run('evaluator', _train(evaluator_cfg))
  runs = {'mdlm/base': stages.run('mdlm/base', _train(cfg['mdlm']['base']))}
  runs['imdm/base'] = stages.run('imdm/base', _train(cfg['imdm']['base'], runs['mdlm/base']))
  origin = {'mdlm': 'mdlm/base', 'imdm': f'{study.imdm_start}/base'}  # where distillation starts
  for f in FAMILIES:
    sdtt_cfg = distillation.sdtt_config(cfg[f]['sdtt'])
    runs[f'{f}/sdtt'] = stages.run(f'{f}/sdtt', _train(
        sdtt_cfg, runs[origin[f]], distillation.sdtt_program(sdtt_cfg)))

  def rectify(arm: str, teacher: str, student_cfg: Config, stage: str = 'couplings',
              round_: int = 1) -> None:
    """ReDi from the run `teacher` (a stage name): its couplings (made once, shared by the arms
    that start there; round k draws fresh seeds), then the student, initialised from the
    teacher."""
    pair_cfg = cfg[teacher.split('/')[0]][stage]  # how many pairs, the teacher's sampler
    offset = (round_ - 1) * pair_cfg.redi.num_pairs
    pairs = stages.run(f'couplings/{teacher}', lambda where: couplings.generate(
        pair_cfg, runs[teacher], where, seed_offset=offset))
    runs[arm] = stages.run(arm, _train(student_cfg, runs[teacher],
                                       distillation.redi_program(pairs)))

  rectify('mdlm/redi', 'mdlm/base', cfg['mdlm']['redi'])
  rectify('imdm/redi', origin['imdm'], cfg['imdm']['redi_only'])
  for f in FAMILIES:
    rectify(f'{f}/sdtt+redi', f'{f}/sdtt', cfg[f]['redi'])
    for k in range(2, study.reflow_rounds + 1):  # the extension: more rounds of ReDi
      rectify(reflow_arm(f, k), reflow_arm(f, k - 1), cfg[f]['redi'], 'reflow', k)

  path = os.path.join(out, 'results.json')
  results = {'command': command, 'commit': _commit(), 'study': dataclasses.asdict(study),
             'evaluator': evaluator, 'runs': runs, 'arms': {}, 'diagnostics': {}}
  if os.path.exists(path):  # arms scored by an earlier, interrupted run
    with open(path) as f:
      earlier = json.load(f)
    if _same_protocol(earlier.get('study'), results['study']):
      results['arms'], results['diagnostics'] = earlier['arms'], earlier.get('diagnostics', {})
      stages.seconds = {**earlier.get('seconds', {}), **stages.seconds}
  # the target's two arms first: an interrupted study has its headline comparison soonest
  order = sorted(arms(study), key=lambda a: a not in report.TARGET_ARMS)
  for arm in order:
    if arm in results['arms']:
      log(f'[samples/{arm}] done before ({path})')
      continue
    log(f'[samples/{arm}] ...')
    t0 = time.time()
    summary = generation.run(generation.Request(
        checkpoint=runs[arm], steps=study.eval_steps, num_samples=study.num_samples,
        seed=study.seed, batch_size=study.sample_batch, out=stages.dir(f'samples/{arm}'),
        evaluator=evaluator, scfg=sampler.SamplerConfig(), protocol=study.gen_ppl_protocol))
    results['arms'][arm] = {str(r['steps']): {k: r[k] for k in (
        'gen_ppl', 'gen_ppl_ci', 'entropy', 'entropy_ci', 'network_calls_per_batch')}
        for r in summary['results']}
    if arm.startswith('imdm/'):
      results['diagnostics'][arm] = diagnose.noise_path(runs[arm], study.seed)
    stages.seconds[f'samples/{arm}'] = round(time.time() - t0)
    results['seconds'] = dict(stages.seconds)
    write_json_atomic(path, results)
  results['arms'] = {a: results['arms'][a] for a in arms(study)}
  results['seconds'] = dict(stages.seconds)
  results['total_seconds'] = sum(stages.seconds.values())
  results['wall_seconds_this_call'] = round(time.time() - start)
  results['target'] = report.target(results)
  write_json_atomic(path, results)
  results = json.loads(json.dumps(results))  # as an interrupted run reads it back
  report.render(out)
  if jax.process_index() == 0:
    log(f'done in {results["wall_seconds_this_call"]} s (stages: {results["total_seconds"]} s): '
        f'{out}/results.json, results.md, results.png')
  return results
