"""IMDM: the stochastic infinite-state mask (docs/method.md §2) in the denoiser and the trainer."""

import dataclasses
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from imdm_jax import init_from, noise, sharding, train_state, train_step, trainer
from imdm_jax.config import Config, MeshConfig
from imdm_jax.errors import UserError

from helpers import MICRO, as_imdm, replaced, resampled

MASK = 36


def _params(cfg: Config, seed=0):
  return train_state.init_params(cfg, jax.random.PRNGKey(seed))


def _logits(cfg, params, z, eps=None):
  return nnx.merge(train_state.model_graphdef(cfg), params)(z, None, eps, mask_id=MASK)


@pytest.mark.parametrize('kind', ['uniform', 'normal', 'learnable', 'finite-1', 'finite-4'])
def test_imdm_initialised_from_mdlm_is_that_mdlm_for_any_eps(kind):
  mdlm_cfg = Config(model=MICRO)
  mdlm = resampled(_params(mdlm_cfg), 1)  # a "trained" MDLM: every weight non-trivial
  if kind.startswith('finite'):
    cfg = as_imdm(mdlm_cfg, noise_dim=0, num_mask_states=int(kind[-1]))
  else:
    cfg = as_imdm(mdlm_cfg, noise_type=kind)
  imdm = init_from.graft(_params(cfg, seed=5), mdlm, 'test')
  z = jax.random.randint(jax.random.PRNGKey(2), (3, 10), 0, 37)  # includes mask positions
  z = z.at[:, ::2].set(MASK)
  expected = _logits(mdlm_cfg, mdlm, z)
  for seed in range(3):
    eps = noise.draw_eps(jax.random.PRNGKey(seed), z.shape, cfg)
    np.testing.assert_array_equal(_logits(cfg, imdm, z, eps), expected)


def test_finite_one_state_stays_mdlm_under_training():
  cfg = as_imdm(Config(model=MICRO), noise_dim=0, num_mask_states=1)
  graphdef = train_state.model_graphdef(cfg)
  params = resampled(_params(cfg), 3)  # so that gradients reach the embeddings
  batch = {'tokens': jnp.tile(jnp.arange(10)[None], (4, 1)),
           'attention_mask': jnp.ones((4, 10), jnp.int32)}
  grads = jax.grad(lambda p: train_step.loss_sums(p, graphdef, cfg, batch, jax.random.PRNGKey(0),
                                                  True, mask_id=MASK)[0])(params)
  np.testing.assert_array_equal(grads['vocab_embed']['imdm_states']['embedding'], 0.0)
  assert float(jnp.abs(grads['vocab_embed']['embedding']).sum()) > 0


def test_eps_path_is_trainable():
  """A task only eps can solve: all positions masked, target token = [eps_0 > 0] per position."""
  cfg = as_imdm(Config(model=MICRO))
  graphdef = train_state.model_graphdef(cfg)
  params = _params(cfg)
  tx = optax.adam(3e-3)
  opt = tx.init(params)
  z = jnp.full((32, 10), MASK)

  def loss(params, key):
    eps = noise.draw_eps(key, z.shape, cfg)
    target = (eps[..., 0] > 0).astype(jnp.int32)
    logits = nnx.merge(graphdef, params)(z, None, eps, mask_id=MASK)
    return optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()

  @jax.jit
  def step(params, opt, key):
    grads = jax.grad(loss)(params, key)
    updates, opt = tx.update(grads, opt)
    return optax.apply_updates(params, updates), opt

  for i in range(150):
    params, opt = step(params, opt, jax.random.PRNGKey(i))
  eps = noise.draw_eps(jax.random.PRNGKey(10_000), z.shape, cfg)  # fresh, unseen eps
  pred = jnp.argmax(nnx.merge(graphdef, params)(z, None, eps, mask_id=MASK), -1)
  assert float((pred == (eps[..., 0] > 0)).mean()) > 0.9
  assert float(train_step.noise_output_norm(params)) > 0


def test_imdm_nelbo_equals_mdlm_nelbo_when_noise_mlp_is_zero():
  mdlm_cfg = Config(model=dataclasses.replace(MICRO, dropout=0.1))
  cfg = as_imdm(mdlm_cfg)
  mdlm = resampled(_params(mdlm_cfg), 4)
  imdm = init_from.graft(_params(cfg), mdlm, 'test')
  x = jax.random.randint(jax.random.PRNGKey(0), (8, 12), 0, 36)
  batch = {'tokens': x, 'attention_mask': jnp.ones_like(x)}
  for train in (False, True):
    key = jax.random.PRNGKey(9)
    ours = train_step.loss_sums(imdm, train_state.model_graphdef(cfg), cfg, batch, key, train,
                                mask_id=MASK)
    ref = train_step.loss_sums(mdlm, train_state.model_graphdef(mdlm_cfg), mdlm_cfg, batch,
                               key, train, mask_id=MASK)
    np.testing.assert_array_equal(ours[0], ref[0])


