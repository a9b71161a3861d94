"""Orbax checkpoints of a run: train state (params, EMA, optimizer, RNG, step), the data iterator's
position and the resolved config, in one `CheckpointManager` step directory.

Orbax writes each step into a temporary directory and renames it when complete, so a run that
dies mid-save leaves the previous checkpoint intact. Every process takes part in saves and
restores (each writes its own shards). The data position is one JSON object for all processes
(`pipeline.train_iterator` gives every process the same one, whatever their number), so a run
can resume on a different number of processes; grain's own handler would keep one file per
process, readable only by the same number of processes.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp

from imdm_jax import config as config_lib, files, sharding
from imdm_jax.errors import UserError

# Sections that define what a checkpoint *is*; a restore under different values is refused.
ARCHITECTURE_SECTIONS = ('model',)
ARCHITECTURE_DIFFUSION_KEYS = ('noise_type', 'num_mask_states')  # they add parameters
DATA_KEYS = ('source', 'seq_len', 'wrap', 'tokenizer', 'val_split')
EXECUTION_MODEL_KEYS = ('dtype', 'remat')  # how the network runs, not what it is: may change


class Checkpointer:

  def __init__(self, directory: str, keep: int = 2):
    self.directory = os.path.abspath(os.path.expanduser(directory))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, cfg: config_lib.Config, data_iter=None,
           force: bool = False) -> bool:
    items = {'state': ocp.args.StandardSave(state),
             'config': ocp.args.JsonSave(config_lib.to_dict(cfg))}
    if data_iter is not None:
      items['data_position'] = ocp.args.JsonSave(data_iter.get_state())  # process 0 writes it
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def saved_config(self, step: int | None = None) -> config_lib.Config:
    step = self.latest_step() if step is None else step
    restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return config_lib.from_dict(restored.config)

  def restore(self, abstract_state, data_iter=None, step: int | None = None):
    """Restores into `abstract_state` (ShapeDtypeStructs with shardings on the live mesh) and, if
    given, moves `data_iter` to the saved position. Returns the state."""
    step = self.latest_step() if step is None else step
    self._check_structure(step, abstract_state)
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      if 'data_position' not in self._manager.item_metadata(step):
        raise UserError(f'checkpoint {step} in {self.directory} keeps its data position per '
                        'process (an older format): resume it with the version that wrote it, or '
                        'start a new workdir from it with --init_from')
      items['data_position'] = ocp.args.JsonRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    if data_iter is not None:
      data_iter.set_state(restored.data_position)
    return restored.state

  def _check_structure(self, step: int, abstract_state) -> None:
    """Refuses, in one line, a checkpoint whose state is not the kind this program resumes (a
    train run's given to SDTT, one written before a field was added) instead of orbax's error."""
    saved = self._state_metadata(step)
    names = lambda tree: {sharding.path_str(p) for p, _ in
                          jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: x is None)}
    missing = sorted(names(abstract_state) - names(dict(saved)))
    if missing:
      raise UserError(f'checkpoint {step} in {self.directory} has no {missing[0].split("/")[0]} '
                      f'in its state ({", ".join(sorted(saved))}): it was written '
                      'by another program (train, sdtt, redi-train) or an older version; use '
                      'another workdir, or start one from it with --init_from')

  def restore_latest_intact(self, abstract_state, data_iter, compatible) -> Any:
    """Restores the newest checkpoint that reads back whole, after `compatible(saved_config)`
    has accepted it. A damaged one (a truncated or missing file, from a disk fault or a copy cut
    short) is named in one line and set aside as `STEP.damaged` (kept for inspection; a new
    checkpoint of that step can then be written), and the one before it is tried."""
    damaged = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        saved = self.saved_config(step)
        compatible(saved)
        state = self.restore(abstract_state, data_iter, step)
      except UserError:
        raise
      except Exception as e:  # pylint: disable=broad-except  (orbax, tensorstore, json, OS)
        damaged.append(step)
        if jax.process_index() == 0:
          reason = (str(e).strip().splitlines() or [''])[0][:200]
          print(f'checkpoint {step} in {self.directory} is damaged ({type(e).__name__}: '
                f'{reason}); trying the one before it', file=sys.stderr)
        continue
      if damaged:
        self._set_aside(damaged)
      return state
    raise UserError(f'no intact checkpoint in {self.directory} (damaged: '
                    f'{", ".join(map(str, damaged))}); move them away to start afresh')

  def _set_aside(self, steps: list[int]) -> None:
    if jax.process_index() == 0:
      for step in steps:
        os.replace(os.path.join(self.directory, str(step)),
                   os.path.join(self.directory, f'{step}.damaged'))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices('checkpoint: damaged steps set aside')
    self._manager.reload()

  def state_keys(self, step: int | None = None) -> set[str]:
    """The top-level fields of the state saved at `step`: what kind of run wrote it (a
    `TrainState`'s `ema`, `params`, ...; SDTT's `student`, `teacher`, `round`)."""
    step = self.latest_step() if step is None else step
    return set(self._state_metadata(step).keys())

  def _state_metadata(self, step: int):
    """The saved state's tree of array metadata, read without the arrays."""
    path = os.path.join(self.directory, str(step), 'state')
    try:
      return ocp.StandardCheckpointer().metadata(path).item_metadata
    except (FileNotFoundError, ValueError, AttributeError) as e:
      raise UserError(f'{path}: unreadable checkpoint metadata ({type(e).__name__})') from None

  def restore_part(self, where: tuple[str, ...], abstract, step: int | None = None):
    """One subtree of the saved state (e.g. ('ema',) or ('student', 'ema')), restored into
    `abstract` without reading the rest from disk. Refuses, rather than returns, a subtree the
    checkpoint does not hold (orbax would hand back the abstract placeholders)."""
    step = self.latest_step() if step is None else step
    item = abstract
    for name in reversed(where):
      item = {name: item}
    args = ocp.args.PyTreeRestore(item=item, partial_restore=True,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(item))
    part = self._manager.restore(step, args=ocp.args.Composite(state=args)).state
    for name in where:
      part = part[name]
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(part)):
      raise UserError(f'checkpoint {step} in {self.directory} holds no {"/".join(where)} of the '
                      'expected structure')
    return part

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def check_compatible(saved: config_lib.Config, cfg: config_lib.Config, where: str) -> None:
  """Refuses to resume a run whose network or data differ from the checkpoint's."""
  saved_d, cfg_d = config_lib.to_dict(saved), config_lib.to_dict(cfg)
  keys = [(s, k) for s in ARCHITECTURE_SECTIONS for k in cfg_d[s]
          if (s, k) not in [('model', e) for e in EXECUTION_MODEL_KEYS]]
  keys += [('diffusion', k) for k in ARCHITECTURE_DIFFUSION_KEYS]
  keys += [('data', k) for k in DATA_KEYS]
  for section, key in keys:
    if saved_d[section][key] != cfg_d[section][key]:
      raise UserError(f'{where} holds a checkpoint with {section}.{key}='
                      f'{saved_d[section][key]!r}, not {cfg_d[section][key]!r} (use another '
                      'workdir, or the saved value)')


def write_json_atomic(path: str, obj) -> None:
  """Only process 0 writes; a crash mid-write leaves the old file (rename is atomic)."""
  if jax.process_index() == 0:
    files.write_atomic(path, json.dumps(obj, indent=2, sort_keys=True))
