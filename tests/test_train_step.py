"""The sharded train step: mesh-independence, one compilation, FSDP layout, EMA and optimizer."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from imdm_jax import config as config_lib, sharding, train_state, train_step
from imdm_jax.config import MeshConfig, OptimConfig
from imdm_jax.errors import UserError


def _batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  B, L, V = cfg.train.batch_size, cfg.data.seq_len, cfg.model.vocab_size
  mask = (np.arange(L)[None] < L - 1 - np.arange(B)[:, None] % 7).astype(np.int32)  # [B, L]
  # some padding, excluded from the loss; rows differ, so micro-batches hold unequal counts
  return {'tokens': rng.integers(0, V - 1, (B, L), dtype=np.int32), 'attention_mask': mask}


def _run(cfg, mesh, n_steps):
  mask_id = cfg.model.vocab_size - 1
  state = train_state.init_state(cfg, mesh)
  step = train_step.compile_train_step(cfg, train_state.model_graphdef(cfg), mesh, state,
                                       mask_id=cfg.model.vocab_size - 1)
  losses = []
  for i in range(n_steps):
    state, out = step(state, sharding.to_global(_batch(cfg, i), mesh))
    losses.append(float(out['loss']))
  return jax.device_get(state), losses


def test_sharded_step_equals_single_device(micro_cfg):
  one = sharding.make_mesh(MeshConfig(data=1, fsdp=1), devices=jax.devices()[:1])
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=4))
  state_1, losses_1 = _run(micro_cfg, one, 3)
  state_8, losses_8 = _run(micro_cfg, mesh, 3)
  np.testing.assert_allclose(losses_1, losses_8, rtol=1e-5)
  chex.assert_trees_all_close(state_1.params, state_8.params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(state_1.ema, state_8.ema, rtol=1e-5, atol=1e-6)
  assert int(state_8.step) == 3


def test_step_compiles_once(micro_cfg):
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=4))
  mask_id = micro_cfg.model.vocab_size - 1
  state = train_state.init_state(micro_cfg, mesh)
  counted = chex.assert_max_traces(train_step.train_step, n=1)
  step = train_step.compile_train_step(micro_cfg, train_state.model_graphdef(micro_cfg),
                                       mesh, state, step_fn=counted, mask_id=mask_id)
  for i in range(4):
    state, _ = step(state, sharding.to_global(_batch(micro_cfg, i), mesh))
  assert step._cache_size() == 1  # pylint: disable=protected-access
  chex.clear_trace_counter()


def test_fsdp_shards_every_large_parameter(micro_cfg):
  mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=8))
  state = train_state.init_state(micro_cfg, mesh)
  for tree in (state.params, state.ema, state.opt_state):
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
      if x.ndim == 2:  # every matrix (kernels, embeddings, Adam moments) is split 8 ways
        shard = x.addressable_shards[0].data
        assert shard.size * 8 == x.size, sharding.path_str(path)
  d = micro_cfg.model.hidden_size
  qkv = state.params['blocks'][0]['attn_qkv']['kernel']
  assert qkv.addressable_shards[0].data.shape == (d // 8, 3 * d)


def test_ema_warmup_formula():
  ema = {'w': jnp.zeros(())}
  params = {'w': jnp.ones(())}
  out = train_state.ema_update(ema, params, jnp.int32(1), 0.9999)
  np.testing.assert_allclose(out['w'], 1 - 2 / 11, rtol=1e-6)  # decay (1+1)/(10+1)
  out = train_state.ema_update(ema, params, jnp.int32(10 ** 7), 0.9999)
  np.testing.assert_allclose(out['w'], 1e-4, rtol=1e-3)  # capped at the configured decay


def test_optimizer_warmup_and_clipping():
  cfg = OptimConfig(lr=1.0, warmup_steps=4, grad_clip=1.0, b1=0.0, b2=0.0, eps=0.0)
  tx = train_state.make_optimizer(cfg)
  params = {'w': jnp.zeros((2,))}
  state = tx.init(params)
  sizes = []
  for _ in range(6):
    updates, state = tx.update({'w': jnp.array([30.0, 40.0])}, state, params)
    sizes.append(float(optax.global_norm(updates)))
  # Adam with b1=b2=0 has unit-size steps per coordinate; lr ramps 0, .25, .5, .75, 1, 1
  np.testing.assert_allclose(sizes, np.array([0, .25, .5, .75, 1, 1]) * np.sqrt(2), rtol=1e-5)


def test_optimizer_linear_decay():
  cfg = OptimConfig(lr=1.0, warmup_steps=2, decay_steps=6, grad_clip=1e9, b1=0.0, b2=0.0, eps=0.0)
  tx = train_state.make_optimizer(cfg)
  params = {'w': jnp.zeros(())}
  state = tx.init(params)
  sizes = []
  for _ in range(8):
    updates, state = tx.update({'w': jnp.array(3.0)}, state, params)
    sizes.append(float(jnp.abs(updates['w'])))
  # up over the warm-up, then down to 0 at step 6, and 0 after it
  np.testing.assert_allclose(sizes, [0, .5, 1, .75, .5, .25, 0, 0], atol=1e-6)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_training_lowers_the_loss_on_a_fixed_batch(micro_cfg, dtype):
  cfg = dataclasses.replace(micro_cfg, model=dataclasses.replace(micro_cfg.model, dropout=0.0,
                                                                 dtype=dtype))
  mesh = sharding.make_mesh(MeshConfig())
  mask_id = cfg.model.vocab_size - 1
  state = train_state.init_state(cfg, mesh)
  step = train_step.compile_train_step(cfg, train_state.model_graphdef(cfg), mesh, state,
                                       mask_id=cfg.model.vocab_size - 1)
  B, L = cfg.train.batch_size, cfg.data.seq_len
  tokens = (np.arange(B)[:, None] + np.arange(L)[None]) % 7  # predictable from any neighbour
  batch = sharding.to_global({'tokens': tokens.astype(np.int32),
                              'attention_mask': np.ones((B, L), np.int32)}, mesh)
  graphdef = train_state.model_graphdef(cfg)
  @jax.jit  # compiled: eager op-by-op dispatch over 8 sharded CPU devices has aborted in CI
  def nelbo(params):  # the same Monte-Carlo draw before and after
    total, count = train_step.loss_sums(params, graphdef, cfg, batch, jax.random.PRNGKey(0), False,
                                        mask_id=mask_id)
    return total / count
  before = float(nelbo(state.params))
  for _ in range(30):
    state, _ = step(state, batch)
  assert float(nelbo(state.params)) < 0.7 * before


@pytest.mark.parametrize('arch,mesh_shape', [('dit', (2, 4)), ('gpt2', (1, 1))])
def test_grad_accumulation_equals_one_step_on_the_whole_batch(micro_cfg, arch, mesh_shape,
                                                              monkeypatch):
  """k = 4 micro-batches (unequal token counts) give the k = 1 step's loss and update: t, masks
  and eps are drawn for the whole batch first (antithetic t spans it), and the summed gradient
  is divided by the whole batch's token count. Without dropout, whose masks differ per k."""
  cfg = config_lib.apply_overrides(micro_cfg, [
      'model.dropout=0.0', 'train.batch_size=32', f'model.arch={arch}'] +
      (['model.noise_dim=8'] if arch == 'dit' else []))
  devices = jax.devices()[:mesh_shape[0] * mesh_shape[1]]
  mesh = sharding.make_mesh(MeshConfig(*mesh_shape), devices=devices)
  micro_sizes, original = [], train_step.micro_batches
  monkeypatch.setattr(train_step, 'micro_batches', lambda rows, k: (
      micro_sizes.append(k), original(rows, k))[1])  # so that an ignored grad_accum cannot pass
  state_1, losses_1 = _run(cfg, mesh, 2)
  state_4, losses_4 = _run(config_lib.apply_overrides(cfg, ['train.grad_accum=4']), mesh, 2)
  assert micro_sizes == [4]  # traced once, for k = 4 only
  np.testing.assert_allclose(losses_4, losses_1, rtol=1e-5)
  chex.assert_trees_all_close(state_4.params, state_1.params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(state_4.opt_state, state_1.opt_state, rtol=1e-5, atol=1e-6)


def test_micro_batches_are_strided_rows():
  rows = {'x': jnp.arange(8 * 3).reshape(8, 3), 'none': None}
  micro = train_step.micro_batches(rows, 4)
  assert micro['x'].shape == (4, 2, 3) and micro['none'] is None
  np.testing.assert_array_equal(micro['x'][1], rows['x'][jnp.array([1, 5])])


def test_indivisible_micro_batches_are_user_errors(micro_cfg):
  cfg = config_lib.apply_overrides(micro_cfg, ['train.grad_accum=4'])  # 4 rows for 8 devices
  mesh = sharding.make_mesh(MeshConfig(data=8, fsdp=1))
  state = train_state.abstract_state(cfg, mesh)
  with pytest.raises(UserError, match=r'^train.batch_size=16 is not divisible by the 8 devices '
                                      r'x train.grad_accum=4$'):
    train_step.compile_train_step(cfg, train_state.model_graphdef(cfg), mesh, state, mask_id=512)
