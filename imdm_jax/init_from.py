"""The weights of a run, for every program that takes one, and `train.py --init_from`.

Any run directory is a source: what `train.py`, `distill.py sdtt / redi-train / redi` or
`convert.py` wrote (`load_weights`). Each kind keeps the weights a consumer wants in its own place
(a train state's EMA, the SDTT student's EMA, a ReDi run's last round), and the consumer says which
it took.

With `--init_from`, the source's weights become the new run's weights and the start of its EMA;
the optimizer, step and data order start fresh. Parameters the source lacks are allowed only where
the new model extends the old one with the IMDM mask-noise path, which starts at zero so that step
0 computes exactly the source model. Anything else that differs is refused, naming the first
mismatching parameter.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from imdm_jax import checkpoint, model, sharding, train_state
from imdm_jax.config import Config
from imdm_jax.errors import UserError

# Where each kind of run keeps the weights to take, by the top-level fields of its saved state: a
# train, ReDi or converted run holds a TrainState, an SDTT run its student, teacher and round.
_WEIGHTS = ((('student', 'ema'), "the SDTT student's EMA weights"),
            (('ema',), 'the EMA weights'))


class Weights(NamedTuple):
  params: train_state.Params
  config: Config
  what: str  # which weights of which checkpoint: what the consumer says it took
  ema_count: int  # their EMA's update count, inherited by a run started from them


def _flat(tree) -> dict[str, Any]:  # leaves: jax or numpy arrays, or ShapeDtypeStructs
  return {sharding.path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def graft(target: train_state.Params, source: train_state.Params, where: str) -> train_state.Params:
  """`target` with every parameter replaced by the one of the same name in `source`."""
  tgt, src = _flat(target), _flat(source)
  for name in sorted(set(tgt) | set(src)):
    if name not in tgt:
      raise UserError(f'{where}: checkpoint parameter {name} has no counterpart in this model')
    if name not in src:
      if not name.startswith(model.NOISE_PATH_PREFIXES):
        raise UserError(f'{where}: this model has parameter {name}, the checkpoint does not')
      continue
    if tgt[name].shape != src[name].shape:
      raise UserError(f'{where}: parameter {name} has shape {tuple(src[name].shape)} in the '
                      f'checkpoint, {tuple(tgt[name].shape)} in this model')
  leaves = [src.get(sharding.path_str(p), x) for p, x in jax.tree_util.tree_leaves_with_path(target)]
  return jax.tree.unflatten(jax.tree.structure(target), leaves)


def checkpoint_dir(path: str) -> str:
  """Accepts a run's workdir, its `checkpoints/` directory, or the workdir of `distill.py redi`
  (its rounds `round{k}/`: the last one that holds checkpoints)."""
  path = os.path.abspath(os.path.expanduser(path))
  nested = os.path.join(path, 'checkpoints')
  if os.path.isdir(nested):
    return nested
  rounds = [d for d in glob.glob(os.path.join(path, 'round*', 'checkpoints'))
            if re.fullmatch(r'round\d+', os.path.basename(os.path.dirname(d)))]
  if rounds:
    return max(rounds, key=lambda d: int(os.path.basename(os.path.dirname(d))[5:]))
  return path


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


def load_weights(path: str, mesh: Mesh) -> Weights:
  """The weights of the latest checkpoint under `path` that a consumer takes (an EMA: see
  `_WEIGHTS`), laid out on `mesh`, with the config they were saved with."""
  ckpt = _open(path)
  step, saved, fields = ckpt.latest_step(), ckpt.saved_config(), ckpt.state_keys()
  where, what = next(((w, s) for w, s in _WEIGHTS if w[0] in fields), (None, None))
  if where is None:
    ckpt.close()
    raise UserError(f'{path}: checkpoint {step} holds no weights this program can read (its '
                    f'state has {", ".join(sorted(fields))})')
  # only these weights are read: the raw ones and the optimizer's moments (3x more) stay on disk
  params = ckpt.restore_part(where, train_state.abstract_state(saved, mesh).ema)
  scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh))
  try:
    count = ckpt.restore_part(where[:-1] + ('ema_count',), scalar)
  except UserError:  # written before the count was kept: it equalled the step
    count = ckpt.restore_part(where[:-1] + ('step',), scalar)
  ckpt.close()
  return Weights(params, saved, f'{what} of {checkpoint_dir(path)} at step {step}', int(count))


def initialise(state: train_state.TrainState, cfg: Config, path: str,
               mesh: Mesh) -> train_state.TrainState:
  ema, saved, what, ema_count = load_weights(path, mesh)
  if jax.process_index() == 0:
    print(f'--init_from: {what}')
  if saved.model.vocab_size != cfg.model.vocab_size or saved.data.tokenizer != cfg.data.tokenizer:
    raise UserError(f'--init_from {path}: vocabulary {saved.data.tokenizer}/{saved.model.vocab_size}'
                    f' differs from this run\'s {cfg.data.tokenizer}/{cfg.model.vocab_size}')
  check_architecture(saved, cfg, f'--init_from {path}')
  params = graft(state.params, ema, f'--init_from {path}')
  # Separate buffers: the train step donates its input state, and a buffer donated twice crashes.
  # The EMA restarts from these weights with the source's update count (the official
  # `load_ema`): no second warm-up.
  return state.replace(params=params, ema=jax.tree.map(jnp.copy, params),
                       ema_count=jax.device_put(jnp.int32(ema_count), state.ema_count.sharding))


# Settings that change what the network computes without changing its parameters: a difference
# would make the new run's step 0 another function than its source.
FUNCTION_KEYS = (('model', 'attn_softcap'), ('model', 'time_conditioning'),
                 ('diffusion', 'alpha_min'))


def check_architecture(saved: Config, cfg: Config, where: str) -> None:
  """Refuses a source whose network computes something else with the same parameters. The IMDM
  noise path may be added (it starts at zero); its type may differ only when the source has none."""
  for section, key in FUNCTION_KEYS:
    theirs, ours = getattr(getattr(saved, section), key), getattr(getattr(cfg, section), key)
    if theirs != ours:
      raise UserError(f'{where}: the checkpoint has {section}.{key}={theirs!r}, this run {ours!r} '
                      f'(set --set {section}.{key}={theirs!r} to start from it)')
  if saved.model.noise_dim and saved.diffusion.noise_type != cfg.diffusion.noise_type:
    raise UserError(f'{where}: the checkpoint\'s mask noise is {saved.diffusion.noise_type!r}, '
                    f'this run\'s {cfg.diffusion.noise_type!r}')
