"""SDTT: teacher grids and targets, 64-bit teacher draws, frozen teachers and round boundaries
(the divergences: tests/test_loss.py)."""

import dataclasses
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imdm_jax import config as config_lib
from imdm_jax import (distillation, init_from, loss, sampler, sdtt, sharding, train_state,
                      train_step, trainer)
from imdm_jax.config import Config, ModelConfig, SdttConfig

from helpers import perturbed, replaced


V, MASK, L = 6, 5, 8
CFG = Config(model=ModelConfig(vocab_size=V))


def _denoiser(params, z, eps, t):
  """Each position's prediction is deterministic (token l % 5), and the logits also carry the
  number of masks in the input, so the x_theta of step 1 and step 2 differ."""
  del params, eps, t
  masks = jnp.sum(z == MASK, axis=-1, keepdims=True)[..., None].astype(jnp.float32)  # [B, 1, 1]
  target = jax.nn.one_hot(jnp.arange(z.shape[1]) % 5, V)[None]
  return 60.0 * target + 0.01 * masks * jnp.arange(V)


def test_teacher_targets_come_from_the_revealing_step():
  z_t = jnp.full((64, L), MASK).at[:, 0].set(0)
  t = jnp.full((64,), 0.5)
  target, revealed_in = sdtt.teacher_targets(_denoiser, None, jax.random.PRNGKey(0), z_t, None, t,
                                             jnp.float32(0.1), MASK, 'intended')
  revealed_in = np.asarray(revealed_in)
  assert (revealed_in == 1).any() and (revealed_in == 2).any() and (revealed_in == 0).any()
  assert (revealed_in[:, 0] == 0).all()  # position 0 was never masked
  log_x1 = np.asarray(loss.subs_log_probs(_denoiser(None, z_t, None, t), z_t, MASK))
  for b in range(64):
    # the tokens are deterministic, so z1 is z_t with step 1's reveals filled in
    z1 = np.where(revealed_in[b] == 1, np.arange(L) % 5, np.asarray(z_t[b]))
    z1 = jnp.asarray(z1)[None]
    log_x2 = np.asarray(loss.subs_log_probs(_denoiser(None, z1, None, t), z1, MASK))[0]
    for l in range(1, L):
      expected = log_x1[b, l] if revealed_in[b, l] == 1 else log_x2[l]
      np.testing.assert_allclose(target[b, l], expected, rtol=1e-6)
  # a huge step reveals everything in step 1; a tiny one nothing
  _, all_first = sdtt.teacher_targets(_denoiser, None, jax.random.PRNGKey(1), z_t, None, t,
                                      jnp.float32(1.0), MASK, 'intended')
  assert (np.asarray(all_first)[:, 1:] == 1).all()
  _, none = sdtt.teacher_targets(_denoiser, None, jax.random.PRNGKey(1), z_t, None, t,
                                 jnp.float32(1e-9), MASK, 'intended')
  assert (np.asarray(none) == 0).all()


def _sdtt_cfg(micro_cfg, **sdtt_keys):
  return replaced(micro_cfg, model=dict(dropout=0.0), sdtt=sdtt_keys,
                  train=dict(eval_every=1000, eval_batches=1, ckpt_every=3, log_every=1))


def test_loss_is_zero_when_the_student_is_the_two_step_teacher(micro_cfg, tmp_path):
  cfg = _sdtt_cfg(micro_cfg)
  trainer.train(replaced(cfg, train=dict(num_steps=3)), str(tmp_path / 'teacher'))
  mesh = sharding.make_mesh(cfg.mesh)
  mask_id = cfg.model.vocab_size - 1
  program = distillation.sdtt_program(cfg)
  state = program.init(cfg, mesh, str(tmp_path / 'teacher'))
  sharp = perturbed(state.teacher, 0, 0.5)  # a teacher whose output depends on z
  state = state.replace(teacher=sharp, student=state.student.replace(params=sharp))
  # round 10: dt ~ 1, so the teacher's first step reveals every position and the target is the
  # teacher's (= the student's) own x_theta at z_t: nothing to learn
  state = state.replace(round=jnp.int32(10))
  graphdef = train_state.model_graphdef(cfg)
  # compiled: eager op-by-op dispatch over 8 sharded CPU devices has aborted in CI
  step = jax.jit(lambda state, batch: train_step.sdtt_step(state, batch, graphdef=graphdef, cfg=cfg,
                                                           mask_id=mask_id))
  batch = {'tokens': jnp.asarray(np.random.default_rng(0).integers(0, mask_id, (16, 32)), jnp.int32),
           'attention_mask': jnp.ones((16, 32), jnp.int32)}
  _, out = step(state, batch)
  assert float(out['loss']) < 1e-6  # zero up to float rounding of two compiled forward passes
  _, out = step(state.replace(round=jnp.int32(7)), batch)
  assert float(out['loss']) > 1e-3  # dt ~ 1/8: step 2 sees reveals of step 1 the student does not


