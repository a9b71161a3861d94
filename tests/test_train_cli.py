"""`train.py` end to end: a short run, an automatic resume, and one-line errors with exit 2."""

import json
import os
import shutil

import pytest

from imdm_jax import config as config_lib, trainer

from helpers import assert_one_line_error, run_script


def _train(*args, data_dir):
  return run_script('train.py', '--preset', 'micro', '--set', f'data.data_dir={data_dir}', *args)


def _logged_steps(workdir):
  """The steps with a training-loss record in metrics.jsonl, in the order they were written."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r['step'] for r in map(json.loads, f) if 'train/loss' in r]


def test_train_then_resume(tmp_path, data_dir):
  """A fresh run trains from step 1 and stops at train.num_steps; run again with more steps, it
  resumes from its last checkpoint (no step trained twice)."""
  workdir = str(tmp_path / 'run')
  first = _train('--workdir', workdir, '--set', 'train.num_steps=4', '--set', 'train.ckpt_every=2',
                 '--set', 'train.log_every=1', data_dir=data_dir)
  assert first.returncode == 0, first.stderr[-2000:]
  assert _logged_steps(workdir) == [1, 2, 3, 4]
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']
  second = _train('--workdir', workdir, '--set', 'train.num_steps=6', '--set', 'train.log_every=1',
                  data_dir=data_dir)
  assert second.returncode == 0, second.stderr[-2000:]
  assert _logged_steps(workdir) == [1, 2, 3, 4, 5, 6]  # resumed at step 4
  steps = [json.loads(line)['step'] for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert max(steps) == 6 and 4 in steps
  saved = json.load(open(os.path.join(workdir, 'config.json')))
  assert saved['train']['num_steps'] == 6 and saved['model']['hidden_size'] == 32
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['4', '6']


@pytest.mark.parametrize('args,message', [
    (['--preset', 'nonesuch'], "unknown preset 'nonesuch'"),
    (['--set', 'train.batch_size=ten'], "train.batch_size: expected int, got 'ten'"),
    (['--set', 'optim.nope=1'], "unknown key 'nope'"),
    (['--set', 'optim.decay_steps=5'], 'optim.decay_steps=5 must exceed optim.warmup_steps'),
    (['--set', 'train.batch_size=3'], 'train.batch_size=3 is not divisible by the 2 devices'),
    (['--set', 'data.source=text:/nonexistent/*.txt'], 'no files match'),
    (['--workdir', 'gs://bucket/run'], '--workdir gs://bucket/run: remote URLs are not supported'),
    (['--set', 'data.data_dir=gs://bucket/data'], "data.data_dir='gs://bucket/data': remote URLs"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, data_dir, args, message):
  result = _train('--workdir', str(tmp_path / 'w'), *args, data_dir=data_dir)
  assert_one_line_error(result, message)
  assert not os.path.exists(tmp_path / 'w')  # a refusal leaves no empty workdir behind


def _truncate(path):
  with open(path, 'r+b') as f:
    f.truncate(max(os.path.getsize(path) // 2, 1) - 1)


def _damage_data(step_dir):
  data = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, 'state', 'd'))
          for f in fs]
  for f in data:
    _truncate(f)


@pytest.mark.parametrize('damage', [
    _damage_data,
    pytest.param(lambda step_dir: os.remove(os.path.join(step_dir, 'state', '_METADATA')),
                 marks=pytest.mark.slow),
    lambda step_dir: _truncate(os.path.join(step_dir, 'config', 'metadata')),
    pytest.param(lambda step_dir: shutil.rmtree(os.path.join(step_dir, 'state')),
                 marks=pytest.mark.slow),
], ids=['truncated-data', 'no-state-metadata', 'truncated-config', 'no-state'])
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path, data_dir, damage):
  """The latest checkpoint damaged on disk: the rerun names it, sets it aside as STEP.damaged
  and resumes from the intact one before it."""
  workdir = str(tmp_path / 'run')
  common = ('--workdir', workdir, '--set', 'train.ckpt_every=2', '--set', 'train.log_every=1')
  assert _train(*common, '--set', 'train.num_steps=4', data_dir=data_dir).returncode == 0
  damage(os.path.join(workdir, 'checkpoints', '4'))
  again = _train(*common, '--set', 'train.num_steps=6', data_dir=data_dir)
  assert again.returncode == 0, again.stderr[-2000:]
  assert 'checkpoint 4 in' in again.stderr and 'is damaged' in again.stderr
  assert _logged_steps(workdir) == [1, 2, 3, 4, 3, 4, 5, 6]  # resumed at step 2
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['4', '4.damaged', '6']


def test_divergence_stops_in_one_line_and_keeps_the_finite_checkpoints(tmp_path, data_dir):
  """lr 1e6 reaches a non-finite loss within a few steps: the run stops there with one line and
  a non-zero status, metrics.jsonl stays strict JSON (null, not NaN), and every checkpoint left
  is one saved before the divergence (none holds a NaN)."""
  workdir = tmp_path / 'run'
  result = _train('--workdir', str(workdir), '--set', 'optim.lr=1e6', '--set',
                  'optim.warmup_steps=1', '--set', 'train.num_steps=40', '--set',
                  'train.ckpt_every=1', '--set', 'train.log_every=1', data_dir=data_dir)
  assert_one_line_error(result, 'diverged at step')
  records = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]  # strict: no NaN
  bad = [r['step'] for r in records
         if 'train/loss' in r and None in (r['train/loss'], r['train/grad_norm'])]
  assert bad, records
  kept = [int(s) for s in os.listdir(workdir / 'checkpoints') if s.isdigit()]
  assert kept and max(kept) < bad[0]
  assert f'the last checkpoint (step {max(kept)}) is intact' in result.stderr


def test_a_second_run_on_a_busy_workdir_is_refused(tmp_path):
  """The workdir lock: held for the run, refused to a second holder, released afterwards."""
  from imdm_jax import files  # pylint: disable=g-import-not-at-top
  from imdm_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  with files.locked(str(tmp_path)):
    with pytest.raises(UserError, match=f'{tmp_path} is in use by another run \\(pid {os.getpid()}'):
      with files.locked(str(tmp_path)):
        pass
  with files.locked(str(tmp_path)):  # released
    pass


@pytest.mark.slow
def test_tiny_preset_beats_unigram_perplexity(tmp_path):
  """The default job: about 6 minutes on 2 cores."""
  cfg = config_lib.resolve('tiny')
  summary = trainer.train(cfg, str(tmp_path))
  unigram = trainer.unigram_baseline(cfg)
  print(f'tiny: validation NELBO perplexity {summary.val_ppl:.1f}, unigram {unigram:.1f}')
  assert summary.val_ppl < 0.5 * unigram
