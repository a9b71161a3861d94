"""The reverse weight map, for tests and benchmarks: our parameter tree -> a PyTorch DiT state dict.

The converter only reads PyTorch weights (`imdm_jax/convert/dit.py`); this inverse builds the
PyTorch reference network (`torch_reference.py`) from our weights, and lets tests compare every
converted tensor with its source. numpy only: no torch needed.
"""

from __future__ import annotations

import numpy as np

from imdm_jax.convert.dit import flatten_paths, path_to_torch_key


def params_to_torch(params) -> dict[str, np.ndarray]:
  """A PyTorch state dict (numpy arrays, no buffers) of our parameters."""
  out = {}
  for path, leaf in flatten_paths(params):
    value = np.asarray(leaf)
    key = path_to_torch_key(path)
    if key.startswith('vocab_embed.learnable_noise'):
      value = value.reshape(1, 1, -1)
    out[key] = np.ascontiguousarray(value.T if path[-1] == 'kernel' else value)  # any writer
  return out

