"""Test setup: CPU only, offline, 8 fake devices, a persistent compilation cache, and the
jaxtyping annotations of every `imdm_jax` function checked at run time."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import dataclasses  # pylint: disable=g-import-not-at-top,wrong-import-position

import jaxtyping  # pylint: disable=g-import-not-at-top,wrong-import-position

# Before any `imdm_jax` import: every function and dataclass of the package (the entry scripts'
# and tests/ imports of it included) gets `@jaxtyped(typechecker=beartype)`, so a call whose
# arrays break an annotation's dtype or shape (`Float[Array, 'B L']`, dimension names bound
# consistently within the call) fails in the tests. Under `jax.jit` the check runs once, at
# tracing. Subprocesses (train.py, sample.py, ...) run unchecked.
jaxtyping.install_import_hook('imdm_jax', 'beartype.beartype')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from imdm_jax import config as config_lib  # pylint: disable=wrong-import-position
from imdm_jax import runtime  # pylint: disable=wrong-import-position

runtime.setup()


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """One data cache for the session: the micro preset's tokenizer and rows are built once."""
  return str(tmp_path_factory.mktemp('data'))


@pytest.fixture
def micro_cfg(data_dir) -> config_lib.Config:
  cfg = config_lib.resolve('micro')
  return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=data_dir))


@pytest.fixture(scope='session', autouse=True)
def _eight_devices():
  assert jax.device_count() == 8, 'tests expect 8 fake CPU devices (XLA_FLAGS)'