def test_teacher_frozen_within_a_round_and_replaced_at_boundaries(micro_cfg, tmp_path):
  cfg = _sdtt_cfg(micro_cfg, round_steps=3, num_rounds=2)
  # dropout in the student (not the teacher) makes the gradient non-zero even at round 0
  cfg = replaced(cfg, model=dict(dropout=0.1), train=dict(num_steps=6))
  trainer.train(replaced(cfg, train=dict(num_steps=2)), str(tmp_path / 'teacher'))
  teacher_ema = init_from.load_weights(str(tmp_path / 'teacher'), sharding.make_mesh(cfg.mesh)).params
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
      program.abstract(cfg, sharding.make_mesh(cfg.mesh)))
  n_student = len(jax.tree.leaves(restored.student.params))
  assert len(jax.tree.leaves(restored.student.opt_state)) == 2 * n_student + 2
  assert int(restored.round) == 1 and int(restored.student.step) == 6
  assert os.path.exists(tmp_path / 'sdtt' / 'metrics.jsonl')


def _targets(grid, t, dt, key=0):
  z_t = jnp.full(t.shape + (L,), MASK).at[:, 0].set(0)
  return jax.jit(lambda key, t: sdtt.teacher_targets(_denoiser, None, key, z_t, None, t,
                                                     jnp.float32(dt), MASK, grid)
                 )(jax.random.PRNGKey(key), t)


@pytest.mark.parametrize('grid,steps', [
    ('intended', ((0.5, 0.1), (0.4, 0.1))),  # t -> t - dt -> t - 2dt
    ('slip', ((0.65, 0.1), (0.15, 0.1))),  # s -> s - dt, s = t + (1 - t)(t - 2dt), (1 - t)(t - 2dt)
])
def test_teacher_grids_by_hand_and_the_reveal_rates_they_give(grid, steps):
  """(start, length) of the teacher's two steps at t = 0.5, dt = 0.1, and the share of masked
  positions each step reveals: length / start of those still masked."""
  t = jnp.full((4096,), 0.5)
  got = np.asarray(sdtt.two_teacher_steps(t, jnp.float32(0.1), grid))  # [2 steps, (start, length), B]
  np.testing.assert_allclose(got, np.broadcast_to(np.asarray(steps)[..., None], got.shape),
                             rtol=1e-6)
  _, revealed_in = _targets(grid, t, 0.1)
  r = np.asarray(revealed_in)[:, 1:]  # 4096 x 7 masked positions
  (start1, length1), (start2, length2) = steps
  np.testing.assert_allclose((r == 1).mean(), length1 / start1, atol=0.01)
  np.testing.assert_allclose((r == 2).sum() / (r != 1).sum(), length2 / start2, atol=0.01)


def test_slip_grid_clamps_its_starts_and_late_steps_reveal_everything():
  t = jnp.array([0.1])
  (s1, _), (s2, _) = sdtt.two_teacher_steps(t, jnp.float32(0.1), 'slip')
  np.testing.assert_allclose([float(s1[0]), float(s2[0])], [0.01, 1e-5], rtol=1e-5)  # -0.09 -> eps
  for grid in ('intended', 'slip'):  # steps reaching below 0 reveal every position
    _, revealed_in = _targets(grid, jnp.full((64,), 0.1), 0.1)
    assert (np.asarray(revealed_in)[:, 1:] > 0).all()


def test_base_steps_sets_the_round_zero_teacher():
  for base, round_, steps in ((1024, 0, 1024), (1024, 7, 8), (16, 0, 16), (16, 2, 4)):
    cfg = dataclasses.replace(CFG, sdtt=SdttConfig(base_steps=base))
    np.testing.assert_allclose(float(sdtt.teacher_dt(cfg, jnp.int32(round_))), 0.999 / steps,
                               rtol=1e-6)


