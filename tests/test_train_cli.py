"""`train.py` end to end: a short run, an automatic resume, and one-line errors with exit 2."""

import json
import os
import subprocess
import sys

import pytest

from imdm_jax import config as config_lib, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(*args, data_dir):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2', JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, 'train.py', '--preset', 'micro',
                         '--set', f'data.data_dir={data_dir}', *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_train_then_resume(tmp_path, data_dir):
  workdir = str(tmp_path / 'run')
  first = _train('--workdir', workdir, '--set', 'train.num_steps=4', '--set', 'train.ckpt_every=2',
                 data_dir=data_dir)
  assert first.returncode == 0, first.stderr[-2000:]
  assert 'fresh start' in first.stdout and 'done: step 4' in first.stdout
  second = _train('--workdir', workdir, '--set', 'train.num_steps=6', data_dir=data_dir)
  assert second.returncode == 0, second.stderr[-2000:]
  assert 'resuming at step 4' in second.stdout and 'done: step 6' in second.stdout
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
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith('error: ') and message in lines[-1], result.stderr[-1000:]
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints' / '1')


@pytest.mark.slow
def test_tiny_preset_beats_unigram_perplexity(tmp_path):
  """The default job: about 6 minutes on 2 cores."""
  cfg = config_lib.resolve('tiny')
  summary = trainer.train(cfg, str(tmp_path))
  unigram = trainer.unigram_baseline(cfg)
  print(f'tiny: validation NELBO perplexity {summary.val_ppl:.1f}, unigram {unigram:.1f}')
  assert summary.val_ppl < 0.5 * unigram
