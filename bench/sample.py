"""Sampling throughput: the compiled JAX sampler, cached vs uncached, vs the same loop in PyTorch.

  python -m bench.sample --preset tiny --batch 32 --steps 8,32,128

Prints, per step count, samples/s and tokens/s, the fraction of network calls the cache skipped,
and (if torch is installed) the reference-style PyTorch loop (float64 draws, cached) on the same
weights with the JAX/PyTorch ratio. Random weights: speed does not depend on what was learned,
but the cache does (a trained model reveals tokens in the same way; random weights are close).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from imdm_jax import config as config_lib
from imdm_jax import sampler, sampling, sharding, train_state


def random_params(cfg, mask_id):
  params = train_state.init_params(cfg, jax.random.PRNGKey(0))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  return jax.tree.unflatten(treedef, [x + 0.02 * jax.random.normal(k, x.shape)
                                      for k, x in zip(keys, leaves)])


def bench_jax(cfg, params, mask_id, batch, steps, cache, reps=2):
  mesh = sharding.make_mesh(cfg.mesh)
  graphdef = train_state.model_graphdef(cfg)
  run = sampling.compile_sampler(cfg, graphdef, mesh,
                                 sampler.SamplerConfig(steps=steps, cache=cache), mask_id)
  z = jnp.full((batch, cfg.data.seq_len), mask_id, jnp.int32)
  jax.block_until_ready(run(params, jax.random.PRNGKey(0), z))  # compile
  t0 = time.perf_counter()
  for r in range(reps):
    _, stats = jax.block_until_ready(run(params, jax.random.PRNGKey(r + 1), z))
  return (time.perf_counter() - t0) / reps, int(stats['nfe'])


def bench_torch(cfg, params, mask_id, batch, steps, reps=2):
  import torch  # pylint: disable=g-import-not-at-top
  from tests import torch_reference, torch_weights  # pylint: disable=g-import-not-at-top
  model = torch_reference.DIT(cfg, mask_id).eval()
  model.load_state_dict({k: torch.from_numpy(np.array(v))
                         for k, v in torch_weights.params_to_torch(params).items()}, strict=False)
  grid = torch.linspace(1, sampler.T_MIN, steps + 1, dtype=torch.float64)
  alpha = lambda t: 1 - (1 - cfg.diffusion.alpha_min) * t

  @torch.no_grad()
  def run():
    z = torch.full((batch, cfg.data.seq_len), mask_id, dtype=torch.long)
    p_x = None
    for k in range(steps):
      if p_x is None:  # cached: recompute only after a step that changed something
        logits = model(z).double()
        logits[..., mask_id] = -1e6
        p_x = logits.softmax(-1)
      a_t = alpha(grid[k])
      a_s = torch.tensor(1.0, dtype=torch.float64) if k == steps - 1 else alpha(grid[k + 1])
      probs = p_x * (a_s - a_t) / (1 - a_t)
      probs[..., mask_id] = (1 - a_s) / (1 - a_t)
      draw = (probs / -torch.rand_like(probs).clamp_min(1e-300).log()).argmax(-1)
      new_z = torch.where(z == mask_id, draw, z)
      if not torch.equal(new_z, z):
        p_x = None
      z = new_z
    return z

  run()
  t0 = time.perf_counter()
  for _ in range(reps):
    run()
  return (time.perf_counter() - t0) / reps


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--preset', default='tiny')
  parser.add_argument('--set', dest='overrides', action='append', default=[])
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--steps', default='8,32,128')
  parser.add_argument('--no_torch', action='store_true')
  args = parser.parse_args()
  cfg = config_lib.resolve(args.preset, args.overrides + ['model.dropout=0.0'])
  mask_id = cfg.model.vocab_size - 1
  params = random_params(cfg, mask_id)
  L = cfg.data.seq_len
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
    have_torch = not args.no_torch
  except ImportError:
    have_torch = False
  print(f'{args.preset}: {cfg.model.n_blocks}x{cfg.model.hidden_size}, V={cfg.model.vocab_size}, '
        f'batch {args.batch}x{L} | {jax.device_count()} x {jax.devices()[0].device_kind}')
  print(f'{"steps":>5} {"impl":>14} {"s/batch":>9} {"samples/s":>10} {"tokens/s":>10} '
        f'{"net calls":>9} {"skipped":>8}')
  for steps in (int(s) for s in args.steps.split(',')):
    for cache in (False, True):
      dt, nfe = bench_jax(cfg, params, mask_id, args.batch, steps, cache)
      name = 'jax cached' if cache else 'jax uncached'
      print(f'{steps:>5} {name:>14} {dt:9.3f} {args.batch / dt:10.1f} {args.batch * L / dt:10.0f} '
            f'{nfe:>9} {1 - nfe / steps:8.1%}')
    if have_torch:
      dt_t = bench_torch(cfg, params, mask_id, args.batch, steps)
      print(f'{steps:>5} {"torch cached":>14} {dt_t:9.3f} {args.batch / dt_t:10.1f} '
            f'{args.batch * L / dt_t:10.0f}   (jax cached / torch: {dt_t / dt:.2f}x)')


if __name__ == '__main__':
  main()
