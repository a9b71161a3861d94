"""Porting a PyTorch MDLM / SDTT / IMDM DiT (or the Hugging Face GPT-2 evaluator) to this
project's checkpoint format: the library behind `convert.py`.

  sources.py       reading a release (safetensors, sharded, .bin, Lightning .ckpt, config.json)
                   into one flat state dict of backbone keys
  architecture.py  the config: read off the tensors, then config.json, the preset and `--set`
  dit.py           the DiT's state dict -> our parameter tree, every key and shape checked
  gpt2.py          Hugging Face GPT-2 -> our causal-LM evaluator
  write.py         the run directory: a step-0 train state, saved all or nothing

Everything is built and checked in memory before anything is written. The result is a step-0 train
state whose params and EMA are both the converted weights, so `train.py --init_from`, sampling and
distillation read it like any run of ours.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from imdm_jax import train_state
from imdm_jax.config import Config
from imdm_jax.convert import architecture, dit, gpt2, sources, write


@dataclasses.dataclass(frozen=True)
class Converted:
  description: str
  n_params: int
  weights: str
  directory: str

  def __str__(self) -> str:
    return (f'converted {self.description}: {self.n_params:,} parameters, {self.weights} -> '
            f'{self.directory}')


def convert(src: str, out: str, raw: bool = False, force: bool = False, tokenizer_path: str = '',
            preset: str | None = None, overrides: Sequence[str] = ()) -> Converted:
  """Ports the checkpoint at `src` into the run directory `out` (checkpoints/, config.json)."""
  out = os.path.abspath(os.path.expanduser(out))
  write.check_output(out, force)
  source = sources.read(src, raw)
  if gpt2.is_gpt2(source.state):  # the Gen PPL evaluator, not a diffusion model
    params, cfg = gpt2.params_and_config(source, overrides, tokenizer_path)
    grafted, k_rng = False, jax.random.PRNGKey(cfg.train.seed)
  else:
    cfg = architecture.resolve_config(source, preset, overrides, tokenizer_path)
    k_params, k_rng = jax.random.split(jax.random.PRNGKey(cfg.train.seed))  # as init_state does
    params, grafted = dit.convert_params(source.state, cfg, k_params)
  weights, ema_count = source.weights, source.ema_count
  del source
  params = jax.tree.map(jnp.array, params)  # copies, so the host tensors are freed here
  state = write.step0_state(cfg, params, k_rng, ema_count)
  write.write(out, state, cfg)
  return Converted(describe(cfg, grafted), train_state.param_count(state.params), weights, out)


def describe(cfg: Config, grafted: bool) -> str:
  m, diff = cfg.model, cfg.diffusion
  if m.arch == 'gpt2':
    return f'GPT-2 {m.n_blocks}x{m.hidden_size}, {m.n_heads} heads, V={m.vocab_size}'
  kind = 'MDLM'
  if m.noise_dim:
    kind = f'IMDM (noise_dim {m.noise_dim}, {diff.noise_type} eps)'
  elif diff.num_mask_states:
    kind = f'finite-mask IMDM (K={diff.num_mask_states})'
  if grafted:
    kind += ' with a fresh noise path on MDLM weights'
  cap = f', soft-cap {m.attn_softcap:g}' if m.attn_softcap else ''
  return f'{kind} DiT {m.n_blocks}x{m.hidden_size}, {m.n_heads} heads{cap}, V={m.vocab_size}'
