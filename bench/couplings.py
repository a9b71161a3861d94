"""ReDi coupling runs: the step sampler against reveal groups, on the same weights and inputs.

  python -m bench.couplings --pairs 8192 --steps 128     # from the repository root

The synthetic experiment's network (2 x 64 DiT, L = 10, V_s = 64, D = 8; random weights: the
number of reveal groups depends only on the schedule) with eps held fixed, as the experiment's
teachers run. Prints pairs/s of each and the ratio.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from imdm_jax import noise, redi, reveal_groups, runtime, sampler, sampling, train_state

from experiments.synthetic import arms, task
from experiments.synthetic.settings import Setting


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--pairs', type=int, default=8192)
  parser.add_argument('--steps', type=int, default=128)
  args = parser.parse_args()
  runtime.setup()
  s = Setting(teacher_steps=args.steps)
  cfg = arms.config(s, imdm=True)
  scfg = sampler.SamplerConfig(steps=args.steps, fix_eps=True)  # the experiment's teachers
  assert reveal_groups.exact_for(cfg, scfg, imdm=True)
  params = train_state.init_params(cfg, jax.random.PRNGKey(0))
  denoise = sampling.model_denoiser(train_state.model_graphdef(cfg), cfg, s.vocab)
  x = jnp.asarray(task.sequences(np.random.default_rng(0), s.batch, s.vocab, s.length))
  eps = noise.seeded_eps(jnp.arange(s.batch, dtype=jnp.int32), s.length, cfg)
  rates = {}
  for name, sample in (('step sampler', sampler.sample), ('reveal groups', reveal_groups.sample)):
    def run(key, sample=sample):  # a coupling run from ReDi's inputs, as `sampling.compile_coupler`
      k_in, k_run = jax.random.split(key)
      z, t = redi.coupling_inputs(k_in, x, s.vocab, cfg.redi.full_mask_fraction)
      return sample(denoise, params, k_run, z, eps, mask_id=s.vocab, cfg=cfg, scfg=scfg, t0=t)[0]
    with jax.enable_x64(scfg.float64):
      run = jax.jit(run)
      run(jax.random.PRNGKey(0)).block_until_ready()  # compile
      start = time.time()
      for c in range(-(-args.pairs // s.batch)):
        run(jax.random.PRNGKey(c)).block_until_ready()
    rates[name] = args.pairs / (time.time() - start)
    print(f'{name}: {rates[name]:.0f} pairs/s', flush=True)
  print(f'reveal groups / step sampler: {rates["reveal groups"] / rates["step sampler"]:.1f}x')


if __name__ == '__main__':
  main()
