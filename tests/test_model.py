"""The DiT: reference sizes, bidirectionality, rotary layout, and parity with the PyTorch module."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imdm_jax import config as config_lib
from imdm_jax import model as model_lib
from imdm_jax import train_state, train_step
from imdm_jax.config import Config, DiffusionConfig, ModelConfig
from imdm_jax.convert import dit

from helpers import MICRO, resampled
from torch_weights import params_to_torch


def _count(cfg: ModelConfig) -> int:
  shapes = jax.eval_shape(lambda: train_state.init_params(Config(model=cfg),
                                                          jax.random.PRNGKey(0)))
  return train_state.param_count(shapes)


def test_reference_parameter_counts():
  small = ModelConfig(vocab_size=50258, hidden_size=768, n_blocks=12, n_heads=12)
  block = _count(dataclasses.replace(small, n_blocks=1)) - _count(dataclasses.replace(small, n_blocks=0))
  assert block == 7_677_696  # docs/conversion.md
  assert round(_count(small) / 1e6, 1) == 169.6
  assert round(_count(dataclasses.replace(small, vocab_size=30522)) / 1e6, 1) == 139.3
  large = dataclasses.replace(small, hidden_size=1536, n_blocks=24, n_heads=16)
  assert round(_count(large) / 1e6, 1) == 863.2


def _random_model(cfg: ModelConfig, seed=0, **diffusion) -> model_lib.DiT:
  """A DiT whose zero-initialised layers are random too, so every path carries signal."""
  m = model_lib.DiT(Config(model=cfg, diffusion=DiffusionConfig(**diffusion)), nnx.Rngs(seed))
  graphdef, state = nnx.split(m)
  return nnx.merge(graphdef, resampled(nnx.to_pure_dict(state), seed + 1, 0.3))


def test_fresh_model_outputs_zero_logits():
  m = model_lib.DiT(Config(model=MICRO), nnx.Rngs(0))
  logits = m(jnp.zeros((2, 8), jnp.int32))
  assert logits.shape == (2, 8, MICRO.vocab_size)
  np.testing.assert_array_equal(logits, 0.0)  # zero-initialised output layer


def test_bidirectional_and_attends_to_padding():
  m = _random_model(MICRO)
  z = jax.random.randint(jax.random.PRNGKey(0), (1, 12), 0, 36)
  base = m(z)
  later = z.at[0, 9].set((z[0, 9] + 1) % 36)  # change a token after position 3
  assert not np.allclose(base[0, 3], m(later)[0, 3])
  # there is no attention mask: a "padding" position still influences everything else
  padded = z.at[0, 11].set(0)
  assert not np.allclose(base[0, 0], m(padded)[0, 0])


def test_rotary_is_relative_and_rotate_half():
  q = jax.random.normal(jax.random.PRNGKey(0), (1, 1, 1, 8))
  k = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 1, 8))
  def score(i, j):
    qi = model_lib.apply_rotary(jnp.broadcast_to(q, (1, 32, 1, 8)), jnp.arange(32))[0, i, 0]
    kj = model_lib.apply_rotary(jnp.broadcast_to(k, (1, 32, 1, 8)), jnp.arange(32))[0, j, 0]
    return float(qi @ kj)
  np.testing.assert_allclose(score(3, 7), score(10, 14), rtol=1e-5)
  # rotate-half: dims d and d + Dh/2 form a pair rotated by the same angle
  x = jnp.zeros((1, 2, 1, 8)).at[0, :, 0, 0].set(1.0)
  y = model_lib.apply_rotary(x, jnp.arange(2))[0, 1, 0]
  np.testing.assert_allclose([y[0], y[4]], [np.cos(1.0), np.sin(1.0)], rtol=1e-6)


def test_timestep_features_cosine_first():
  f = model_lib.timestep_features(jnp.zeros((1,)))
  np.testing.assert_array_equal(f[0, :128], 1.0)
  np.testing.assert_array_equal(f[0, 128:], 0.0)


@pytest.mark.parametrize('noise_dim,noise_type,states', [(8, 'uniform', 0), (8, 'learnable', 0),
                                                         (0, 'uniform', 5)])
def test_port_round_trip_names(noise_dim, noise_type, states):
  cfg = Config(model=dataclasses.replace(MICRO, noise_dim=noise_dim),
               diffusion=DiffusionConfig(noise_type=noise_type, num_mask_states=states))
  params = nnx.to_pure_dict(nnx.state(model_lib.DiT(cfg, nnx.Rngs(0))))
  sd = params_to_torch(params)
  assert 'blocks.1.mlp.2.weight' in sd and 'sigma_map.mlp.0.bias' in sd
  assert 'output_layer.linear.weight' in sd
  assert sd['blocks.0.attn_qkv.weight'].shape == (96, 32)  # torch [out, in]
  if states:
    assert sd['vocab_embed.imdm_mlp.weight'].shape == (5, 32)
  else:
    assert 'vocab_embed.imdm_mlp.2.weight' in sd
  if noise_type == 'learnable':
    assert sd['vocab_embed.learnable_noise_mu'].shape == (1, 1, 8)
  back = dit.params_from_torch(sd, params)
  jax.tree.map(np.testing.assert_array_equal, back, params)


@pytest.mark.parametrize('softcap,noise_dim,time_cond,diffusion', [
    (0.0, 0, False, {}), (50.0, 8, False, {}), (0.0, 0, True, {}),
    (0.0, 8, False, {'noise_type': 'learnable'}), (0.0, 0, False, {'num_mask_states': 3})])
def test_parity_with_pytorch_reference(softcap, noise_dim, time_cond, diffusion):
  torch = pytest.importorskip('torch')
  import torch_reference  # pylint: disable=g-import-not-at-top
  cfg = dataclasses.replace(MICRO, attn_softcap=softcap, noise_dim=noise_dim,
                            time_conditioning=time_cond)
  m = _random_model(cfg, seed=3, **diffusion)
  params = nnx.to_pure_dict(nnx.state(m))
  ref = torch_reference.DIT(Config(model=cfg, diffusion=DiffusionConfig(**diffusion)),
                            cfg.vocab_size - 1).eval()
  sd = {k: torch.from_numpy(np.array(v)) for k, v in params_to_torch(params).items()}
  missing, unexpected = ref.load_state_dict(sd, strict=False)
  assert list(missing) == ['rotary_emb.inv_freq'] and not unexpected
  z = np.array(jax.random.randint(jax.random.PRNGKey(5), (2, 16), 0, cfg.vocab_size))
  z[:, ::3] = cfg.vocab_size - 1
  if diffusion.get('num_mask_states'):
    eps = np.array(jax.random.randint(jax.random.PRNGKey(6), (2, 16), 0, 3))
    eps_t = torch.from_numpy(eps).long()
  else:
    eps = np.array(jax.random.uniform(jax.random.PRNGKey(6), (2, 16, noise_dim or 1), minval=-1))
    eps_t = torch.from_numpy(eps)
  imdm = bool(noise_dim or diffusion)
  sigma = np.array([0.3, 1.7], np.float32)
  with jax.default_matmul_precision('highest'):
    ours = np.asarray(m(jnp.asarray(z), jnp.asarray(sigma), jnp.asarray(eps) if imdm else None,
                         mask_id=cfg.vocab_size - 1))
  with torch.no_grad():
    theirs = ref(torch.from_numpy(z).long(), torch.from_numpy(sigma), eps_t if imdm else None).numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('softcap', [0.0, 2.0])
def test_attention_custom_gradient_matches_autodiff(softcap):
  q, k, v, w = (jax.random.normal(jax.random.PRNGKey(i), (2, 6, 3, 4)) for i in range(4))

  def naive(q, k, v):
    logits = jnp.einsum('blhd,bmhd->bhlm', q, k) / 2.0
    if softcap:
      logits = softcap * jnp.tanh(logits / softcap)
    return jnp.einsum('bhlm,bmhd->blhd', jax.nn.softmax(logits, -1), v)

  def loss(fn):
    return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)) * w)

  with jax.default_matmul_precision('highest'):
    ours = jax.grad(loss(lambda q, k, v: model_lib.attention(q, k, v, softcap)), (0, 1, 2))(q, k, v)
    ref = jax.grad(loss(naive), (0, 1, 2))(q, k, v)
    np.testing.assert_allclose(model_lib.attention(q, k, v, softcap), naive(q, k, v), atol=1e-6)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('arch', ['dit', 'gpt2'])
def test_remat_gives_the_same_loss_and_gradients(arch):
  """`model.remat` recomputes each block in the backward pass: same numbers (dropout included:
  the recomputation reuses its keys), fewer saved residuals (tests/test_memory.py counts them)."""
  cfg = config_lib.resolve('micro', [f'model.arch={arch}', 'model.attn_softcap=5.0'])
  mask_id = cfg.model.vocab_size - 1
  params = train_state.init_params(cfg, jax.random.PRNGKey(0))
  params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(1), x.shape),
                        params)
  B, L = 4, cfg.data.seq_len
  batch = {'tokens': jax.random.randint(jax.random.PRNGKey(2), (B, L), 0, mask_id),
           'attention_mask': jnp.ones((B, L), jnp.int32)}
  out = []
  for remat in ('false', 'true'):
    c = config_lib.apply_overrides(cfg, [f'model.remat={remat}'])
    graphdef = train_state.model_graphdef(c)

    def mean_loss(p, c=c, graphdef=graphdef):
      total, count = train_step.loss_sums(p, graphdef, c, batch, jax.random.PRNGKey(3), True,
                                          mask_id=mask_id)
      return total / count

    out.append(jax.jit(jax.value_and_grad(mean_loss))(params))
  (loss, grads), (loss_remat, grads_remat) = out
  np.testing.assert_allclose(loss_remat, loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads_remat, grads)
