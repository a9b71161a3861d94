"""Checkpoints: exact round trip, exact resumption, refusal to mix architectures."""

import os

import jax
import numpy as np
import pytest

from imdm_jax import checkpoint, config as config_lib, sharding, train_state, trainer
from imdm_jax.data import pipeline, store
from imdm_jax.errors import UserError

from helpers import replaced


def _short(cfg, **train):
  return replaced(cfg, train=dict(eval_every=1000, eval_batches=1, log_every=2, **train))


def _restore(cfg, workdir, step=None):
  """(state, next batch) of the checkpoint in workdir."""
  data = store.prepare(cfg)
  mesh = sharding.make_mesh(cfg.mesh)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'))
  it = pipeline.train_iterator(data.train, cfg.train.batch_size, cfg.train.seed)
  state = ckpt.restore(train_state.abstract_state(cfg, mesh), it, step)
  return jax.device_get(state), next(it)


def test_save_restore_round_trip_is_exact(micro_cfg, tmp_path):
  mesh = sharding.make_mesh(micro_cfg.mesh)
  state = train_state.init_state(micro_cfg, mesh)
  rows = [{'tokens': np.full((4,), i, np.int32)} for i in range(40)]
  it = pipeline.train_iterator(rows, 8, seed=0)
  next(it)
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(7, state, micro_cfg, it)
  ckpt.wait()
  expected_batch = next(it)
  it2 = pipeline.train_iterator(rows, 8, seed=0)
  restored = ckpt.restore(train_state.abstract_state(micro_cfg, mesh), it2)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))
  assert restored.params['blocks'][0]['attn_qkv']['kernel'].sharding == \
      state.params['blocks'][0]['attn_qkv']['kernel'].sharding
  np.testing.assert_array_equal(next(it2)['tokens'], expected_batch['tokens'])
  assert ckpt.saved_config() == micro_cfg


def test_restart_equals_straight_run(micro_cfg, tmp_path):
  straight, restarted = str(tmp_path / 'a'), str(tmp_path / 'b')
  trainer.train(_short(micro_cfg, num_steps=6, ckpt_every=6), straight)
  trainer.train(_short(micro_cfg, num_steps=4, ckpt_every=2), restarted)
  summary = trainer.train(_short(micro_cfg, num_steps=6, ckpt_every=2), restarted)
  assert summary.step == 6
  state_a, batch_a = _restore(micro_cfg, straight)
  state_b, batch_b = _restore(micro_cfg, restarted)
  jax.tree.map(np.testing.assert_array_equal, state_a, state_b)  # bit-identical
  np.testing.assert_array_equal(batch_a['tokens'], batch_b['tokens'])
  assert int(state_a.step) == 6


def test_different_architecture_is_refused_and_nothing_is_touched(micro_cfg, tmp_path):
  workdir = str(tmp_path)
  trainer.train(_short(micro_cfg, num_steps=2, ckpt_every=2), workdir)
  before = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  other = replaced(micro_cfg, model=dict(n_blocks=3))
  with pytest.raises(UserError, match='model.n_blocks=2'):
    trainer.train(_short(other, num_steps=4), workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == before
  saved = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints')).saved_config()
  assert saved.model == micro_cfg.model


def test_execution_options_may_change_on_resume(micro_cfg, tmp_path):
  """bf16 compute, remat and micro-batches change how the step runs, not the parameters: a run
  may resume under other settings (e.g. on smaller accelerators)."""
  workdir = str(tmp_path)
  trainer.train(_short(micro_cfg, num_steps=2, ckpt_every=2), workdir)
  other = config_lib.apply_overrides(micro_cfg, ['model.dtype=bfloat16', 'model.remat=true',
                                                 'train.grad_accum=2'])
  assert trainer.train(_short(other, num_steps=4, ckpt_every=2), workdir).step == 4
