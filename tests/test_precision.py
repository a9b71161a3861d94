"""Mixed precision (`model.dtype='bfloat16'`): bf16 matmuls; float32 parameters, gradients,
LayerNorm, softmax, logits and loss. The float32 path is unchanged (the other tests)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imdm_jax import config as config_lib
from imdm_jax import model as model_lib
from imdm_jax import train_state, train_step

from helpers import perturbed

# bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2 %) of every matmul input: logits of
# size ~1 then differ from float32 by a few 1e-3 (measured: <= 4e-3 on `tiny`, 1.3e-2 for GPT-2)
LOGIT_ATOL = 3e-2
GRAD_RTOL = 3e-2  # relative L2 error of the whole gradient (measured 0.5-1 %)

VARIANTS = {'mdlm': [], 'imdm-softcap-time': ['model.noise_dim=8', 'model.attn_softcap=5.0',
                                              'model.time_conditioning=true'],
            'gpt2': ['model.arch=gpt2']}


def _bf16_dots(lowered_text: str) -> int:
  return sum('dot_general' in line and 'xbf16>' in line for line in lowered_text.splitlines())


@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_bf16_is_close_to_float32_with_float32_params_grads_and_loss(variant):
  cfg = config_lib.resolve('micro', VARIANTS[variant] + ['model.dropout=0.0'])
  bf16 = config_lib.apply_overrides(cfg, ['model.dtype=bfloat16'])
  mask_id = cfg.model.vocab_size - 1
  init32 = train_state.init_params(cfg, jax.random.PRNGKey(0))
  init16 = train_state.init_params(bf16, jax.random.PRNGKey(0))
  jax.tree.map(np.testing.assert_array_equal, init16, init32)  # float32 master weights
  assert {x.dtype for x in jax.tree.leaves(init16)} == {jnp.dtype(jnp.float32)}
  params = perturbed(init32, 1, 0.05)  # every path live, the zero-initialised layers too
  B, L = 4, cfg.data.seq_len
  tokens = jax.random.randint(jax.random.PRNGKey(2), (B, L), 0, mask_id)
  batch = {'tokens': tokens, 'attention_mask': jnp.ones((B, L), jnp.int32)}

  def run(c):
    graphdef = train_state.model_graphdef(c)

    def mean_loss(p):
      total, count = train_step.loss_sums(p, graphdef, c, batch, jax.random.PRNGKey(3), True,
                                          mask_id=mask_id)
      return total / count

    def logits(p):
      m = nnx.merge(graphdef, p)
      if c.model.arch == 'gpt2':
        return m(tokens)
      eps = jax.random.uniform(jax.random.PRNGKey(4), (B, L, 8), minval=-1.0)
      return m(tokens.at[:, ::3].set(mask_id), jnp.full((B,), 0.5),
               eps if c.model.noise_dim else None, mask_id=mask_id)

    fn = jax.jit(lambda p: (jax.value_and_grad(mean_loss)(p), logits(p)))
    return fn(params), _bf16_dots(fn.lower(params).as_text())

  ((loss32, grads32), logits32), dots32 = run(cfg)
  ((loss16, grads16), logits16), dots16 = run(bf16)
  assert dots32 == 0 and dots16 >= 4 * cfg.model.n_blocks  # the blocks' matmuls run in bf16
  assert logits16.dtype == loss16.dtype == jnp.float32
  assert {x.dtype for x in jax.tree.leaves(grads16)} == {jnp.dtype(jnp.float32)}
  np.testing.assert_allclose(logits16, logits32, atol=LOGIT_ATOL)
  assert not np.array_equal(logits16, logits32)  # bf16 really changed something
  np.testing.assert_allclose(loss16, loss32, rtol=1e-3)
  flat = lambda g: np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])
  g16, g32 = flat(grads16), flat(grads32)
  assert np.linalg.norm(g16 - g32) < GRAD_RTOL * np.linalg.norm(g32)


@pytest.mark.parametrize('softcap', [0.0, 2.0])
def test_attention_custom_gradient_in_bf16(softcap):
  """The hand-written VJP in bf16 (softmax and its backward in float32) against float32 autodiff
  of the textbook formula; outputs and gradients keep the inputs' dtype."""
  q, k, v, w = (jax.random.normal(jax.random.PRNGKey(i), (2, 16, 3, 8)) for i in range(4))

  def naive(q, k, v):
    logits = jnp.einsum('blhd,bmhd->bhlm', q, k) / np.sqrt(8.0)
    if softcap:
      logits = softcap * jnp.tanh(logits / softcap)
    return jnp.einsum('bhlm,bmhd->blhd', jax.nn.softmax(logits, -1), v)

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)

  ours = jax.jit(jax.value_and_grad(loss(lambda q, k, v: model_lib.attention(q, k, v, softcap)),
                                    (0, 1, 2)))
  with jax.default_matmul_precision('highest'):
    ref_value, ref_grads = jax.value_and_grad(loss(naive), (0, 1, 2))(q, k, v)
  as_bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  value, grads = ours(*as_bf16)
  assert model_lib.attention(*as_bf16, softcap).dtype == jnp.bfloat16
  np.testing.assert_allclose(value, ref_value, rtol=2e-2)
  for g, ref in zip(grads, ref_grads):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(g.astype(jnp.float32), ref, atol=3e-2 * float(jnp.abs(ref).max()))
