"""Initialising a run from another run's (or a converted) checkpoint: `train.py --init_from`.

The EMA weights of the source become the new run's weights and the start of its EMA; the
optimizer, step and data order start fresh. Parameters the source lacks are allowed only where
the new model extends the old one with the IMDM mask-noise path, which starts at zero so that step
0 computes exactly the source model. Anything else that differs is refused, naming the first
mismatching parameter.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from imdm_jax import checkpoint, sharding, train_state
from imdm_jax.config import Config
from imdm_jax.errors import UserError

NEW_PARAMETER_PREFIXES = ('vocab_embed/imdm_mlp/', 'vocab_embed/imdm_states/')


def _flat(tree) -> dict[str, jax.Array]:
  return {sharding.path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def graft(target: train_state.Params, source: train_state.Params, where: str) -> train_state.Params:
  """`target` with every parameter replaced by the one of the same name in `source`."""
  tgt, src = _flat(target), _flat(source)
  for name in sorted(set(tgt) | set(src)):
    if name not in tgt:
      raise UserError(f'{where}: checkpoint parameter {name} has no counterpart in this model')
    if name not in src:
      if not name.startswith(NEW_PARAMETER_PREFIXES):
        raise UserError(f'{where}: this model has parameter {name}, the checkpoint does not')
      continue
    if tgt[name].shape != src[name].shape:
      raise UserError(f'{where}: parameter {name} has shape {tuple(src[name].shape)} in the '
                      f'checkpoint, {tuple(tgt[name].shape)} in this model')
  leaves = [src.get(sharding.path_str(p), x) for p, x in jax.tree_util.tree_leaves_with_path(target)]
  return jax.tree.unflatten(jax.tree.structure(target), leaves)


def checkpoint_dir(path: str) -> str:
  """Accepts a run's workdir or its `checkpoints/` directory."""
  path = os.path.abspath(os.path.expanduser(path))
  nested = os.path.join(path, 'checkpoints')
  return nested if os.path.isdir(nested) else path


def _open(path: str) -> checkpoint.Checkpointer:
  directory = checkpoint_dir(path)
  if not os.path.isdir(directory):
    raise UserError(f'{path}: no such directory')
  ckpt = checkpoint.Checkpointer(directory)
  if ckpt.latest_step() is None:
    raise UserError(f'{path}: no checkpoint in {directory}')
  return ckpt


def saved_config(path: str) -> Config:
  """The config saved with the latest checkpoint under `path`."""
  ckpt = _open(path)
  cfg = ckpt.saved_config()
  ckpt.close()
  return cfg


def load_ema(path: str, mask_id: int, mesh: Mesh) -> tuple[train_state.Params, Config]:
  """The EMA weights of the latest checkpoint under `path`, laid out on `mesh`."""
  ckpt = _open(path)
  saved = ckpt.saved_config()
  # only the EMA is read: the raw weights and the optimizer's moments (3x more) stay on disk
  ema = ckpt.restore_part('ema', train_state.abstract_state(saved, mask_id, mesh).ema)
  ckpt.close()
  return ema, saved


def initialise(state: train_state.TrainState, cfg: Config, path: str, mask_id: int,
               mesh: Mesh) -> train_state.TrainState:
  ema, saved = load_ema(path, mask_id, mesh)
  if saved.model.vocab_size != cfg.model.vocab_size or saved.data.tokenizer != cfg.data.tokenizer:
    raise UserError(f'--init_from {path}: vocabulary {saved.data.tokenizer}/{saved.model.vocab_size}'
                    f' differs from this run\'s {cfg.data.tokenizer}/{cfg.model.vocab_size}')
  params = graft(state.params, ema, f'--init_from {path}')
  # Separate buffers: the train step donates its input state, and a buffer donated twice crashes.
  return state.replace(params=params, ema=jax.tree.map(jnp.copy, params))
