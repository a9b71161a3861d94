"""Hugging Face GPT-2 weights (`gpt2` ... `gpt2-large`, the paper's evaluator) -> our `GPT2`.

HF's GPT-2 uses Conv1D layers whose weights are already `[in, out]`, so nothing is transposed;
keys are our paths with `transformer.` stripped (`h.3.attn.c_attn.weight` -> h/3/attn/c_attn/
kernel). The output layer is tied to `wte` (an `lm_head.weight` copy, if saved, must equal it).
The causal masks HF stores as buffers (`attn.bias`, `attn.masked_bias`) are not weights.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import jax
import numpy as np

from imdm_jax import config as config_lib, init_from, train_state
from imdm_jax.config import Config
from imdm_jax.convert.sources import Source
from imdm_jax.data import pretrained
from imdm_jax.errors import UserError

_BUFFER = re.compile(r'(^|\.)attn\.(masked_)?bias$')
_LINEARS = ('c_attn', 'c_proj', 'c_fc')


def params_and_config(source: Source, overrides: Sequence[str],
                      tokenizer_path: str) -> tuple[dict, Config]:
  """The evaluator's parameters (host arrays) and config, checked against a fresh model's tree and,
  given `tokenizer_path`, against the GPT-2 tokenizer there."""
  params, sizes = params_from_hf(source.state)
  cfg = config_for(sizes, source.stated.get('n_head'), list(overrides))
  if tokenizer_path:
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer_path=tokenizer_path))
    tokenizer = pretrained.load('gpt2', tokenizer_path)
    if tokenizer.mask_id != cfg.model.vocab_size:  # the BPE ids, without our appended mask
      raise UserError(f'the gpt2 tokenizer at {tokenizer_path} has {tokenizer.mask_id} ids, the '
                      f'tensors V={cfg.model.vocab_size}')
  template = jax.eval_shape(lambda key: train_state.init_params(cfg, key), jax.random.PRNGKey(0))
  init_from.graft(template, params, 'convert')  # every parameter present, every shape right
  return params, cfg


def is_gpt2(state: dict[str, np.ndarray]) -> bool:
  return any(k in state for k in ('wte.weight', 'transformer.wte.weight'))


def params_from_hf(state: dict[str, np.ndarray]) -> tuple[dict, dict[str, int]]:
  """Our GPT-2 parameter tree and its sizes {V, d, n_blocks, ctx} from an HF state dict."""
  state = {k.removeprefix('transformer.'): v for k, v in state.items()}
  tied = state.pop('lm_head.weight', None)
  if tied is not None and not np.array_equal(tied, state.get('wte.weight')):
    raise UserError('lm_head.weight differs from wte.weight: not a tied GPT-2')
  params: dict = {}
  for key, value in state.items():
    if _BUFFER.search(key):
      continue
    parts = [int(p) if p.isdigit() else p for p in key.split('.')]
    if parts[-1] == 'weight':
      if len(parts) >= 2 and parts[-2] in _LINEARS:
        parts[-1] = 'kernel'
      elif parts[0] in ('wte', 'wpe'):
        parts = parts[:-1]
    node = params
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = np.asarray(value, np.float32)
  try:
    vocab, width = params['wte'].shape
    sizes = {'vocab_size': vocab, 'hidden_size': width, 'n_blocks': len(params['h']),
             'ctx': params['wpe'].shape[0]}
  except (KeyError, AttributeError) as e:
    raise UserError(f'not a GPT-2 state dict (missing {e})') from None
  return params, sizes


def config_for(sizes: dict[str, int], n_heads: int | None, overrides: Sequence[str]) -> Config:
  """The evaluator's config: GPT-2 BPE, context `ctx`, heads from the known GPT-2 sizes."""
  heads = n_heads or {768: 12, 1024: 16, 1280: 20, 1600: 25}.get(sizes['hidden_size'])
  if not heads:
    raise UserError(f'GPT-2 width {sizes["hidden_size"]}: pass --set model.n_heads=H')
  cfg = config_lib.resolve('owt-small')
  cfg = dataclasses.replace(
      cfg, model=dataclasses.replace(cfg.model, arch='gpt2', vocab_size=sizes['vocab_size'],
                                     hidden_size=sizes['hidden_size'], n_blocks=sizes['n_blocks'],
                                     n_heads=heads, dropout=0.0),
      data=dataclasses.replace(cfg.data, seq_len=sizes['ctx']))
  cfg = config_lib.apply_overrides(cfg, overrides)
  cfg.validate()
  return cfg
