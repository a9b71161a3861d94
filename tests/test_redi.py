"""ReDi: reproducible couplings, eps read back exactly from seeds, and refusals."""

import dataclasses
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import distill
from imdm_jax import distillation, init_from, noise, redi, sharding, train_state, trainer
from imdm_jax.errors import UserError


def _randomise(path, cfg):
  """Rewrites a run's weights with random ones, so the output depends on every input (incl. eps)."""
  mesh = sharding.make_mesh(cfg.mesh)
  ckpt = trainer.checkpoint.Checkpointer(os.path.join(path, 'checkpoints'))
  state = ckpt.restore(train_state.abstract_state(cfg, cfg.model.vocab_size - 1, mesh))
  leaves, treedef = jax.tree.flatten(state.ema)
  keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
  ema = jax.tree.unflatten(treedef, [x + 0.5 * jax.random.normal(k, x.shape)
                                     for k, x in zip(keys, leaves)])
  ckpt.save(int(state.step) + 1, state.replace(ema=ema, step=state.step + 1), cfg, force=True)
  ckpt.wait()


OVERRIDES = ('model.noise_dim=8', 'model.dropout=0.0', 'train.num_steps=2', 'train.ckpt_every=2',
             'train.eval_batches=1', 'distill.num_pairs=40', 'distill.teacher_steps=1',
             'distill.teacher_final=greedy', 'distill.teacher_fix_eps=true',
             'distill.full_mask_fraction=0.5')


@pytest.fixture(scope='module')
def imdm_teacher(tmp_path_factory, data_dir):
  from imdm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  cfg = config_lib.resolve('micro', [*OVERRIDES, f'data.data_dir={data_dir}'])
  root = tmp_path_factory.mktemp('redi')
  trainer.train(cfg, str(root / 'teacher'))
  _randomise(str(root / 'teacher'), cfg)
  return cfg, root


def _pairs(path):
  rows = []
  for f in sorted(glob.glob(os.path.join(path, 'chunks', '*.npz'))):
    chunk = np.load(f)
    rows.append({k: chunk[k] for k in chunk.files})
  return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def test_couplings_reproduce_and_eps_reads_back_exactly(imdm_teacher):
  cfg, root = imdm_teacher
  a = _pairs(redi.generate(cfg, str(root / 'teacher'), str(root / 'a')))
  b = _pairs(redi.generate(cfg, str(root / 'teacher'), str(root / 'b')))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])  # same seeds, same pairs
  assert len(a['seed']) == 40 and len(set(a['seed'].tolist())) == 40
  assert np.isclose(a['t'], 1.0).mean() > 0.3  # the fully masked share
  c = _pairs(redi.generate(cfg, str(root / 'teacher'), str(root / 'c'), seed_offset=40))
  assert not set(c['seed'].tolist()) & set(a['seed'].tolist())
  # one greedy step with eps held fixed: x_hat = argmax x_theta(z_T, eps(seed)). Recomputing it
  # from the seed alone — as ReDi training does — gives the same tokens: eps is read back exactly.
  mesh = sharding.make_mesh(cfg.mesh)
  params, _ = init_from.load_ema(str(root / 'teacher'), cfg.model.vocab_size - 1, mesh)
  model = nnx.merge(train_state.model_graphdef(cfg, cfg.model.vocab_size - 1),
                    jax.device_get(params))
  eps = noise.seeded_eps(jnp.asarray(a['seed']), cfg.data.seq_len, cfg)
  logits = np.asarray(model(jnp.asarray(a['z_T']), None, eps))[..., :cfg.model.vocab_size - 1]
  masked = a['z_T'] == cfg.model.vocab_size - 1
  assert masked.sum() > 100
  np.testing.assert_array_equal(logits.argmax(-1)[masked], a['x_hat'][masked])
  np.testing.assert_array_equal(a['x_hat'][~masked], a['z_T'][~masked])
  wrong = noise.seeded_eps(jnp.asarray(a['seed']) + 1, cfg.data.seq_len, cfg)
  other = np.asarray(model(jnp.asarray(a['z_T']), None, wrong))[..., :cfg.model.vocab_size - 1]
  assert (other.argmax(-1)[masked] != a['x_hat'][masked]).mean() > 0.2  # eps matters here


def test_redi_training_runs_and_refuses_foreign_couplings(imdm_teacher):
  cfg, root = imdm_teacher
  pairs = redi.generate(cfg, str(root / 'teacher'), str(root / 'pairs'))
  run = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_steps=4, ckpt_every=4))
  summary = trainer.train(run, str(root / 'student'), init_from=str(root / 'teacher'),
                          program=distillation.redi_program(pairs))
  assert summary.step == 4 and np.isfinite(summary.val_ppl)
  longer = dataclasses.replace(run, data=dataclasses.replace(run.data, seq_len=64))
  with pytest.raises(UserError, match='seq_len=32'):
    trainer.train(longer, str(root / 'x'), init_from=str(root / 'teacher'),
                  program=distillation.redi_program(pairs))
  with pytest.raises(UserError, match='no couplings.json'):
    trainer.train(run, str(root / 'y'), init_from=str(root / 'teacher'),
                  program=distillation.redi_program(str(root)))
  wider = dataclasses.replace(run, model=dataclasses.replace(run.model, vocab_size=385))
  with pytest.raises(UserError, match='vocab_size'):
    redi.generate(wider, str(root / 'teacher'), str(root / 'z'))


def test_redi_generate_command_ends_with_a_summary(imdm_teacher, capsys):
  cfg, root = imdm_teacher
  out = str(root / 'cli')
  distill.main(['redi-generate', '--preset', 'micro', '--teacher', str(root / 'teacher'), '--out',
                out, *[a for s in (*OVERRIDES, f'data.data_dir={cfg.data.data_dir}')
                       for a in ('--set', s)]])
  full = (_pairs(out)['t'] == 1.0).mean()
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert last.startswith(f'done: 40 pairs (40 generated now, {full:.1%} with t = 1) in ')
  assert last.endswith(f' s | couplings {out}')
  os.remove(os.path.join(out, 'chunks', 'chunk_000001.npz'))  # resumed: one chunk of 16 is new
  distill.main(['redi-generate', '--preset', 'micro', '--teacher', str(root / 'teacher'), '--out',
                out, *[a for s in (*OVERRIDES, f'data.data_dir={cfg.data.data_dir}')
                       for a in ('--set', s)]])
  assert '(16 generated now' in capsys.readouterr().out
