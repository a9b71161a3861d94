"""Train-step throughput: tokens/s and model FLOP utilisation (MFU) per `model.dtype`, and the
PyTorch reference network on the same batch (float32) as a baseline.

  python -m bench.train_step --preset tiny
  python -m bench.train_step --preset lm1b-small --batch 16 --steps 3
  python -m bench.train_step --preset owt-small --dtypes float32,bfloat16 --no_torch  # accelerator
  python -m bench.train_step --preset owt-small --batch 2 --seq 64 --steps 2 --no_torch  # CPU smoke

Per dtype: ms/step, tokens/s, achieved FLOP/s by XLA's cost analysis of the compiled step
(forward, backward, optimizer; what the device executes), and MFU = model FLOPs per step / step
time / (peak dense FLOP/s of the device x devices), with the PaLM-style count

  model FLOPs = 6 N T + 12 n_blocks L d T   (T = B L tokens of the step)

N: the parameters applied once per token (every matmul weight: the blocks, the output layer, the
IMDM noise MLP; not the embedding lookups, nor the adaLN / time MLP, applied once per sequence);
6 = forward + backward multiply-adds; 12 L d per token per block: QK^T and PV, forward and
backward. Peaks (dense, per chip) are the `PEAK_TFLOPS` table; the float32 column is what XLA runs
float32 matmuls at by default (TF32 tensor cores on NVIDIA, bf16 passes on TPU). MFU is 'n/a'
where the device is not in the table (CPU). The PyTorch step runs the same computation: masking,
SUBS NELBO, backward, clipping, AdamW, EMA.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from imdm_jax import config as config_lib
from imdm_jax import sharding, train_state, train_step


# Peak dense TFLOP/s per chip: (bfloat16, float32 as XLA runs it by default). Vendor datasheets:
# H100/H200 SXM 989 bf16, 495 TF32; A100 312 / 156; TPU v4 275, v5e 197, v5p 459 (bf16 MXU; float32
# matmuls at default precision run as bf16 passes).
PEAK_TFLOPS = (('H200', (989.0, 494.7)), ('H100', (989.0, 494.7)), ('A100', (312.0, 156.0)),
               ('TPU v4', (275.0, 275.0)), ('TPU v5 lite', (197.0, 197.0)),
               ('TPU v5e', (197.0, 197.0)), ('TPU v5', (459.0, 459.0)))


def peak_flops(device_kind: str, dtype: str) -> float | None:
  """Peak FLOP/s of one chip of `device_kind` for `dtype`; None where unknown (e.g. CPU). The
  first matching entry wins ('TPU v5 lite' before 'TPU v5')."""
  for name, (bf16, fp32) in PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return 1e12 * (bf16 if dtype == 'bfloat16' else fp32)
  return None


def model_flops(cfg, params) -> float:
  """6 N T + 12 n_blocks L d T (module docstring) for one train step of `cfg`."""
  once_per_sequence = ('adaLN_modulation', 'sigma_map', 'vocab_embed/embedding', 'wpe')
  n = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(params)
          if not any(k in sharding.path_str(path) for k in once_per_sequence))
  m, L = cfg.model, cfg.data.seq_len
  tokens = cfg.train.batch_size * L
  return 6.0 * n * tokens + 12.0 * m.n_blocks * L * m.hidden_size * tokens


def bench_jax(cfg, batch, steps):
  mesh = sharding.make_mesh(cfg.mesh)
  mask_id = cfg.model.vocab_size - 1
  state = train_state.init_state(cfg, mesh)
  graphdef = train_state.model_graphdef(cfg)
  step = train_step.compile_train_step(cfg, graphdef, mesh, state, mask_id=mask_id)
  gbatch = sharding.to_global(batch, mesh)
  compiled = step.lower(state, gbatch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', float('nan')))
  state, out = step(state, gbatch)  # warm-up
  jax.block_until_ready(out)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, out = step(state, gbatch)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / steps, flops, jax.device_get(state.params)


def bench_torch(cfg, batch, steps, params):
  import torch  # pylint: disable=g-import-not-at-top
  from tests import torch_reference, torch_weights  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  mask_id = cfg.model.vocab_size - 1
  model = torch_reference.DIT(cfg, mask_id).train()
  model.load_state_dict({k: torch.from_numpy(np.array(v))
                         for k, v in torch_weights.params_to_torch(params).items()}, strict=False)
  ema = [p.detach().clone() for p in model.parameters()]
  opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.b1, cfg.optim.b2),
                          eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
  x = torch.from_numpy(batch['tokens']).long()
  valid = torch.from_numpy(batch['attention_mask']).float()
  alpha_min = cfg.diffusion.alpha_min

  def step(n):
    B = x.shape[0]
    t = ((torch.rand(()) + torch.arange(B) / B) % 1) * (1 - alpha_min) + alpha_min
    z = torch.where(torch.rand(x.shape) < (1 - alpha_min) * t[:, None], mask_id, x)
    logits = model(z).float()
    logits[..., mask_id] += -1e6
    log_p = torch.log_softmax(logits, -1).gather(-1, x[..., None])[..., 0]
    nll = torch.where(z == mask_id, -log_p / t[:, None], 0.0)
    loss = (nll * valid).sum() / valid.sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    opt.step()
    d = min(cfg.optim.ema_decay, (1 + n) / (10 + n))
    with torch.no_grad():
      torch._foreach_lerp_(ema, list(model.parameters()), 1 - d)  # pylint: disable=protected-access
    return loss

  step(1)
  t0 = time.perf_counter()
  for n in range(steps):
    step(n + 2)
  return (time.perf_counter() - t0) / steps


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--preset', default='tiny')
  parser.add_argument('--set', dest='overrides', action='append', default=[])
  parser.add_argument('--batch', type=int, default=0, help='global batch (default: the preset)')
  parser.add_argument('--seq', type=int, default=0, help='sequence length (default: the preset)')
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--dtypes', default='', help='comma-separated model.dtype values to time '
                      '(default: the preset\'s)')
  parser.add_argument('--no_torch', action='store_true')
  args = parser.parse_args()
  overrides = list(args.overrides)
  overrides += [f'train.batch_size={args.batch}'] if args.batch else []
  overrides += [f'data.seq_len={args.seq}'] if args.seq else []
  cfg = config_lib.resolve(args.preset, overrides)
  B, L, V = cfg.train.batch_size, cfg.data.seq_len, cfg.model.vocab_size
  rng = np.random.default_rng(0)
  batch = {'tokens': rng.integers(0, V - 1, (B, L), dtype=np.int32),
           'attention_mask': np.ones((B, L), np.int32)}
  m, kind = cfg.model, jax.devices()[0].device_kind
  print(f'{args.preset}: {m.n_blocks}x{m.hidden_size}, {m.n_heads} heads, V={V}, batch {B}x{L}, '
        f'dropout {m.dropout}, remat {m.remat}, grad_accum {cfg.train.grad_accum} | '
        f'{jax.device_count()} x {kind} | jax {jax.__version__}')
  tokens = B * L
  f32 = params = None  # (s/step, XLA FLOP/step) of the float32 step, the PyTorch baseline's peer
  for dtype in (args.dtypes.split(',') if args.dtypes else [m.dtype]):
    cfg_d = config_lib.resolve(args.preset, overrides + [f'model.dtype={dtype}'])
    dt, flops, params = bench_jax(cfg_d, batch, args.steps)
    model = model_flops(cfg_d, params)
    peak = peak_flops(kind, dtype)
    mfu = f'{100 * model / dt / (peak * jax.device_count()):.1f} %' if peak else 'n/a'
    print(f'jax {dtype:8s} {dt * 1e3:9.1f} ms/step {tokens / dt:12,.0f} tokens/s '
          f'{flops / dt / 1e9:9.1f} GFLOP/s (XLA: {flops / 1e9:.1f} GFLOP/step) | model '
          f'{model / 1e9:.1f} GFLOP/step, {model / dt / 1e12:.2f} TFLOP/s, MFU {mfu}')
    f32 = (dt, flops) if dtype == 'float32' else f32
  if args.no_torch or f32 is None:  # the PyTorch reference trains in float32 only
    return
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    print('torch not installed: no PyTorch baseline (pip install -r requirements-dev.txt)')
    return
  dt_t, (dt, flops) = bench_torch(cfg, batch, args.steps, params), f32
  print(f'torch  {dt_t * 1e3:9.1f} ms/step {tokens / dt_t:12,.0f} tokens/s '
        f'{flops / dt_t / 1e9:9.1f} GFLOP/s  (torch {torch.__version__}, '
        f'{torch.get_num_threads()} threads, eager)')
  print(f'ratio  jax/torch throughput = {dt_t / dt:.2f}x')


if __name__ == '__main__':
  main()
