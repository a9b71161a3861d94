"""Metrics to `workdir/metrics.jsonl` (one JSON object per line) and to TensorBoard when the
`tensorboardX` package is installed. Only process 0 writes."""

from __future__ import annotations

import json
import math
import os
import time
from typing import SupportsFloat

import jax


class MetricWriter:

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._active = jax.process_index() == 0
    self._tb = None
    if self._active:
      try:
        import tensorboardX  # pylint: disable=g-import-not-at-top
        self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'))
      except ImportError:
        pass

  def write(self, step: int, values: dict[str, SupportsFloat]) -> None:  # floats, numpy/jax scalars
    if not self._active:
      return
    # strict JSON: a non-finite value is written as null (json.dumps would write a bare NaN)
    record = {'step': step, 'time': time.time(),
              **{k: float(v) if math.isfinite(float(v)) else None for k, v in values.items()}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, float(v), step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
