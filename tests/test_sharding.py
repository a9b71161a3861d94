"""Parameter sharding: the logical axes each parameter declares where the model makes it, laid
out on the mesh by `sharding.RULES` (first evenly dividing dimension, each mesh axis once)."""

import functools

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from imdm_jax import config as config_lib, model, sharding, train_state
from imdm_jax.config import MeshConfig

FINITE_MASK = 'tiny-imdm,diffusion.num_mask_states=4,model.noise_dim=0'

DIT_BLOCK = {'attn_qkv/kernel': ('embed', 'qkv'), 'attn_out/kernel': ('qkv', 'embed'),
             'mlp_in/kernel': ('embed', 'mlp'), 'mlp_out/kernel': ('mlp', 'embed'),
             'adaLN_modulation/kernel': ('cond', 'modulation')}
DIT = {'vocab_embed/embedding': ('vocab', 'embed'),
       'sigma_map/mlp_in/kernel': ('freq', 'cond'), 'sigma_map/mlp_out/kernel': ('cond', 'cond'),
       'output_layer/linear/kernel': ('embed', 'vocab'),
       'output_layer/adaLN_modulation/kernel': ('cond', 'modulation')}
NOISE_MLP = {'vocab_embed/imdm_mlp/mlp_in/kernel': ('noise', 'mlp'),
             'vocab_embed/imdm_mlp/mlp_out/kernel': ('mlp', 'embed')}
GPT2_BLOCK = {'attn/c_attn/kernel': ('embed', 'qkv'), 'attn/c_proj/kernel': ('qkv', 'embed'),
              'mlp/c_fc/kernel': ('embed', 'mlp'), 'mlp/c_proj/kernel': ('mlp', 'embed')}
GPT2 = {'wte': ('vocab', 'embed'), 'wpe': ('pos', 'embed')}


def _cfg(preset: str) -> config_lib.Config:
  name, *overrides = preset.split(',')
  return config_lib.resolve(name, overrides)