def test_sharded_step_equals_single_device_with_noise_path(micro_cfg):
  cfg = as_imdm(micro_cfg, noise_dim=8)
  results = []
  for mesh_cfg, devices in ((MeshConfig(data=1, fsdp=1), jax.devices()[:1]),
                            (MeshConfig(data=2, fsdp=4), None)):
    mesh = sharding.make_mesh(mesh_cfg, devices)
    mask_id = cfg.model.vocab_size - 1
    state = train_state.init_state(cfg, mesh)
    step = train_step.compile_train_step(cfg, train_state.model_graphdef(cfg), mesh, state,
                                         mask_id=mask_id)
    rng = np.random.default_rng(0)
    for _ in range(3):
      batch = {'tokens': rng.integers(0, mask_id, (16, 32), dtype=np.int32),
               'attention_mask': np.ones((16, 32), np.int32)}
      state, out = step(state, sharding.to_global(batch, mesh))
    results.append((jax.device_get(state), jax.device_get(out)))
  (s1, o1), (s8, o8) = results
  chex.assert_trees_all_close(s1.params, s8.params, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(o1['imdm/noise_out_norm'], o8['imdm/noise_out_norm'], rtol=1e-5)
  assert o8['imdm/noise_out_norm'] > 0  # the zero-initialised layer has started to move


def test_init_from_mdlm_run_and_refusals(micro_cfg, tmp_path):
  short = dict(num_steps=2, ckpt_every=2, eval_every=1000, eval_batches=1)
  mdlm_cfg = replaced(micro_cfg, train=short,
                      optim=dict(warmup_steps=1, ema_decay=0.9))  # EMA != raw weights
  trainer.train(mdlm_cfg, str(tmp_path / 'mdlm'))
  imdm_cfg = replaced(as_imdm(mdlm_cfg, noise_dim=8), train=dict(num_steps=1))
  mesh = sharding.make_mesh(imdm_cfg.mesh)
  ema, saved, _, _ = init_from.load_weights(str(tmp_path / "mdlm"), mesh)
  ckpt = init_from._open(str(tmp_path / 'mdlm'))  # pylint: disable=protected-access
  full = ckpt.restore(train_state.abstract_state(saved, mesh))
  ckpt.close()
  chex.assert_trees_all_equal(ema, full.ema)  # the EMA alone, not the raw weights
  # after 2 steps only the output layer has moved (adaLN-zero blocks start with zero gradients)
  assert not np.array_equal(full.ema['output_layer']['linear']['kernel'],
                            full.params['output_layer']['linear']['kernel'])
  fresh = train_state.init_state(imdm_cfg, mesh)
  state = init_from.initialise(fresh, imdm_cfg, str(tmp_path / 'mdlm'), mesh)
  np.testing.assert_array_equal(state.params['blocks'][1]['mlp_in']['kernel'],
                                ema['blocks'][1]['mlp_in']['kernel'])
  np.testing.assert_array_equal(state.ema['vocab_embed']['embedding'],
                                ema['vocab_embed']['embedding'])
  np.testing.assert_array_equal(state.params['vocab_embed']['imdm_mlp']['mlp_out']['kernel'], 0.0)
  # the official `load_ema`: the EMA restarts from the loaded weights with the source's count
  assert int(state.ema_count) == 2 and int(state.step) == 0
  summary = trainer.train(imdm_cfg, str(tmp_path / 'imdm'), init_from=str(tmp_path / 'mdlm'))
  assert summary.step == 1 and np.isfinite(summary.val_ppl)
  ckpt = init_from._open(str(tmp_path / 'imdm'))  # pylint: disable=protected-access
  after = ckpt.restore(train_state.abstract_state(imdm_cfg, mesh))
  ckpt.close()
  # one update at decay min(0.9, (1 + 3)/(10 + 3)): the inherited count 2 plus this update, where
  # a fresh count would have averaged at (1 + 1)/(10 + 1)
  decay = min(0.9, 4 / 13)
  kernel = lambda tree: np.asarray(tree['blocks'][1]['mlp_in']['kernel'])
  np.testing.assert_allclose(kernel(after.ema), decay * kernel(ema) + (1 - decay) *
                             kernel(after.params), rtol=1e-5, atol=1e-7)
  assert int(after.ema_count) == 3

  capped = replaced(imdm_cfg, model=dict(attn_softcap=50.0))  # same parameters, another function
  with pytest.raises(UserError, match='model.attn_softcap=0.0, this run 50.0'):
    trainer.train(capped, str(tmp_path / 'c'), init_from=str(tmp_path / 'mdlm'))

  wider = replaced(imdm_cfg, model=dict(cond_dim=8))
  with pytest.raises(UserError, match='blocks/0/adaLN_modulation/kernel has shape'):
    trainer.train(wider, str(tmp_path / 'w'), init_from=str(tmp_path / 'mdlm'))
  deeper = replaced(imdm_cfg, model=dict(n_blocks=3))
  with pytest.raises(UserError, match='blocks/2/adaLN_modulation/bias'):
    trainer.train(deeper, str(tmp_path / 'd'), init_from=str(tmp_path / 'mdlm'))
  with pytest.raises(UserError, match='no checkpoint'):
    trainer.train(imdm_cfg, str(tmp_path / 'e'), init_from=str(tmp_path))
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints' / '1')
