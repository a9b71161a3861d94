"""The converter's output: a run directory (`OUT/checkpoints`, `OUT/config.json`) holding a step-0
train state whose params and EMA are both the converted weights.

`--out` is checked before anything is read, and the checkpoint is saved into a staging directory
that is swapped in only once complete, so a refused or failed conversion leaves `OUT` as it was.
"""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp

from imdm_jax import checkpoint, config as config_lib, train_state
from imdm_jax.config import Config
from imdm_jax.errors import UserError


def check_output(out: str, force: bool) -> None:
  if os.path.exists(out) and not os.path.isdir(out):
    raise UserError(f'--out {out} is a file, not a directory')
  ckpt_dir = os.path.join(out, 'checkpoints')
  if not force and os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise UserError(f'{out} already holds a checkpoint: pass --force to replace it')


def step0_state(cfg: Config, params: train_state.Params, rng: jax.Array,
                ema_count: int = 0) -> train_state.TrainState:
  """Step 0 with a fresh optimizer; params and EMA are separate buffers (the train step donates
  its input state, and a buffer donated twice crashes). `ema_count`: the source's EMA update
  count, which a run started from these weights inherits (`train_state.TrainState`)."""
  return train_state.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, ema=jax.tree.map(jnp.copy, params),
      opt_state=train_state.make_optimizer(cfg.optim).init(params), rng=rng,
      ema_count=jnp.asarray(ema_count, jnp.int32))


def write(out: str, state: train_state.TrainState, cfg: Config) -> None:
  """Saves into a staging directory, then swaps it in, so a failed save leaves `out` as it was."""
  created = not os.path.exists(out)
  staging = os.path.join(out, f'.checkpoints.tmp{os.getpid()}')
  try:
    ckpt = checkpoint.Checkpointer(staging)
    ckpt.save(0, state, cfg, force=True)
    ckpt.wait()
    ckpt.close()
  except BaseException:
    shutil.rmtree(out if created else staging, ignore_errors=True)
    raise
  ckpt_dir = os.path.join(out, 'checkpoints')
  if os.path.isdir(ckpt_dir):  # --force (checked before reading anything)
    shutil.rmtree(ckpt_dir)
  os.replace(staging, ckpt_dir)
  checkpoint.write_json_atomic(os.path.join(out, 'config.json'), config_lib.to_dict(cfg))
