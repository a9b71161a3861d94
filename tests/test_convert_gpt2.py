"""Hugging Face GPT-2 weights into the JAX evaluator: conversion and logit parity."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imdm_jax import convert, init_from, sharding, train_state
from imdm_jax.config import MeshConfig
from imdm_jax.errors import UserError


def _hf_gpt2(tmp_path, **sizes):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  cfg = transformers.GPT2Config(vocab_size=61, n_positions=24, n_embd=32, n_layer=2, n_head=4,
                                **sizes)
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():  # biases and LayerNorms too, so every path carries signal
      p.add_(0.2 * torch.randn_like(p))
  state = {k: v.numpy().copy() for k, v in model.state_dict().items() if k != 'lm_head.weight'}
  src = tmp_path / 'hf'
  os.makedirs(src)
  save_file(state, str(src / 'model.safetensors'))
  cfg.to_json_file(str(src / 'config.json'))
  return model, src


def test_hf_gpt2_logits_match(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  model, src = _hf_gpt2(tmp_path)
  convert.convert(str(src), str(tmp_path / 'out'))
  mesh = sharding.make_mesh(MeshConfig())
  cfg = init_from.saved_config(str(tmp_path / 'out'))
  assert cfg.model.arch == 'gpt2' and cfg.model.n_heads == 4 and cfg.data.seq_len == 24
  params = init_from.load_weights(str(tmp_path / "out"), mesh).params
  ours = nnx.merge(train_state.model_graphdef(cfg), jax.device_get(params))
  tokens = np.random.default_rng(0).integers(0, 61, (2, 24))
  with jax.default_matmul_precision('highest'):
    logits = np.asarray(ours(jnp.asarray(tokens)))
  with torch.no_grad():
    expected = model(torch.from_numpy(tokens)).logits.numpy()
  assert np.abs(expected).max() > 1
  np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)


def test_hf_gpt2_bad_heads(tmp_path):
  _, src = _hf_gpt2(tmp_path)
  with pytest.raises(UserError, match='n_heads'):
    convert.convert(str(src), str(tmp_path / 'out'), overrides=['model.n_heads=5'])
  assert not os.path.exists(tmp_path / 'out' / 'checkpoints')
