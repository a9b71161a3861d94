"""The whole synthetic experiment: one MDM base, eight arms, two extensions and a reference, every
arm scored at every step count.

Results are written to `results.json` after every arm (an interrupted run keeps what it finished),
then rendered as `results.md` and `results.png` by `report.py`.
"""

from __future__ import annotations

import dataclasses
import os
import time

from imdm_jax import sharding
from imdm_jax.checkpoint import write_json_atomic
from imdm_jax.config import MeshConfig
from imdm_jax.errors import UserError

from experiments.synthetic import report, task
from experiments.synthetic.arms import Runner, config
from experiments.synthetic.report import ARMS, BALANCED, CONSENSUS, FAMILIES, ORACLE
from experiments.synthetic.settings import Setting

EVAL_SEED = 1234  # the same fresh samples' randomness for every arm


def run(s: Setting, out: str, command: str, only: tuple[str, ...] = (), log=print) -> dict:
  """Every arm, or those named in `only` (the MDM base is always trained and scored)."""
  unknown = sorted(set(only) - set(ARMS))
  if unknown:
    raise UserError(f'--only {",".join(unknown)}: expected arms among {", ".join(ARMS)}')
  try:
    task.oracle_bits(s.vocab, s.noise_dim)
    oracle_reason = ''
  except ValueError as e:
    oracle_reason = str(e)
  if ORACLE in only and oracle_reason:
    raise UserError(f'--only {ORACLE}: {oracle_reason}')

  def wanted(name):
    if (name == BALANCED and not s.balanced_temperature or name == CONSENSUS and
        not s.consensus_refresh or name == ORACLE and oracle_reason):
      return False
    return not only or name in only

  os.makedirs(out, exist_ok=True)
  start = time.time()
  runner = Runner(s, sharding.make_mesh(MeshConfig()), log)
  mdm, imdm = config(s, imdm=False), config(s, imdm=True)
  results = {'command': command, 'setting': dataclasses.asdict(s),
             'ceiling': {str(k): task.mdm_ceiling(k, s.vocab, s.length) for k in s.eval_steps},
             'arms': {}, 'one_step': {}, 'rounds': {}, 'seconds': {}}

  def record(name, cfg, params, t0):
    results['arms'][name] = {str(k): v for k, v in runner.evaluate(cfg, params, EVAL_SEED).items()}
    results['one_step'][name] = runner.one_step(cfg, params, EVAL_SEED)
    results['seconds'][name] = round(time.time() - t0)
    write_json_atomic(os.path.join(out, 'results.json'), results)
    one = results['arms'][name][str(s.eval_steps[0])]
    log(f'{name}: {s.eval_steps[0]}-step constant {one["constant"]:.3f}, '
        f'{one["distinct"]}/{s.vocab} values ({time.time() - t0:.0f} s)')

  def per_round(name, cfg):
    def evaluate(params, r):
      scores = runner.evaluate(cfg, params, EVAL_SEED)
      results['rounds'].setdefault(name, {})[str(r)] = {str(k): v for k, v in scores.items()}
    return evaluate

  t0 = time.time()
  log(f'MDM base: {s.base_steps} NELBO steps')
  base = runner.nelbo(mdm, None, s.base_steps)
  record('mdm/base', mdm, base, t0)
  for family, cfg in zip(FAMILIES, (mdm, imdm)):
    name = lambda method: f'{family}/{method}'
    if wanted(name('nelbo')):
      t0 = time.time()
      record(name('nelbo'), cfg, runner.nelbo(cfg, base, s.budget), t0)
    if wanted(name('sdtt')) or wanted(name('sdtt+redi')):
      t0 = time.time()
      distilled = runner.sdtt(cfg, base)
      if wanted(name('sdtt')):
        record(name('sdtt'), cfg, distilled, t0)
      if wanted(name('sdtt+redi')):
        t0 = time.time()
        params = runner.redi(cfg, cfg, distilled, per_round(name('sdtt+redi'), cfg))
        record(name('sdtt+redi'), cfg, params, t0)
    if wanted(name('redi')):
      t0 = time.time()
      record(name('redi'), cfg, runner.redi(cfg, mdm, base, per_round(name('redi'), cfg)), t0)
  if wanted(BALANCED):
    t0 = time.time()
    params = runner.redi(imdm, mdm, base, per_round(BALANCED, imdm), s.balanced_temperature)
    record(BALANCED, imdm, params, t0)
  if wanted(CONSENSUS):
    t0 = time.time()
    record(CONSENSUS, imdm, runner.consensus(imdm, mdm, base, s.consensus_refresh), t0)
  if wanted(ORACLE):
    t0 = time.time()
    record(ORACLE, imdm, runner.oracle(imdm, base), t0)
  elif oracle_reason and not only:
    log(f'{ORACLE} left out: {oracle_reason}')
  results['total_seconds'] = round(time.time() - start)
  write_json_atomic(os.path.join(out, 'results.json'), results)
  report.render(out)
  log(f'done in {results["total_seconds"]} s: {out}/results.json, results.md, results.png')
  return results