def test_exponential_variates_from_64_bits():
  hi = np.array([0, 0, 0, 12345, 2**31 - 1, 2**31, 3_000_000_000, 2**32 - 1, 2**32 - 1], np.uint32)
  lo = np.array([0, 1, 2**32 - 1, 678, 2**32 - 1, 0, 99, 0, 2**32 - 1], np.uint32)
  got = np.asarray(sdtt.exponential_from_bits(jnp.asarray(hi), jnp.asarray(lo)))
  v = (hi.astype(np.float64) * 2**32 + lo + 0.5) / 2**64  # exact enough where V < 1/2
  w = ((~hi).astype(np.float64) * 2**32 + (~lo).astype(np.float64) + 0.5) / 2**64  # 1 - V
  expected = np.where(v < 0.5, -np.log1p(-np.minimum(v, 0.5)), -np.log(w))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, expected, rtol=2e-6)
  assert got[0] == np.float32(2.0**-65) and np.isclose(got[-1], 65 * np.log(2), rtol=1e-6)
  n = 1_000_000  # and the law: P(E < x) = 1 - exp(-x)
  e = np.asarray(jax.jit(lambda key: sdtt.exponential(key, (n,)))(jax.random.PRNGKey(0)))
  for x in (1e-3, 0.1, 1.0, 5.0):
    p = -np.expm1(-x)
    assert abs((e < x).mean() - p) < 5 * np.sqrt(p * (1 - p) / n), x


def test_race_draws_a_1e10_tail_at_its_rate():
  """A token of relative probability q wins the race iff its variate E_q < q E_head: for
  q = 1e-10 only variates from hi = 0 (V < 2^-32, probability 2^-32) get there. Conditioned on
  that event (lo uniform), the tail wins w.p. E[min(1, c E_head)] = c (1 - exp(-1/c)),
  c = q 2^32 — a float32 uniform's smallest variate (~1.2e-7) could never win it."""
  n, q = 200_000, 1e-10
  k_head, k_tail = jax.random.split(jax.random.PRNGKey(1))

  @jax.jit
  def tail_wins(k_head, k_tail):
    hi, lo = jax.random.bits(k_head, (2, n), jnp.uint32)
    e_head = sdtt.exponential_from_bits(hi, lo)
    e_tail = sdtt.exponential_from_bits(jnp.zeros((n,), jnp.uint32),
                                        jax.random.bits(k_tail, (n,), jnp.uint32))
    probs = jnp.array([1.0, q], jnp.float32)
    return jnp.mean(jnp.argmax(probs / jnp.stack([e_head, e_tail], -1), -1) == 1)

  c = q * 2.0**32
  expected = c * -np.expm1(-1 / c)
  assert abs(float(tail_wins(k_head, k_tail)) - expected) < 5 * np.sqrt(expected / n)


def test_sdtt_step_differs_from_a_float32_race_only_in_its_draws(monkeypatch):
  """Round 11 (dt ~ 2): the teacher's first step reveals everything, so no draw can change the
  targets — the step with 64-bit draws and the one with float32 draws (as before) agree exactly,
  state and metrics. At round 6 (dt ~ 1/16) the teacher reveals some of the 8 x 16 positions
  whatever the key, so the draws matter, and the two steps differ."""
  cfg = Config(model=ModelConfig(vocab_size=33, hidden_size=32, n_blocks=1, n_heads=2,
                                 cond_dim=16, dropout=0.0),
               data=dataclasses.replace(Config().data, seq_len=16),
               train=dataclasses.replace(Config().train, batch_size=8),
               sdtt=dataclasses.replace(Config().sdtt, stratum_rows=4))
  mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1])
  student = train_state.init_state(cfg, mesh)
  # outputs that depend on z, and a teacher unlike the student
  randomised = lambda seed: perturbed(student.params, seed, 0.5)
  state = sdtt.SdttState(student=student.replace(params=randomised(0)), teacher=randomised(1),
                         round=jnp.int32(0))
  graphdef = train_state.model_graphdef(cfg)
  batch = {'tokens': jnp.asarray(np.random.default_rng(0).integers(0, 32, (8, 16)), jnp.int32),
           'attention_mask': jnp.ones((8, 16), jnp.int32)}
  ours = sdtt.categorical

  def run(categorical, round_):
    monkeypatch.setattr(sdtt, 'categorical', categorical)
    step = jax.jit(lambda s, b: train_step.sdtt_step(s, b, graphdef=graphdef, cfg=cfg, mask_id=32))
    return jax.device_get(step(state.replace(round=jnp.int32(round_)), batch))

  late = run(ours, 11)
  assert late[1]['loss'] > 0.1  # the student is far from this teacher: t, z_t and eps matter
  chex.assert_trees_all_equal(late, run(sampler.categorical, 11))
  assert run(ours, 6)[1]['loss'] != run(sampler.categorical, 6)[1]['loss']


