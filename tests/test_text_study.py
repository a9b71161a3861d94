"""The text study (`python -m experiments.text`): its micro preset end to end and resumed, its
settings, the target check, and the paper presets against the library's distillation presets."""

import dataclasses
import json
import os

import pytest

from imdm_jax import config as config_lib, distillation
from imdm_jax.errors import UserError

from experiments.text import report, settings, study


def test_micro_study_runs_every_arm_and_resumes_without_redoing_a_stage(data_dir, tmp_path):
  s = settings.resolve('micro', [f'all:data.data_dir={data_dir}'])
  out = str(tmp_path / 'study')
  logged = []
  results = study.run(s, out, 'test', log=logged.append)
  assert list(results['arms']) == list(settings.ARMS)  # every arm, in the tables' order
  for arm, scores in results['arms'].items():
    assert sorted(scores, key=int) == [str(k) for k in s.eval_steps], arm
    for cell in scores.values():
      assert cell['gen_ppl_ci'][0] <= cell['gen_ppl'] <= cell['gen_ppl_ci'][1]
      assert cell['entropy_ci'][0] <= cell['entropy'] <= cell['entropy_ci'][1]
  assert set(results['diagnostics']) == {a for a in settings.ARMS if a.startswith('imdm/')}
  # the official start: IM-SDTT and the IMDM's ReDi-only arm start from the MDLM base, whose
  # couplings the MDLM's ReDi arm shares
  assert sorted(os.listdir(os.path.join(out, 'couplings'))) == ['imdm', 'mdlm']
  assert sorted(os.listdir(os.path.join(out, 'couplings', 'mdlm'))) == ['base', 'sdtt']
  table = open(os.path.join(out, 'results.md')).read()
  assert all(f'| {arm} |' in table for arm in settings.ARMS)
  assert os.path.exists(os.path.join(out, 'results.png'))

  logged.clear()
  again = study.run(s, out, 'test', log=logged.append)
  assert again['arms'] == results['arms']
  stages = [line for line in logged if line.startswith('[')]
  assert stages and all(line.endswith(')') and 'done before' in line for line in stages), stages

  # the extension: a second ReDi round adds its stages and arms, and keeps everything else
  logged.clear()
  more = study.run(dataclasses.replace(s, reflow_rounds=2), out, 'test', log=logged.append)
  new = [line for line in logged if line.startswith('[') and 'done before' not in line]
  assert new == ['[couplings/mdlm/sdtt+redi] ...', '[mdlm/sdtt+redi2] ...',
                 '[couplings/imdm/sdtt+redi] ...', '[imdm/sdtt+redi2] ...',
                 '[samples/mdlm/sdtt+redi2] ...', '[samples/imdm/sdtt+redi2] ...'], new
  assert list(more['arms']) == list(settings.ARMS) + ['mdlm/sdtt+redi2', 'imdm/sdtt+redi2']
  assert all(more['arms'][a] == results['arms'][a] for a in settings.ARMS)


def test_settings_overrides_and_refusals():
  s = settings.resolve('cpu', ['num_samples=512', 'eval_steps=1,2', 'sdtt:optim.lr=3e-5',
                               'all:data.data_dir=/x'])
  assert s.num_samples == 512 and s.eval_steps == (1, 2)
  cfg = study.stage_config(s, 'imdm', 'sdtt')
  assert cfg.optim.lr == 3e-5 and cfg.data.data_dir == '/x' and cfg.model.noise_dim == 64
  assert study.stage_config(s, 'mdlm', 'redi_only').redi.ignore_seed
  for bad, message in [('bogus=1', 'expected field=value'), ('nope:optim.lr=1', 'STAGE one of'),
                       ('num_samples=100', 'multiple of'), ('eval_steps=0', 'step counts'),
                       ('num_samples=x', 'not a valid int'), ('imdm_start=both', 'mdlm or imdm')]:
    with pytest.raises(UserError, match=message):
      settings.resolve('cpu', [bad])
  with pytest.raises(UserError, match='unknown key'):
    study.stage_config(settings.resolve('cpu', ['sdtt:optim.nope=1']), 'mdlm', 'sdtt')


