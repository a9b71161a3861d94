"""Helpers shared by the conversion tests (`test_convert.py`, `test_convert_refusals.py`).

PyTorch reference networks with random weights, their state dicts saved in every release layout,
the conversion itself, and the checks that a converted checkpoint computes the reference's logits
with every tensor accounted for. Imports torch: import it after `pytest.importorskip('torch')`.
"""

import dataclasses
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imdm_jax import convert as convert_lib
from imdm_jax import init_from, noise, sharding, train_state
from imdm_jax.config import Config, DiffusionConfig, MeshConfig
from imdm_jax.convert import dit

from helpers import MICRO
from torch_weights import params_to_torch

torch = pytest.importorskip('torch')
safetensors_torch = pytest.importorskip('safetensors.torch')
import torch_reference  # pylint: disable=g-import-not-at-top,wrong-import-position

HF_CONFIG = {'architectures': ['MDLM'], 'model_type': 'mdlm', 'vocab_size': 37, 'hidden_dim': 32,
             'cond_dim': 16, 'n_blocks': 2, 'n_heads': 4, 'dropout': 0.0, 'model_length': 64,
             'time_conditioning': False, 'transformers_version': '4.38.2'}


def config(model=MICRO, **diffusion) -> Config:
  return Config(model=model, diffusion=DiffusionConfig(**diffusion))


def torch_model(cfg: Config, seed=0):
  """The reference network with every weight random (the zero-initialised ones too), so that
  every tensor influences the logits and a misplaced one shows."""
  ref = torch_reference.DIT(cfg, cfg.model.vocab_size - 1).eval()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in ref.parameters():
      p.copy_(0.3 * torch.randn(p.shape, generator=gen))
  return ref


def fan_in_random(ref, seed):
  """Weights at the scale of a trained network (std 1/sqrt(fan-in)), so that 12 blocks keep the
  activations O(1) and the comparison is about arithmetic, not overflow."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in ref.parameters():
      std = 1.0 / np.sqrt(p.shape[1]) if p.ndim == 2 else 0.3
      p.copy_(std * torch.randn(p.shape, generator=gen))


def torch_state(ref, prefix='backbone.', buffers=True) -> dict:
  return {prefix + k: v.contiguous() for k, v in ref.state_dict().items()
          if buffers or k not in dit.BUFFERS}


def save_safetensors(state, path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  safetensors_torch.save_file(state, path)
  return path


def convert(src, out, preset='micro', **kw) -> convert_lib.Converted:
  return convert_lib.convert(str(src), str(out), preset=preset, **kw)


def restore(out):
  """What sampling / `--init_from` will see: the EMA weights of the saved checkpoint."""
  ema, saved, _, _ = init_from.load_weights(str(out), sharding.make_mesh(MeshConfig()))
  return nnx.merge(train_state.model_graphdef(saved), ema), ema, saved


def inputs(cfg: Config, seed=0, batch=2, length=16):
  """Tokens with every third position masked, and the mask noise the config's network takes."""
  z = np.array(jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 0,
                                  cfg.model.vocab_size))
  z[:, ::3] = cfg.model.vocab_size - 1
  if not (cfg.model.noise_dim or cfg.diffusion.num_mask_states):
    return z, None
  eps = np.asarray(noise.draw_eps(jax.random.PRNGKey(seed + 1), z.shape, cfg))
  return z, eps


def logits_pair(m, ref, cfg):
  z, eps = inputs(cfg)
  with jax.default_matmul_precision('highest'):
    ours = np.asarray(m(jnp.asarray(z), None, None if eps is None else jnp.asarray(eps),
                        mask_id=cfg.model.vocab_size - 1))
  eps_t = None if eps is None else torch.from_numpy(np.array(eps))
  if eps_t is not None and not eps_t.is_floating_point():
    eps_t = eps_t.long()  # finite mask states index an nn.Embedding
  with torch.no_grad():
    theirs = ref(torch.from_numpy(z).long(), None, eps_t).numpy()
  return ours, theirs


