"""Per-device memory of a training step, from shapes alone (nothing is allocated or compiled).

The train state (parameters, EMA, optimizer moments, step, RNG) is counted exactly: the shapes of
`train_state.abstract_state` split by the logical-axis rules of `sharding.py` on the given mesh.
Activations are an estimate (`activation_bytes`): the tensors the backward pass keeps, counted
per layer from the model's shapes. Works for a real `Mesh` and for a mesh you do not have, e.g.
`jax.sharding.AbstractMesh((4, 64), sharding.AXES)` for 256 chips.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax.sharding import AbstractMesh, Mesh

from imdm_jax import train_state
from imdm_jax.config import Config
from imdm_jax.errors import UserError

FLOAT_BYTES = 4  # activations are float32 throughout (no mixed precision yet)


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """Bytes per device. `params`, `ema` and `optimizer` (Adam moments and counters, plus the step
  and RNG) are exact; `gradients` is the size of the sharded parameters; `gathered` is the largest
  parameter unsharded, a lower bound on what FSDP all-gathers at once (each weight is gathered
  whole before its matmul; XLA may gather several ahead); `activations` is the estimate of
  `activation_bytes`."""
  params: int
  ema: int
  optimizer: int
  gradients: int
  gathered: int
  activations: int
  n_params: int  # parameters of the model (unsharded count)
  local_batch: int  # rows per device
  mesh: dict[str, int]

  @property
  def total(self) -> int:
    return (self.params + self.ema + self.optimizer + self.gradients + self.gathered +
            self.activations)

  def summary(self) -> str:
    mesh = ' x '.join(f'{k}={v}' for k, v in self.mesh.items())
    return (f'memory per device (mesh {mesh}, {self.n_params / 1e6:.1f}M parameters, '
            f'{self.local_batch} rows): params {_human(self.params)} + EMA {_human(self.ema)} + '
            f'optimizer {_human(self.optimizer)} + gradients {_human(self.gradients)} + '
            f'FSDP gather {_human(self.gathered)} + activations ~{_human(self.activations)} '
            f'= ~{_human(self.total)}')


def _human(n: int) -> str:
  for unit, size in (('GiB', 2**30), ('MiB', 2**20), ('KiB', 2**10)):
    if n >= size:
      return f'{n / size:.2f} {unit}'
  return f'{n} B'


def sharded_bytes(tree) -> int:
  """Bytes one device holds of a pytree of ShapeDtypeStructs with shardings. The rules shard a
  dimension only when it divides evenly, so every device holds the same amount."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def activation_bytes(cfg: Config, local_batch: int) -> int:
  """An estimate of the activations one device keeps for the backward pass (float32, no
  rematerialisation), with b = local_batch, L, d, H heads, MLP ratio r, V:

    per block  b L d (12 + 3 r)  the block input, both layer-norm outputs and their modulations,
                                 q, k, v, the attention output and its projection, the residual,
                                 the MLP input, pre-activation, GELU intermediate and output, and
                                 the MLP projection
             + b H L^2           attention probabilities (twice with the soft-cap: its tanh too)
             + 2 b L d           the two dropout masks, when dropout > 0 (XLA keeps 32 bits each)
    output     3 b L V + 2 b L d logits, their softmax and gradient; the final norm and modulation
    IMDM       b L (D + 8 d)     eps and the noise MLP's hidden layer, before and after GELU

  XLA may fuse some of these away and adds transient buffers of its own: on one CPU device, its
  temporary allocation for the whole step was 1.0-1.16 times (this estimate + the gradients) for
  the `micro`, `tiny` (also with soft-cap, without dropout, L = 256) and `tiny-imdm` presets
  (tests/test_memory.py checks micro and tiny), and 1.5 times for GPT-2 (`tiny-ar`), whose
  attention backward is autodiff's."""
  m = cfg.model
  b, L, d, r, H, V = local_batch, cfg.data.seq_len, m.hidden_size, m.mlp_ratio, m.n_heads, \
      m.vocab_size
  block = b * L * d * (12 + 3 * r) + b * H * L * L * (2 if m.attn_softcap > 0 else 1)
  if m.dropout > 0:
    block += 2 * b * L * d
  floats = m.n_blocks * block + 3 * b * L * V + 2 * b * L * d
  if m.noise_dim:
    floats += b * L * (m.noise_dim + 8 * d)
  return floats * FLOAT_BYTES


def estimate(cfg: Config, mesh: Mesh | AbstractMesh) -> MemoryEstimate:
  """The memory of training `cfg` on `mesh` (a real mesh or an `AbstractMesh` of any size)."""
  n_devices = math.prod(mesh.shape.values())
  if cfg.train.batch_size % n_devices:
    raise UserError(f'train.batch_size={cfg.train.batch_size} is not divisible by the '
                    f'{n_devices} devices')
  local_batch = cfg.train.batch_size // n_devices
  # The mask id only names a row of the embedding: any id gives the same shapes.
  state = train_state.abstract_state(cfg, cfg.model.vocab_size - 1, mesh)
  params = sharded_bytes(state.params)
  gathered = 0
  if mesh.shape['fsdp'] > 1:
    gathered = max(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.params))
  return MemoryEstimate(
      params=params, ema=sharded_bytes(state.ema),
      optimizer=sharded_bytes((state.opt_state, state.step, state.rng)), gradients=params,
      gathered=gathered, activations=activation_bytes(cfg, local_batch),
      n_params=train_state.param_count(state.params), local_batch=local_batch,
      mesh=dict(mesh.shape))
