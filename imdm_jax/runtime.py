"""Process-level setup shared by the entry scripts: their cluster flags, multi-process
initialisation, the persistent compilation cache and quieter logs. Call `setup()` (or
`setup_from_args`) before anything touches a JAX device.

Multi-controller JAX runs the same program once per host (or several times on one machine, to
emulate that): `jax.distributed.initialize` connects the processes, after which `jax.devices()`
lists every device of the job and each process feeds its own slice of every batch.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Mapping

import jax
from jax.experimental import multihost_utils

from imdm_jax.errors import UserError


def launched_as_multiprocess(environ: Mapping[str, str]) -> bool:
  """Whether a launcher started this program as one of several processes: JAX's own variable, a
  Slurm job step (`srun`) or an Open MPI job (`mpirun`) with more than one task. The step's task
  count, not the allocation's: an `sbatch` script runs once even in a 64-task allocation.
  TPU pod slices and Kubernetes are not guessed (that needs a metadata query): pass --multihost."""
  if 'JAX_COORDINATOR_ADDRESS' in environ:
    return True
  counts = (environ.get('SLURM_STEP_NUM_TASKS', '1'), environ.get('OMPI_COMM_WORLD_SIZE', '1'))
  return any(c.isdigit() and int(c) > 1 for c in counts)


def add_cluster_flags(parser: argparse.ArgumentParser) -> None:
  """The flags of `setup_from_args`, one copy for every entry script."""
  cluster = parser.add_argument_group(
      'multi-process', 'one process per host, each running the same command (docs/scaling.md)')
  cluster.add_argument('--multihost', action='store_true',
                       help='join a multi-process job found by jax.distributed.initialize (TPU pod '
                            'slice, Slurm, Open MPI, Kubernetes); automatic under srun/mpirun with '
                            'more than one task or when JAX_COORDINATOR_ADDRESS is set')
  cluster.add_argument('--coordinator', metavar='HOST:PORT',
                       help='address of process 0 (clusters JAX does not detect, local emulation)')
  cluster.add_argument('--num_processes', type=int, metavar='N', help='processes in the job')
  cluster.add_argument('--process_id', type=int, metavar='I', help='this process, 0 .. N-1')


PATH_FLAGS = ('workdir', 'init_from', 'teacher', 'couplings', 'init', 'out', 'checkpoint',
              'evaluator')


def refuse_remote_paths(args: argparse.Namespace) -> None:
  """Paths are local (or mounted: gcsfuse, NFS). A `gs://...` path would otherwise become a
  local folder named `gs:` without a word, and a run would write where nobody looks."""
  for name in PATH_FLAGS:
    value = getattr(args, name, None)
    if value and '://' in value:
      raise UserError(f'--{name} {value}: remote URLs are not supported; use a local path or a '
                      'mounted bucket (e.g. gcsfuse)')


def setup_from_args(args: argparse.Namespace) -> None:
  """`setup` from the flags of `add_cluster_flags` and the launcher's environment, after
  `refuse_remote_paths` (so that bad flags fail before joining a job)."""
  refuse_remote_paths(args)
  setup(args.multihost or launched_as_multiprocess(os.environ), args.coordinator,
        args.num_processes, args.process_id)


def barrier(name: str) -> None:
  """Waits until every process of the job gets here (nothing to wait for in a one-process job).
  Every process must call it, with the same names in the same order."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def setup(multihost: bool = False, coordinator: str | None = None,
          num_processes: int | None = None, process_id: int | None = None) -> None:
  """`multihost`: join a multi-process job. Arguments left `None` are found by
  `jax.distributed.initialize` (TPU pod slice, Slurm, Open MPI, Kubernetes); giving any of
  `coordinator` ('HOST:PORT' of process 0), `num_processes`, `process_id` implies `multihost`."""
  explicit = (coordinator, num_processes, process_id)
  if multihost or any(v is not None for v in explicit):
    if coordinator is not None:
      host, _, port = coordinator.rpartition(':')
      if not host or not port.isdigit():
        raise UserError(f'--coordinator {coordinator!r}: expected HOST:PORT, e.g. 10.0.0.1:1234')
    try:
      jax.distributed.initialize(coordinator, num_processes, process_id)
    except (ValueError, TypeError) as e:  # jax's messages for a missing or inconsistent cluster
      hint = (' (outside TPU, Slurm, Open MPI and Kubernetes, pass --coordinator HOST:PORT '
              '--num_processes N --process_id I)' if None in explicit else '')
      raise UserError(f'multi-process setup: {e}{hint}') from None
  cache = os.path.expanduser(os.environ.get('IMDM_JAX_CACHE', '~/.cache/imdm_jax/xla'))
  jax.config.update('jax_compilation_cache_dir', cache)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  for name in ('absl', 'orbax', 'grain'):
    logging.getLogger(name).setLevel(logging.ERROR)