@pytest.mark.parametrize('preset,sdtt_preset,redi_preset', [
    ('lm1b', 'lm1b-sdtt-imdm', 'lm1b-redi-imdm')])
def test_paper_stages_are_the_library_presets(preset, sdtt_preset, redi_preset):
  """The study's IMDM stages on LM1B are the documented `distill.py` presets, value for value
  (both follow the official scripts: docs/results_text.md lists each number)."""
  s = settings.resolve(preset, [])
  ignore = lambda cfg: dataclasses.replace(cfg, train=dataclasses.replace(
      cfg.train, num_steps=0, log_every=1, eval_every=1, ckpt_every=1))
  sdtt_cfg = distillation.sdtt_config(study.stage_config(s, 'imdm', 'sdtt'))
  assert sdtt_cfg.train.num_steps == 70_000
  assert ignore(sdtt_cfg).optim == config_lib.resolve(sdtt_preset).optim
  assert ignore(sdtt_cfg).sdtt == config_lib.resolve(sdtt_preset).sdtt
  assert ignore(sdtt_cfg).model == config_lib.resolve(sdtt_preset).model
  assert sdtt_cfg.train.batch_size == config_lib.resolve(sdtt_preset).train.batch_size
  redi_cfg = study.stage_config(s, 'imdm', 'redi')
  library = config_lib.resolve(redi_preset)
  assert (redi_cfg.optim, redi_cfg.model, redi_cfg.train.batch_size, redi_cfg.train.num_steps) == (
      library.optim, library.model, library.train.batch_size, library.train.num_steps)
  only = study.stage_config(s, 'imdm', 'redi_only')
  assert only.redi.ignore_seed and only.train.num_steps == 60_000
  pairs = study.stage_config(s, 'mdlm', 'couplings').redi
  assert (pairs.num_pairs, pairs.sampler_steps) == (100_000, 1024)
  assert study.stage_config(s, 'mdlm', 'base').data.wrap  # LM1B packed, as every official script
  assert study.stage_config(s, 'mdlm', 'base').model.attn_softcap == 50.0


def _cell(ppl, low, high, entropy):
  return {'gen_ppl': ppl, 'gen_ppl_ci': [low, high], 'entropy': entropy, 'entropy_ci': [0, 9],
          'network_calls_per_batch': 1.0}


@pytest.mark.parametrize('imdm_2,imdm_entropy,imdm_16,met', [
    ((100.0, 90.0, 110.0), 4.0, 52.0, True),
    ((100.0, 90.0, 195.0), 4.0, 52.0, False),  # intervals overlap
    ((110.0, 100.0, 120.0), 4.0, 52.0, False),  # ratio 0.55
    ((100.0, 90.0, 110.0), 3.7, 52.0, False),  # entropy 7.5 % lower
    ((100.0, 90.0, 110.0), 4.0, 60.0, False),  # 20 % apart at 16 steps
])
def test_target(imdm_2, imdm_entropy, imdm_16, met):
  results = {'arms': {
      'mdlm/sdtt+redi': {'2': _cell(200.0, 190.0, 210.0, 4.0), '16': _cell(50.0, 45, 55, 4.0)},
      'imdm/sdtt+redi': {'2': _cell(*imdm_2, imdm_entropy), '16': _cell(imdm_16, 45, 65, 4.0)}}}
  assert report.target(results)['met'] == met
  assert report.target({'arms': {}}) is None


def test_render_refuses_a_directory_without_results(tmp_path):
  with pytest.raises(UserError, match='no results.json to render'):
    report.render(str(tmp_path))
  (tmp_path / 'results.json').write_text(json.dumps({
      'command': 'c', 'evaluator': 'e', 'study': {'num_samples': 1},
      'arms': {'mdlm/base': {'1': _cell(10.0, 9.0, 11.0, 2.0)}}}))
  report.render(str(tmp_path))
  assert '| mdlm/base | 10.0 [9.0, 11.0] / 2.00 |' in (tmp_path / 'results.md').read_text()