def _mesh(name: str):
  if name == 'abstract4x64':  # 256 chips we do not have
    return AbstractMesh((4, 64), sharding.AXES)
  fsdp = int(name.removeprefix('fsdp'))
  return sharding.make_mesh(MeshConfig(data=8 // fsdp, fsdp=fsdp))  # the 8 fake devices


@functools.cache
def _specs(preset: str, mesh: str) -> dict[str, P]:
  """The PartitionSpec of every leaf of `abstract_state`, by path ('opt_state/1/0/mu/wte')."""
  state = train_state.abstract_state(_cfg(preset), _mesh(mesh))
  return {sharding.path_str(p): x.sharding.spec
          for p, x in jax.tree_util.tree_leaves_with_path(state)}


def _block(table: dict, prefix: str, n: int) -> dict:
  return {f'{prefix}/{i}/{k}': v for i in range(n) for k, v in table.items()}


@pytest.mark.parametrize('preset,expected', [
    ('micro', {**DIT, **_block(DIT_BLOCK, 'blocks', 2)}),
    ('tiny-imdm', {**DIT, **NOISE_MLP, **_block(DIT_BLOCK, 'blocks', 4)}),
    (FINITE_MASK, {**DIT, **_block(DIT_BLOCK, 'blocks', 4)}),  # the [K, d] table declares none
    ('tiny-ar', {**GPT2, **_block(GPT2_BLOCK, 'h', 4)}),
    ('owt-large', {**DIT, **_block(DIT_BLOCK, 'blocks', 24)}),
])
def test_the_model_declares_the_logical_axes_of_its_parameters(preset, expected):
  cfg = _cfg(preset)
  axes = train_state.param_axes(cfg)
  assert axes == expected
  # every matrix but the finite mask-state table declares its axes; no vector (bias, norm) does
  shapes = jax.eval_shape(lambda: train_state.init_params(cfg, jax.random.PRNGKey(0)))
  ndim = {sharding.path_str(p): x.ndim for p, x in jax.tree_util.tree_leaves_with_path(shapes)}
  assert {p for p, n in ndim.items() if n == 2} - set(axes) == (
      {'vocab_embed/imdm_states/embedding'} if preset == FINITE_MASK else set())
  assert all(ndim[p] == len(a) for p, a in axes.items())


# (preset, mesh, parameter, spec), the layout the path-regex table gave before the axes moved
# onto the parameters. On a mesh axis that does not divide a dimension the next dimension is
# tried: owt-large's vocabulary of 50258 splits 2 ways but not 8.
LAYOUT = [
    ('owt-large', 'fsdp8', 'vocab_embed/embedding', P(None, 'fsdp')),
    ('owt-large', 'fsdp2', 'vocab_embed/embedding', P('fsdp', None)),
    ('owt-large', 'fsdp8', 'output_layer/linear/kernel', P('fsdp', None)),
    ('owt-large', 'fsdp8', 'output_layer/linear/bias', P()),
    ('owt-large', 'fsdp8', 'blocks/23/mlp_out/kernel', P('fsdp', None)),
    ('owt-large', 'fsdp8', 'blocks/0/adaLN_modulation/kernel', P('fsdp', None)),
    ('owt-large', 'fsdp8', 'blocks/0/norm1/weight', P()),
    ('owt-large', 'abstract4x64', 'vocab_embed/embedding', P(None, 'fsdp')),
    ('owt-large', 'abstract4x64', 'sigma_map/mlp_in/kernel', P('fsdp', None)),
    ('micro', 'fsdp1', 'vocab_embed/embedding', P('fsdp', None)),
    ('micro', 'fsdp8', 'vocab_embed/embedding', P(None, 'fsdp')),
    ('micro', 'fsdp8', 'blocks/1/attn_qkv/kernel', P('fsdp', None)),
    ('micro', 'abstract4x64', 'vocab_embed/embedding', P(None, None)),  # 513 x 32: neither
    ('micro', 'abstract4x64', 'blocks/0/attn_qkv/kernel', P(None, None)),  # 32 x 96
    ('micro', 'abstract4x64', 'blocks/0/mlp_in/kernel', P(None, 'fsdp')),  # 32 x 128
    ('micro', 'abstract4x64', 'blocks/0/mlp_out/kernel', P('fsdp', None)),  # 128 x 32
    ('micro', 'abstract4x64', 'blocks/0/adaLN_modulation/kernel', P(None, 'fsdp')),  # 16 x 192
    ('micro', 'abstract4x64', 'sigma_map/mlp_in/kernel', P('fsdp', None)),  # 256 x 16
    ('micro', 'abstract4x64', 'sigma_map/mlp_out/kernel', P(None, None)),  # 16 x 16
    ('tiny-imdm', 'fsdp8', 'vocab_embed/imdm_mlp/mlp_in/kernel', P('fsdp', None)),
    ('tiny-imdm', 'fsdp8', 'vocab_embed/imdm_mlp/mlp_in/bias', P()),
    ('tiny-imdm', 'fsdp8', 'vocab_embed/imdm_mlp/mlp_out/kernel', P('fsdp', None)),
    ('tiny-imdm', 'abstract4x64', 'vocab_embed/embedding', P(None, 'fsdp')),
    (FINITE_MASK, 'fsdp8', 'vocab_embed/imdm_states/embedding', P()),
    ('lm1b-small-imdm', 'fsdp8', 'vocab_embed/embedding', P(None, 'fsdp')),
    ('lm1b-small-imdm', 'fsdp2', 'output_layer/linear/kernel', P('fsdp', None)),
    ('tiny-ar', 'fsdp8', 'h/3/attn/c_attn/kernel', P('fsdp', None)),
    ('tiny-ar', 'fsdp8', 'h/0/mlp/c_proj/kernel', P('fsdp', None)),
    ('tiny-ar', 'fsdp8', 'ln_f/weight', P()),
    # The regex table anchored these two at the start of the path ('^wte$'): they were sharded
    # in the params alone (the eval step) but replicated in the train state. Now both shard.
    ('tiny-ar', 'fsdp8', 'wte', P(None, 'fsdp')),  # 2049 x 128
    ('tiny-ar', 'fsdp1', 'wte', P('fsdp', None)),
    ('tiny-ar', 'abstract4x64', 'wpe', P(None, 'fsdp')),  # 'pos' has no rule
]


@pytest.mark.parametrize('preset,mesh,param,spec', LAYOUT)
def test_train_state_layout(preset, mesh, param, spec):
  """The parameter, its EMA and both Adam moments share one layout."""
  specs = _specs(preset, mesh)
  found = {p: s for p, s in specs.items() if p == f'params/{param}' or p.endswith(f'/{param}')}
  assert {p.split('/')[0] for p in found} == {'params', 'ema', 'opt_state'}
  assert len(found) == 4, found  # params, EMA, Adam's mu and nu
  assert set(found.values()) == {spec}, found


@pytest.mark.parametrize('preset', ['tiny-imdm', 'tiny-ar'])
def test_every_tree_at_parameter_paths_gets_the_same_layout(preset):
  """The params alone (the eval step's argument), the EMA and the optimizer moments are laid out
  as the params of the train state; everything else (step, RNG, Adam's counts) is replicated."""
  cfg, mesh = _cfg(preset), _mesh('fsdp8')
  specs = _specs(preset, 'fsdp8')
  params = {k.removeprefix('params/'): s for k, s in specs.items() if k.startswith('params/')}
  alone = sharding.tree_shardings(
      jax.eval_shape(lambda: train_state.init_params(cfg, jax.random.PRNGKey(0))), mesh,
      train_state.param_axes(cfg))
  assert {sharding.path_str(p): s.spec
          for p, s in jax.tree_util.tree_leaves_with_path(alone)} == params
  for path, spec in specs.items():
    mirrored = [p for p in params if path.endswith('/' + p)]
    if mirrored:
      assert spec == params[max(mirrored, key=len)], path
    else:
      assert spec == P(), path
  assert sum(s != P() for s in specs.values()) == 4 * sum(s != P() for s in params.values())


def test_tree_shardings_matches_the_longest_parameter_path():
  mesh = AbstractMesh((1, 8), sharding.AXES)
  axes = {'kernel': ('embed', 'pos'), 'inner/kernel': ('pos', 'embed'), 'table': (None, 'mlp')}
  x = jax.ShapeDtypeStruct((16, 16), jnp.float32)
  tree = {'kernel': x, 'mu': {'inner': {'kernel': x}, 'kernel': x},
          'table': x, 'other': x, 'count': jax.ShapeDtypeStruct((), jnp.int32),
          'moments': [{'table': jax.ShapeDtypeStruct((16,), jnp.float32)}]}  # another rank
  specs = jax.tree.map(lambda s: s.spec, sharding.tree_shardings(tree, mesh, axes))
  assert specs == {
      'kernel': P('fsdp', None),
      'mu': {'inner': {'kernel': P(None, 'fsdp')}, 'kernel': P('fsdp', None)},
      'table': P(None, 'fsdp'), 'other': P(), 'count': P(), 'moments': [{'table': P()}]}
  # each mesh axis once, the first dividing dimension; a dimension no rule names stays whole
  assert sharding.partition_spec(('embed', 'mlp'), (16, 16), mesh) == P('fsdp', None)
  assert sharding.partition_spec(('embed', 'mlp'), (12, 16), mesh) == P(None, 'fsdp')
  assert sharding.partition_spec(('pos', 'embed'), (16, 12), mesh) == P(None, None)
  assert sharding.partition_spec(None, (16, 16), mesh) == P()


def test_axes_are_metadata_only():
  """Declaring axes changes no value: the pure dict of params holds arrays only, and a model is
  made without any mesh (Flax's eager sharding is off for these logical names)."""

  def plain(tree) -> bool:
    return type(tree) is dict and all(
        plain(x) if isinstance(x, dict) else isinstance(x, jax.Array)
        for x in tree.values())

  assert plain(train_state.init_params(_cfg('micro'), jax.random.PRNGKey(0)))
  init = nnx.initializers.normal(0.02)
  key = jax.random.PRNGKey(1)
  assert jnp.array_equal(model.with_axes(init, 'embed', 'mlp')(key, (4, 8), jnp.float32).raw_value,
                         init(key, (4, 8), jnp.float32))


def test_a_declaration_of_the_wrong_rank_is_refused():

  class Bad(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(model.with_axes(nnx.initializers.zeros, 'embed')(
          jax.random.PRNGKey(0), (4, 4), jnp.float32))

  with pytest.raises(ValueError, match=r"parameter w of shape \(4, 4\) declares the axes"):
    sharding.param_axes(nnx.eval_shape(Bad))