def assert_converted(out, ref, cfg):
  """Logits match the PyTorch model, and every tensor of it landed exactly in one parameter."""
  m, ema, saved = restore(out)
  assert saved.model == dataclasses.replace(cfg.model, dropout=saved.model.dropout)
  ours, theirs = logits_pair(m, ref, cfg)
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
  assert np.abs(theirs).max() > 1.0  # logits that carry signal, not a vacuous match
  expected = {k: v.numpy() for k, v in ref.state_dict().items() if k not in dit.BUFFERS}
  got = params_to_torch(ema)
  assert sorted(got) == sorted(expected)
  for k in expected:
    np.testing.assert_array_equal(got[k], expected[k], err_msg=k)
  return saved


# ----------------------------------------------------------------------------------------------
# Layouts

def layout(kind, tmp_path, ref):
  """Saves `ref` as a release in layout `kind`; returns the SRC to convert."""
  if kind == 'safetensors':
    return save_safetensors(torch_state(ref), str(tmp_path / 'src' / 'model.safetensors'))
  if kind == 'hf_dir':  # no rotary buffer: the head count must come from config.json
    save_safetensors(torch_state(ref, buffers=False), str(tmp_path / 'src' / 'model.safetensors'))
    (tmp_path / 'src' / 'config.json').write_text(json.dumps(HF_CONFIG))
    return tmp_path / 'src'
  if kind == 'bin_dir':
    os.makedirs(tmp_path / 'src')
    torch.save(torch_state(ref), tmp_path / 'src' / 'pytorch_model.bin')
    return tmp_path / 'src'
  if kind == 'double_wrapped':  # SDTT revisions pushed through the HF wrapper twice
    return save_safetensors(torch_state(ref, 'backbone.backbone.'),
                            str(tmp_path / 'src' / 'm.safetensors'))
  if kind == 'sharded':
    state = torch_state(ref)
    keys = sorted(state)
    shards = {'model-00001-of-00002.safetensors': keys[::2],
              'model-00002-of-00002.safetensors': keys[1::2]}
    for name, names in shards.items():
      save_safetensors({k: state[k] for k in names}, str(tmp_path / 'src' / name))
    index = {'metadata': {}, 'weight_map': {k: n for n, ks in shards.items() for k in ks}}
    (tmp_path / 'src' / 'model.safetensors.index.json').write_text(json.dumps(index))
    return tmp_path / 'src'
  raise ValueError(kind)


def lightning(tmp_path, raw_ref, ema_ref, prefix='backbone.', name='mdlm.ckpt'):
  """A Lightning checkpoint as the reference trainer writes it: raw `state_dict`, the EMA as a
  positional list in parameter order, and pickled hyper-parameters (not weights-only loadable)."""
  ckpt = {'state_dict': torch_state(raw_ref, prefix),
          'ema': {'shadow_params': [p.detach().clone() for p in ema_ref.parameters()],
                  'decay': 0.9999, 'num_updates': 7, 'collected_params': None},
          'hyper_parameters': {'config': types.SimpleNamespace(model='small')},
          'global_step': 7, 'epoch': 0}
  torch.save(ckpt, tmp_path / name)
  return tmp_path / name


# ----------------------------------------------------------------------------------------------
# Tokenizers

def tiny_bpe(tmp_path):
  """A byte-level BPE in GPT-2's two file formats (vocab.json + merges.txt, tokenizer.json)."""
  tokenizers = pytest.importorskip('tokenizers')
  tok = tokenizers.ByteLevelBPETokenizer()
  tok.train_from_iterator(['the cat sat on the mat', 'a dog and a cat'] * 20, vocab_size=300,
                          special_tokens=['<|endoftext|>'], show_progress=False)
  os.makedirs(tmp_path / 'pair')
  os.makedirs(tmp_path / 'single')
  tok.save_model(str(tmp_path / 'pair'))
  tok.save(str(tmp_path / 'single' / 'tokenizer.json'))
  return tmp_path / 'pair', tmp_path / 'single'
