"""Per-device memory of a training step, from shapes alone (nothing is allocated or compiled).

The train state (parameters, EMA, optimizer moments, step, RNG) is counted exactly: the shapes of
`train_state.abstract_state`, split on the given mesh as `sharding.py` lays out the logical axes
each parameter declares.
Activations are an estimate (`activation_bytes`): the tensors the backward pass keeps, counted
per layer from the model's shapes. Works for a real `Mesh` and for a mesh you do not have, e.g.
`jax.sharding.AbstractMesh((4, 64), sharding.AXES)` for 256 chips.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax.sharding import AbstractMesh, Mesh

from imdm_jax import sharding, train_state
from imdm_jax.config import Config
from imdm_jax.model import compute_dtype

F32 = 4  # bytes: parameters, the residual stream, norms, logits and loss are float32


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """Bytes per device. `params`, `ema` and `optimizer` (Adam moments and counters, plus the step
  and RNG) are exact; `gradients` is the size of the sharded parameters; `gathered` is the largest
  parameter unsharded, a lower bound on what FSDP all-gathers at once (each weight is gathered
  whole before its matmul; XLA may gather several ahead); `activations` is the estimate of
  `activation_bytes` for one micro-batch. With `train.grad_accum` > 1 `gradients` counts two
  copies: the running sum and the micro-batch's own."""
  params: int
  ema: int
  optimizer: int
  gradients: int
  gathered: int
  activations: int
  n_params: int  # parameters of the model (unsharded count)
  local_batch: int  # rows per device
  micro_batch: int  # rows per device in one micro-batch (local_batch / train.grad_accum)
  mesh: dict[str, int]

  @property
  def total(self) -> int:
    return (self.params + self.ema + self.optimizer + self.gradients + self.gathered +
            self.activations)

  def summary(self) -> str:
    mesh = ' x '.join(f'{k}={v}' for k, v in self.mesh.items())
    micro = ('' if self.micro_batch == self.local_batch else
             f' in micro-batches of {self.micro_batch}')
    return (f'memory per device (mesh {mesh}, {self.n_params / 1e6:.1f}M parameters, '
            f'{self.local_batch} rows{micro}): params {_human(self.params)} + '
            f'EMA {_human(self.ema)} + '
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


def activation_bytes(cfg: Config, micro_batch: int) -> int:
  """An estimate of the activations one device keeps for the backward pass of one micro-batch,
  with b = micro_batch rows, k = train.grad_accum, L, d, H heads, MLP ratio r, V, and c the bytes
  of `model.dtype` (4, or 2 for bfloat16; model.py says which tensors stay float32):

    per block  4 b L d * 6       the float32 residual stream: the block input and the mid-block
                                 residual, both layer-norm outputs and their modulations
             + c b L d (6 + 3 r) q, k, v, the attention output and its projection, the MLP input,
                                 pre-activation, GELU intermediate and output, and the MLP
                                 projection
             + c b L d * 2       with bf16: the two matmul inputs cast from the float32 stream
             + c b H L^2         attention probabilities (twice with the soft-cap: its tanh too)
             + 4 b L d * 2       the two dropout masks, when dropout > 0 (XLA keeps 32 bits each)
    output     4 (3 b L V + 2 b L d)  float32 logits, their softmax and gradient; the final norm
                                 and modulation
    IMDM       4 k b L D + 8 c b L d  eps (drawn for all k micro-batches before the split) and
                                      the noise MLP's hidden layer, before and after GELU

  With `model.remat` the blocks keep only their inputs (4 b L d each) and the backward pass
  recomputes one block at a time: n_blocks * 4 b L d + one block replace the blocks' sum.

  XLA may fuse some of these away and adds transient buffers of its own: on one CPU device, its
  temporary allocation for the whole step was 1.0-1.16 times (this estimate + the gradients) for
  the `micro`, `tiny` (also with soft-cap, without dropout, L = 256) and `tiny-imdm` presets
  (tests/test_memory.py checks micro and tiny, and tiny in 4 micro-batches), and 1.5 times for
  GPT-2 (`tiny-ar`), whose attention backward is autodiff's. XLA:CPU computes bf16 in float32
  and drops rematerialisation (it removes the optimisation barriers that keep the recomputation
  from being merged with the forward pass), so the bf16 and remat terms are checked against the
  residuals JAX saves for the backward pass (the closure of `jax.vjp`), not against XLA:CPU.
  """
  m = cfg.model
  b, L, d, r, H, V = micro_batch, cfg.data.seq_len, m.hidden_size, m.mlp_ratio, m.n_heads, \
      m.vocab_size
  c = compute_dtype(m).itemsize
  block = F32 * b * L * d * 6 + c * b * L * d * (6 + 3 * r) + \
      c * b * H * L * L * (2 if m.attn_softcap > 0 else 1)
  if c != F32:
    block += c * b * L * d * 2
  if m.dropout > 0:
    block += F32 * b * L * d * 2
  blocks = m.n_blocks * F32 * b * L * d + block if m.remat else m.n_blocks * block
  total = blocks + F32 * (3 * b * L * V + 2 * b * L * d)
  if m.noise_dim:
    total += F32 * cfg.train.grad_accum * b * L * m.noise_dim + c * 8 * b * L * d
  return total


def estimate(cfg: Config, mesh: Mesh | AbstractMesh) -> MemoryEstimate:
  """The memory of training `cfg` on `mesh` (a real mesh or an `AbstractMesh` of any size)."""
  n_devices = math.prod(mesh.shape.values())
  micro_batch = sharding.rows_per_device(cfg.train.batch_size, n_devices, cfg.train.grad_accum)
  local_batch = cfg.train.batch_size // n_devices
  state = train_state.abstract_state(cfg, mesh)
  params = sharded_bytes(state.params)
  gathered = 0
  if mesh.shape['fsdp'] > 1:
    gathered = max(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.params))
  return MemoryEstimate(
      params=params, ema=sharded_bytes(state.ema),
      optimizer=sharded_bytes((state.opt_state, state.step, state.rng)),
      gradients=params * (2 if cfg.train.grad_accum > 1 else 1), gathered=gathered,
      activations=activation_bytes(cfg, micro_batch),
      n_params=train_state.param_count(state.params), local_batch=local_batch,
      micro_batch=micro_batch, mesh=dict(mesh.shape))
