"""Every run is a source for every consumer: what `train.py`, `distill.py sdtt / redi-train /
redi` and `convert.py` write is read by `sample.py --checkpoint`, `--teacher`, `--init` and
`--init_from`, each taking the run's EMA weights (the student's, for an SDTT run)."""

import os

import chex
import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

import distill
from imdm_jax import (checkpoint, config as config_lib, convert, couplings, distillation,
                      generation, init_from, sampler, sharding, train_state, trainer)
from imdm_jax.errors import UserError

from helpers import replaced
from torch_weights import params_to_torch

PRODUCERS = ('train', 'sdtt', 'redi-train', 'redi', 'convert')
SHORT = dict(num_steps=2, ckpt_every=2, eval_every=1000, eval_batches=1, log_every=1)


def _cfg(data_dir):
  cfg = config_lib.resolve('micro', [f'data.data_dir={data_dir}', 'model.dropout=0.0',
                                     'sdtt.round_steps=1', 'sdtt.num_rounds=2',
                                     'redi.num_pairs=16', 'redi.sampler_steps=2'])
  return replaced(cfg, train=SHORT)


@pytest.fixture(scope='module')
def runs(tmp_path_factory, data_dir):
  """One run of each producer, each made from the one before it (so the chain train -> SDTT ->
  ReDi couplings -> ReDi training -> ReDi rounds is itself exercised end to end)."""
  cfg, root = _cfg(data_dir), tmp_path_factory.mktemp('sources')
  path = lambda name: str(root / name)
  trainer.train(cfg, path('train'))
  trainer.train(cfg, path('sdtt'), init_from=path('train'), program=distillation.sdtt_program(cfg))
  pairs = couplings.generate(cfg, path('sdtt'), path('pairs'))  # --teacher: an SDTT run
  trainer.train(cfg, path('redi-train'), init_from=path('sdtt'),  # --init: an SDTT run
                program=distillation.redi_program(pairs))
  distill.main(['redi', '--preset', 'micro', '--teacher', path('redi-train'), '--workdir',
                path('redi'), *[a for s in (f'data.data_dir={data_dir}', 'train.num_steps=2',
                                            'train.eval_batches=1', 'redi.num_pairs=16',
                                            'redi.sampler_steps=2') for a in ('--set', s)]])
  ema = init_from.load_weights(path('train'), sharding.make_mesh(cfg.mesh)).params
  save_file(params_to_torch(jax.device_get(ema)), path('weights.safetensors'))
  convert.convert(path('weights.safetensors'), path('convert'), preset='micro',
                  overrides=[f'data.data_dir={data_dir}', 'model.dropout=0.0'])
  return cfg, root


def _saved_state(path: str, cfg, mesh):
  """The whole state the run's latest checkpoint holds (what its weights are read from)."""
  ckpt = checkpoint.Checkpointer(init_from.checkpoint_dir(path))
  sdtt_run = 'student' in ckpt.state_keys()
  program = distillation.sdtt_program(cfg) if sdtt_run else trainer.TRAIN
  state = ckpt.restore(program.abstract(ckpt.saved_config(), mesh))
  ckpt.close()
  return state, sdtt_run


@pytest.mark.parametrize('producer', PRODUCERS)
def test_every_run_gives_its_ema_weights(runs, producer):
  cfg, root = runs
  mesh = sharding.make_mesh(cfg.mesh)
  weights = init_from.load_weights(str(root / producer), mesh)
  state, sdtt_run = _saved_state(str(root / producer), cfg, mesh)
  expected = state.student.ema if sdtt_run else state.ema
  chex.assert_trees_all_equal(jax.device_get(weights.params), jax.device_get(expected))
  assert sdtt_run == (producer == 'sdtt')
  assert ("student's EMA" in weights.what) == sdtt_run
  if producer == 'redi':  # the ReDi workdir: its last round
    assert f'{os.sep}round0{os.sep}' in weights.what
  if producer == 'convert':  # the converted weights are the train run's EMA, exactly
    train = init_from.load_weights(str(root / 'train'), mesh).params
    chex.assert_trees_all_equal(jax.device_get(weights.params), jax.device_get(train))


def test_a_part_the_checkpoint_lacks_is_refused_not_returned_as_placeholders(runs):
  cfg, root = runs
  ckpt = checkpoint.Checkpointer(init_from.checkpoint_dir(str(root / 'sdtt')))
  abstract = train_state.abstract_state(cfg, sharding.make_mesh(cfg.mesh)).ema
  with pytest.raises(UserError, match='holds no ema'):
    ckpt.restore_part(('ema',), abstract)  # an SDTT checkpoint keeps it under student/
  ckpt.close()


@pytest.mark.parametrize('workdir,program', [('train', 'sdtt'), ('sdtt', 'train')])
def test_a_workdir_of_another_program_is_refused_in_one_line(runs, workdir, program):
  """`distill.py sdtt --workdir` on a train run (and train.py on an SDTT run): one line naming
  what the checkpoint lacks, and the run left as it was."""
  cfg, root = runs
  ckpts = root / workdir / 'checkpoints'
  before = sorted(os.listdir(ckpts))
  prog = distillation.sdtt_program(cfg) if program == 'sdtt' else trainer.TRAIN
  with pytest.raises(UserError, match='written by another program'):
    trainer.train(replaced(cfg, train=dict(num_steps=4)), str(root / workdir),
                  init_from=str(root / 'train'), program=prog)
  assert sorted(os.listdir(ckpts)) == before


def test_an_sdtt_run_samples(runs, tmp_path):
  cfg, root = runs
  summary = generation.run(generation.Request(
      checkpoint=str(root / 'sdtt'), steps=(2,), num_samples=8, out=str(tmp_path),
      scfg=sampler.SamplerConfig()))
  assert summary['results'][0]['num_samples'] == 8


@pytest.mark.slow
@pytest.mark.parametrize('producer', PRODUCERS)
def test_every_consumer_takes_every_run(runs, producer, tmp_path):
  """sample.py, --teacher (SDTT and ReDi couplings) and --init_from / --init on each producer."""
  cfg, root = runs
  source = str(root / producer)
  generation.run(generation.Request(checkpoint=source, steps=(2,), num_samples=8,
                                    out=str(tmp_path / 'samples'), scfg=sampler.SamplerConfig()))
  couplings.generate(cfg, source, str(tmp_path / 'pairs'))
  one = replaced(cfg, train=dict(num_steps=1, ckpt_every=1))
  trainer.train(one, str(tmp_path / 'sdtt'), init_from=source,
                program=distillation.sdtt_program(one))
  summary = trainer.train(one, str(tmp_path / 'init'), init_from=source)
  assert summary.step == 1 and np.isfinite(summary.val_ppl)
