"""Per-device memory estimates: exact state bytes under FSDP, activations against XLA's count."""

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh

from imdm_jax import config as config_lib, memory, sharding, train_state, train_step
from imdm_jax.config import MeshConfig
from imdm_jax.errors import UserError

OWT_LARGE_PARAMS = 863_158_098  # SDTT's "860M" teacher (tests/test_model.py counts it too)


def test_owt_large_fsdp8_holds_an_eighth_of_the_parameters_per_device():
  cfg = config_lib.resolve('owt-large')
  full = memory.estimate(cfg, AbstractMesh((1, 1), sharding.AXES))
  fsdp = memory.estimate(cfg, sharding.make_mesh(MeshConfig(fsdp=8)))  # the 8 fake devices
  assert fsdp.n_params == full.n_params == OWT_LARGE_PARAMS
  assert full.params == 4 * OWT_LARGE_PARAMS
  # Independently of the rules: every matrix is split 8 ways, every vector (biases, norm scales)
  # replicated, which costs 0.4 % over an exact eighth.
  shapes = jax.eval_shape(lambda: train_state.init_params(cfg, cfg.model.vocab_size - 1,
                                                          jax.random.PRNGKey(0)))
  matrices = sum(x.size for x in jax.tree.leaves(shapes) if x.ndim == 2)
  vectors = sum(x.size for x in jax.tree.leaves(shapes) if x.ndim == 1)
  assert matrices + vectors == OWT_LARGE_PARAMS and matrices % 8 == 0
  assert fsdp.params == 4 * (matrices // 8 + vectors)
  assert fsdp.params / (full.params / 8) == pytest.approx(1.0, abs=5e-3)
  assert fsdp.ema == fsdp.params == fsdp.gradients
  assert 0 < fsdp.optimizer - 2 * fsdp.params < 64  # Adam's two moments; counters, step, RNG
  assert fsdp.gathered == 4 * 50_258 * 1_536  # the largest weight (embedding) whole
  assert full.activations == 8 * fsdp.activations  # the batch is split over all 8 devices
  assert '\n' not in fsdp.summary() and '863.2M parameters' in fsdp.summary()


@pytest.mark.parametrize('shape', [(1, 8), (2, 4), (8, 1)])
def test_state_bytes_equal_what_each_device_holds(micro_cfg, shape):
  mesh = sharding.make_mesh(MeshConfig(*shape))
  est = memory.estimate(micro_cfg, mesh)
  state = train_state.init_state(micro_cfg, micro_cfg.model.vocab_size - 1, mesh)

  def per_device(tree) -> set[int]:
    held = {d: 0 for d in mesh.devices.flat}
    for x in jax.tree.leaves(tree):
      for shard in x.addressable_shards:
        held[shard.device] += shard.data.nbytes
    return set(held.values())

  assert per_device(state.params) == {est.params}
  assert per_device(state.ema) == {est.ema}
  assert per_device((state.opt_state, state.step, state.rng)) == {est.optimizer}


@pytest.mark.parametrize('preset', ['micro', 'tiny'])
def test_activation_estimate_is_close_to_xla_temporary_allocation(preset):
  """XLA's buffer assignment for the compiled step (one device) holds the activations, the
  gradients and transient buffers; the estimate of the first two is within 30 % of it."""
  cfg = config_lib.resolve(preset)
  mesh = sharding.make_mesh(MeshConfig(1, 1), devices=jax.devices()[:1])
  mask_id = cfg.model.vocab_size - 1
  state = train_state.abstract_state(cfg, mask_id, mesh)
  step = train_step.compile_train_step(cfg, train_state.model_graphdef(cfg, mask_id), mesh, state)
  rows = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.data.seq_len), np.int32,
                              sharding=sharding.batch_sharding(mesh))
  xla = step.lower(state, {'tokens': rows, 'attention_mask': rows}).compile().memory_analysis()
  est = memory.estimate(cfg, mesh)
  assert 0.9 < xla.temp_size_in_bytes / (est.activations + est.gradients) < 1.3


def test_indivisible_batch_is_a_user_error(micro_cfg):
  with pytest.raises(UserError, match='train.batch_size=16 is not divisible by the 24 devices'):
    memory.estimate(micro_cfg, AbstractMesh((3, 8), sharding.AXES))
