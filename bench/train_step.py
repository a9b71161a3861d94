"""Train-step throughput: JAX (this project) vs the PyTorch reference network, same batch.

  python bench/train_step.py --preset tiny
  python bench/train_step.py --preset lm1b-small --batch 16 --steps 3

Prints tokens/s and achieved FLOP/s for each framework and their ratio. The FLOP count is XLA's
cost analysis of the compiled JAX step (forward, backward, optimizer); both frameworks are divided
into the same count, so the ratio of FLOP/s equals the ratio of tokens/s. The PyTorch step runs
the same computation: masking, SUBS NELBO, backward, clipping, AdamW, EMA.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from imdm_jax import config as config_lib  # pylint: disable=wrong-import-position
from imdm_jax import port, sharding, train_state, train_step  # pylint: disable=wrong-import-position


def bench_jax(cfg, batch, steps):
  mesh = sharding.make_mesh(cfg.mesh)
  mask_id = cfg.model.vocab_size - 1
  state = train_state.init_state(cfg, mask_id, mesh)
  graphdef = train_state.model_graphdef(cfg, mask_id)
  step = train_step.compile_train_step(cfg, graphdef, mesh, state)
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
  from imdm_jax import torch_reference  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  mask_id = cfg.model.vocab_size - 1
  model = torch_reference.DIT(cfg.model, mask_id).train()
  model.load_state_dict({k: torch.from_numpy(np.array(v))
                         for k, v in port.params_to_torch(params).items()}, strict=False)
  ema = [p.detach().clone() for p in model.parameters()]
  opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.b1, cfg.optim.b2),
                          eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
  x = torch.from_numpy(batch['tokens']).long()
  valid = torch.from_numpy(batch['attention_mask']).float()
  eps = cfg.diffusion.eps

  def step(n):
    B = x.shape[0]
    t = ((torch.rand(()) + torch.arange(B) / B) % 1) * (1 - eps) + eps
    z = torch.where(torch.rand(x.shape) < (1 - eps) * t[:, None], mask_id, x)
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
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--no_torch', action='store_true')
  args = parser.parse_args()
  cfg = config_lib.resolve(args.preset, args.overrides)
  if args.batch:
    cfg = config_lib.apply_overrides(cfg, [f'train.batch_size={args.batch}'])
  B, L, V = cfg.train.batch_size, cfg.data.seq_len, cfg.model.vocab_size
  rng = np.random.default_rng(0)
  batch = {'tokens': rng.integers(0, V - 1, (B, L), dtype=np.int32),
           'attention_mask': np.ones((B, L), np.int32)}
  m = cfg.model
  print(f'{args.preset}: {m.n_blocks}x{m.hidden_size}, {m.n_heads} heads, V={V}, batch {B}x{L}, '
        f'dropout {m.dropout} | {jax.device_count()} x {jax.devices()[0].device_kind} | '
        f'jax {jax.__version__}')
  dt, flops, params = bench_jax(cfg, batch, args.steps)
  tokens = B * L
  print(f'jax    {dt * 1e3:9.1f} ms/step {tokens / dt:12,.0f} tokens/s {flops / dt / 1e9:9.1f} GFLOP/s'
        f'  ({flops / 1e9:.1f} GFLOP/step, XLA cost analysis)')
  if args.no_torch:
    return
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    print('torch not installed: no PyTorch baseline (pip install -r requirements-dev.txt)')
    return
  dt_t = bench_torch(cfg, batch, args.steps, params)
  print(f'torch  {dt_t * 1e3:9.1f} ms/step {tokens / dt_t:12,.0f} tokens/s '
        f'{flops / dt_t / 1e9:9.1f} GFLOP/s  (torch {torch.__version__}, '
        f'{torch.get_num_threads()} threads, eager)')
  print(f'ratio  jax/torch throughput = {dt_t / dt:.2f}x')


if __name__ == '__main__':
  main()
