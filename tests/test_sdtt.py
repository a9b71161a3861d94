"""SDTT: divergences, teacher targets, frozen teachers and round boundaries."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imdm_jax import distillation, init_from, loss, sdtt, sharding, train_state, trainer
from imdm_jax.config import Config, DistillConfig, ModelConfig


@pytest.mark.parametrize('kind', ['kl-bwd', 'kl-fwd', 'mse', 'tvd'])
def test_divergences_match_direct_formulas(kind):
  rng = np.random.default_rng(0)
  a = rng.normal(size=(2, 3, 6)) * 2
  b = rng.normal(size=(2, 3, 6)) * 2
  a[..., 5] = b[..., 5] = loss.NEG_INF  # a token neither side can produce (the mask)
  log_s = a - np.log(np.exp(a).sum(-1, keepdims=True))
  log_t = b - np.log(np.exp(b).sum(-1, keepdims=True))
  s, t = np.exp(log_s), np.exp(log_t)
  expected = {'kl-bwd': (s * (log_s - log_t)).sum(-1), 'kl-fwd': (t * (log_t - log_s)).sum(-1),
              'mse': ((log_s - log_t)[..., :5] ** 2).sum(-1) / 6,
              'tvd': 0.5 * np.abs(s - t).sum(-1)}[kind]
  got = loss.divergence(jnp.asarray(log_s, jnp.float32), jnp.asarray(log_t, jnp.float32), kind)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss.divergence(jnp.asarray(log_s), jnp.asarray(log_s), kind), 0.0,
                             atol=1e-6)


V, MASK, L = 6, 5, 8
CFG = Config(model=ModelConfig(vocab_size=V))


def _denoiser(z, eps, t):
  """Each position's prediction is deterministic (token l % 5), and the logits also carry the
  number of masks in the input, so the x_theta of step 1 and step 2 differ."""
  del eps, t
  masks = jnp.sum(z == MASK, axis=-1, keepdims=True)[..., None].astype(jnp.float32)  # [B, 1, 1]
  target = jax.nn.one_hot(jnp.arange(z.shape[1]) % 5, V)[None]
  return 60.0 * target + 0.01 * masks * jnp.arange(V)


def test_teacher_targets_come_from_the_revealing_step():
  z_t = jnp.full((64, L), MASK).at[:, 0].set(0)
  t = jnp.full((64,), 0.5)
  target, revealed_in = sdtt.teacher_targets(_denoiser, jax.random.PRNGKey(0), z_t, None, t,
                                             jnp.float32(0.1), MASK, CFG)
  revealed_in = np.asarray(revealed_in)
  assert (revealed_in == 1).any() and (revealed_in == 2).any() and (revealed_in == 0).any()
  assert (revealed_in[:, 0] == 0).all()  # position 0 was never masked
  log_x1 = np.asarray(loss.subs_log_probs(_denoiser(z_t, None, t), z_t, MASK))
  for b in range(64):
    # the tokens are deterministic, so z1 is z_t with step 1's reveals filled in
    z1 = np.where(revealed_in[b] == 1, np.arange(L) % 5, np.asarray(z_t[b]))
    log_x2 = np.asarray(loss.subs_log_probs(_denoiser(jnp.asarray(z1)[None], None, t), z1[None],
                                            MASK))[0]
    for l in range(1, L):
      expected = log_x1[b, l] if revealed_in[b, l] == 1 else log_x2[l]
      np.testing.assert_allclose(target[b, l], expected, rtol=1e-6)
  # a huge step reveals everything in step 1; a tiny one nothing
  _, all_first = sdtt.teacher_targets(_denoiser, jax.random.PRNGKey(1), z_t, None, t,
                                      jnp.float32(1.0), MASK, CFG)
  assert (np.asarray(all_first)[:, 1:] == 1).all()
  _, none = sdtt.teacher_targets(_denoiser, jax.random.PRNGKey(1), z_t, None, t,
                                 jnp.float32(1e-9), MASK, CFG)
  assert (np.asarray(none) == 0).all()


def _sdtt_cfg(micro_cfg, **distill):
  return dataclasses.replace(
      micro_cfg, model=dataclasses.replace(micro_cfg.model, dropout=0.0),
      distill=dataclasses.replace(DistillConfig(), **distill),
      train=dataclasses.replace(micro_cfg.train, eval_every=1000, eval_batches=1, ckpt_every=3,
                                log_every=1))


def test_loss_is_zero_when_the_student_is_the_two_step_teacher(micro_cfg, tmp_path):
  cfg = _sdtt_cfg(micro_cfg)
  trainer.train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_steps=3)),
                str(tmp_path / 'teacher'))
  mesh = sharding.make_mesh(cfg.mesh)
  mask_id = cfg.model.vocab_size - 1
  program = distillation.sdtt_program(cfg)
  state = program.init(cfg, mask_id, mesh, str(tmp_path / 'teacher'))
  leaves, treedef = jax.tree.flatten(state.teacher)  # a teacher whose output depends on z
  keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
  sharp = jax.tree.unflatten(treedef, [x + 0.5 * jax.random.normal(k, x.shape)
                                       for k, x in zip(keys, leaves)])
  state = state.replace(teacher=sharp, student=state.student.replace(params=sharp))
  # round 10: dt ~ 1, so the teacher's first step reveals every position and the target is the
  # teacher's (= the student's) own x_theta at z_t: nothing to learn
  state = state.replace(round=jnp.int32(10))
  graphdef = train_state.model_graphdef(cfg, mask_id)
  # compiled: eager op-by-op dispatch over 8 sharded CPU devices has aborted in CI
  step = jax.jit(lambda state, batch: sdtt.sdtt_step(state, batch, graphdef=graphdef, cfg=cfg))
  batch = {'tokens': jnp.asarray(np.random.default_rng(0).integers(0, mask_id, (16, 32)), jnp.int32),
           'attention_mask': jnp.ones((16, 32), jnp.int32)}
  _, out = step(state, batch)
  assert float(out['loss']) < 1e-6  # zero up to float rounding of two compiled forward passes
  _, out = step(state.replace(round=jnp.int32(7)), batch)
  assert float(out['loss']) > 1e-3  # dt ~ 1/8: step 2 sees reveals of step 1 the student does not


def test_teacher_frozen_within_a_round_and_replaced_at_boundaries(micro_cfg, tmp_path):
  cfg = _sdtt_cfg(micro_cfg, round_steps=3, num_rounds=2)
  # dropout in the student (not the teacher) makes the gradient non-zero even at round 0
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dropout=0.1))
  cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_steps=6))
  trainer.train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_steps=2)),
                str(tmp_path / 'teacher'))
  teacher_ema, _ = init_from.load_ema(str(tmp_path / 'teacher'), cfg.model.vocab_size - 1,
                                      sharding.make_mesh(cfg.mesh))
  program = distillation.sdtt_program(cfg)
  snapshots = {}
  orig_before = program.before_step

  def before(state, n):
    state = orig_before(state, n)
    snapshots[n] = (int(state.round), jax.device_get(state.teacher),
                    jax.device_get(state.student.params))
    return state

  trainer.train(cfg, str(tmp_path / 'sdtt'), init_from=str(tmp_path / 'teacher'),
                program=dataclasses.replace(program, before_step=before))
  leaf = lambda p: p['output_layer']['linear']['kernel']  # moves from step 1 (blocks are gated by ~0)
  for n in (1, 2, 3):  # round 0: the teacher is the checkpoint's EMA weights throughout
    assert snapshots[n][0] == 0
    np.testing.assert_array_equal(leaf(snapshots[n][1]), leaf(jax.device_get(teacher_ema)))
  assert snapshots[4][0] == 1  # round 1: the raw student as it was after step 3
  np.testing.assert_array_equal(leaf(snapshots[4][1]), leaf(snapshots[4][2]))
  np.testing.assert_array_equal(leaf(snapshots[6][1]), leaf(snapshots[4][1]))
  assert not np.array_equal(leaf(snapshots[4][1]), leaf(snapshots[3][1]))
  # the teacher has no optimizer state: Adam's moments mirror the student's parameters only
  restored = trainer.checkpoint.Checkpointer(str(tmp_path / 'sdtt' / 'checkpoints')).restore(
      program.abstract(cfg, cfg.model.vocab_size - 1, sharding.make_mesh(cfg.mesh)))
  n_student = len(jax.tree.leaves(restored.student.params))
  assert len(jax.tree.leaves(restored.student.opt_state)) == 2 * n_student + 2
  assert int(restored.round) == 1 and int(restored.student.step) == 6
  assert os.path.exists(tmp_path / 'sdtt' / 'metrics.jsonl')