@pytest.mark.parametrize('method', ['sdtt', 'redi'])
def test_distillation_steps_accumulate_like_the_train_step(micro_cfg, method, monkeypatch):
  """k = 2 micro-batches give the k = 1 update. For SDTT the teacher draws per micro-batch, so
  the check uses a round-0 teacher of one step (dt = 1 - eps: every masked position is revealed
  in its first step, so the targets do not depend on the draws)."""
  cfg = config_lib.apply_overrides(micro_cfg, [
      'model.dropout=0.0', 'model.noise_dim=4', 'sdtt.base_steps=1'])
  mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1])
  mask_id = cfg.model.vocab_size - 1
  graphdef = train_state.model_graphdef(cfg)
  rng = np.random.default_rng(0)
  B, Lc = cfg.train.batch_size, cfg.data.seq_len
  tokens = rng.integers(0, mask_id, (B, Lc)).astype(np.int32)
  valid = (np.arange(Lc)[None] < rng.integers(Lc // 2, Lc + 1, (B, 1))).astype(np.int32)
  if method == 'sdtt':
    step_fn, batch = train_step.sdtt_step, {'tokens': tokens, 'attention_mask': valid}
  else:
    z = np.where(rng.random((B, Lc)) < 0.6, mask_id, tokens).astype(np.int32)
    step_fn = train_step.redi_step
    batch = {'z_T': z, 'x_hat': tokens, 't': rng.uniform(0.1, 1.0, B).astype(np.float32),
             'seed': np.arange(B, dtype=np.int32), 'attention_mask': valid}
  used, original = [], train_step.accumulate_gradients

  def recording(sums, params, rows, key, k):  # so that an ignored grad_accum cannot pass
    used.append(k)
    return original(sums, params, rows, key, k)

  monkeypatch.setattr(train_step, 'accumulate_gradients', recording)
  results = []
  for k in (1, 2):
    kcfg = config_lib.apply_overrides(cfg, [f'train.grad_accum={k}'])
    student = train_state.init_state(kcfg, mesh)
    # random weights everywhere (the output layer and noise path start at zero), and a teacher
    # unlike the student
    params = perturbed(student.params, 0, 0.3)
    student = student.replace(params=params, ema=jax.tree.map(jnp.copy, params))
    state = student if method == 'redi' else sdtt.SdttState(
        student=student, teacher=perturbed(params, 1, 0.3), round=jnp.zeros((), jnp.int32))
    step = train_step.compile_train_step(kcfg, graphdef, mesh, state, step_fn, mask_id=mask_id)
    state, out = step(state, sharding.to_global(batch, mesh))
    results.append((float(out['loss']), state if method == 'redi' else state.student))
  (loss_1, state_1), (loss_2, state_2) = results
  assert used == [1, 2] and loss_1 > 0
  np.testing.assert_allclose(loss_2, loss_1, rtol=1e-5)
  chex.assert_trees_all_close(state_2.params, state_1.params, rtol=1e-5, atol=1e-6)


def test_stratum_weights_average_blocks_then_blocks():
  """The official reduction by hand: two blocks of two rows, one with 1 masked position and one
  with 3; a block with none is left out. sum(div * w) / sum(w) is the mean of the blocks' means."""
  masked = jnp.array([[1, 0], [0, 0], [1, 1], [1, 0], [0, 0], [0, 0]], jnp.float32)
  div = jnp.array([[6.0, 9.0], [9.0, 9.0], [1.0, 2.0], [3.0, 9.0], [9.0, 9.0], [9.0, 9.0]])
  w = sdtt.stratum_weights(masked, 2)
  np.testing.assert_allclose(float(jnp.sum(div * w) / jnp.sum(w)), (6.0 + 2.0) / 2, rtol=1e-6)
  one_mean = sdtt.stratum_weights(masked, 0)
  np.testing.assert_allclose(float(jnp.sum(div * one_mean) / jnp.sum(one_mean)), 12.0 / 4,
                             rtol=1e-6)
