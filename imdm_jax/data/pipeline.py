"""Batches for training (grain, shuffled, checkpointable) and evaluation (a fixed, exact pass).

Each process reads only its own slice of every global batch; `sharding.to_global` assembles the
global array.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import grain
import jax
import numpy as np

from imdm_jax import sharding
from imdm_jax.errors import UserError


def local_batch_size(global_batch: int) -> int:
  """This process's rows of a global batch, which must split over all devices."""
  sharding.rows_per_device(global_batch, jax.device_count())
  return global_batch // jax.process_count()


def train_iterator(rows: Sequence[dict], global_batch: int, seed: int):
  """An endless, per-epoch reshuffled iterator of this process's slices of the global batches.

  The global batches do not depend on the number of processes: all rows are shuffled as one
  sequence and cut into batches of `global_batch`, of which process p reads rows
  [p * local, (p + 1) * local). N processes thus train on exactly the batches one process would,
  and the iterator's state (global batches read, a few integers) means the same for any N, so a
  checkpoint can resume on a different number of processes."""
  local = local_batch_size(global_batch)
  if len(rows) < global_batch:
    raise UserError(f'the training split has {len(rows)} rows, fewer than a batch of {global_batch}')
  slices = grain.MapDataset.source(rows).shuffle(seed=seed).repeat().batch(local,
                                                                           drop_remainder=True)
  batches = slices[jax.process_index()::jax.process_count()]  # global batch b: slices bN .. bN+N-1
  # Rows are read on the calling thread: the train loop keeps one step in flight, so reading
  # overlaps the device's work anyway, and no reader thread outlives the iterator (grain's
  # default 16 threads x 500 prefetched batches would also hold ~1 GB of OpenWebText rows).
  return iter(batches.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


def eval_batches(rows: Sequence[dict], global_batch: int,
                 max_batches: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Every row once (or the first `max_batches` global batches), in order. The last batch is
  filled with rows whose attention mask is all zero, so no row is dropped or counted twice and
  every process yields the same number of batches."""
  local = local_batch_size(global_batch)
  n_batches = -(-len(rows) // global_batch)
  if max_batches:
    n_batches = min(n_batches, max_batches)
  template = rows[0]
  for b in range(n_batches):
    start = b * global_batch + jax.process_index() * local
    batch = []
    for i in range(start, start + local):
      if i < len(rows):
        batch.append(rows[i])
      else:
        batch.append({k: np.zeros_like(v) for k, v in template.items()})
    yield {k: np.stack([r[k] for r in batch]) for k in template}
