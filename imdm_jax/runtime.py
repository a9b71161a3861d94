"""Process-level setup shared by the entry scripts: multi-host initialisation, the persistent
compilation cache and quieter logs. Call `setup()` before anything touches a JAX device."""

from __future__ import annotations

import logging
import os

import jax


def setup(multihost: bool = False) -> None:
  if multihost:
    jax.distributed.initialize()  # reads the cluster from the environment (TPU, SLURM, ...)
  cache = os.path.expanduser(os.environ.get('IMDM_JAX_CACHE', '~/.cache/imdm_jax/xla'))
  jax.config.update('jax_compilation_cache_dir', cache)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  for name in ('absl', 'orbax', 'grain'):
    logging.getLogger(name).setLevel(logging.ERROR)
