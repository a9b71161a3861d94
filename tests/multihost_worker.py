"""One process of a multi-process run, started N times (or once) by tests/test_multihost.py.

  python tests/multihost_worker.py DUMP.npz TRAIN_PY_ARGUMENTS...
  python tests/multihost_worker.py DUMP.npz distill DISTILL_PY_ARGUMENTS...
  python tests/multihost_worker.py DUMP.npz sample SAMPLE_PY_ARGUMENTS...

Runs `train.py`'s `main` with the given arguments — the real path: cluster flags,
`runtime.setup`, `trainer.train` — then writes what this process saw to DUMP.npz, for the parent
to compare across processes (N processes, K devices each, global batch B, S = train.num_steps).
With `distill`, runs `distill.py`'s `main` instead and dumps `topology` only; with `sample`,
`sample.py`'s `main`, and dumps `topology` and `written`:
  topology  int32 [3]          process count, global device count, local device count
  written   str [F]            the files this process renamed into sample.py's --out (every
                               output file is written to a temporary name, then renamed)
  tokens    int32 [S, B/N, L]  the local batches of the run's S steps
  position  str                the data iterator's state after those S batches (JSON)
  epoch     int32 [4, 16/N]    one epoch of 64 numbered rows, in global batches of 16
  fsdp      float [M, 2]       for each of the state's M matrices on the run's mesh: the shards
                               this process holds, and the fraction of the matrix in each
The device count comes from XLA_FLAGS, set by the parent.
"""

import json
import os
import sys

import numpy as np

import distill  # the entry scripts, from the repository root on PYTHONPATH (test_multihost)
import sample
import train
from imdm_jax import config as config_lib


def what_this_process_saw(argv: list[str]) -> dict[str, np.ndarray]:
  """Built as the trainer builds them: a fresh data iterator and a fresh state."""
  import jax  # pylint: disable=g-import-not-at-top  (after train.main's runtime.setup)
  from imdm_jax import sharding, train_state  # pylint: disable=g-import-not-at-top
  from imdm_jax.data import pipeline, store  # pylint: disable=g-import-not-at-top
  args = train.parse_args(argv)
  cfg = config_lib.resolve(args.preset, args.overrides)
  data = store.prepare(cfg)
  it = pipeline.train_iterator(data.train, cfg.train.batch_size, cfg.train.seed)
  tokens = np.stack([next(it)['tokens'] for _ in range(cfg.train.num_steps)])
  numbered = [{'tokens': np.full((1,), i, np.int32)} for i in range(64)]
  epoch_it = pipeline.train_iterator(numbered, 16, seed=cfg.train.seed)
  state = train_state.init_state(cfg, sharding.make_mesh(cfg.mesh))
  fsdp = [(len(x.addressable_shards), x.addressable_shards[0].data.size / x.size)
          for x in jax.tree.leaves(state) if x.ndim == 2]
  return {'topology': np.array([jax.process_count(), jax.device_count(),
                                jax.local_device_count()]),
          'tokens': tokens, 'position': np.array(json.dumps(it.get_state(), sort_keys=True)),
          'epoch': np.stack([next(epoch_it)['tokens'][:, 0] for _ in range(4)]),
          'fsdp': np.array(fsdp)}


def _topology() -> np.ndarray:
  import jax  # pylint: disable=g-import-not-at-top  (after the main's runtime.setup)
  return np.array([jax.process_count(), jax.device_count(), jax.local_device_count()])


def _sample(argv: list[str]) -> dict[str, np.ndarray]:
  out, written, rename = os.path.abspath(sample.parse_args(argv).out), [], os.replace

  def recording_rename(src, dst, **kwargs):
    if os.path.dirname(os.path.abspath(dst)) == out:
      written.append(os.path.basename(dst))
    return rename(src, dst, **kwargs)

  os.replace = recording_rename
  sample.main(argv)
  return {'topology': _topology(), 'written': np.array(written, dtype=str)}


def main() -> None:
  dump, argv = sys.argv[1], sys.argv[2:]
  if argv[0] == 'distill':
    distill.main(argv[1:])
    np.savez(dump, topology=_topology())
    return
  if argv[0] == 'sample':
    np.savez(dump, **_sample(argv[1:]))
    return
  train.main(argv)
  np.savez(dump, **what_this_process_saw(argv))


if __name__ == '__main__':
  main()
