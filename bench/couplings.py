"""ReDi coupling runs: the step sampler against reveal groups, on the same weights and inputs.

  python bench/couplings.py --pairs 8192 --steps 128

The synthetic experiment's network (2 x 64 DiT, L = 10, V_s = 64, D = 8; random weights: the
number of reveal groups depends only on the schedule) with eps held fixed, as the experiment's
teachers run. Prints pairs/s of each and the ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dataclasses  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from imdm_jax import redi, reveal_groups, runtime, sharding, train_state  # pylint: disable=wrong-import-position
from imdm_jax.config import MeshConfig  # pylint: disable=wrong-import-position
from imdm_jax.synthetic import arms, task  # pylint: disable=wrong-import-position
from imdm_jax.synthetic.settings import Setting  # pylint: disable=wrong-import-position


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--pairs', type=int, default=8192)
  parser.add_argument('--steps', type=int, default=128)
  args = parser.parse_args()
  runtime.setup()
  s = Setting(teacher_steps=args.steps)
  cfg = arms.config(s, imdm=True)
  cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, teacher_fix_eps=True))
  mesh = sharding.make_mesh(MeshConfig())
  params = train_state.init_params(cfg, s.vocab, jax.random.PRNGKey(0))
  graphdef = train_state.model_graphdef(cfg, s.vocab)
  rng = np.random.default_rng(0)
  x = task.sequences(rng, s.batch, s.vocab, s.length)
  seeds = np.arange(s.batch, dtype=np.int32)
  rates = {}
  for name, exact in (('step sampler', lambda *_: False), ('reveal groups', reveal_groups.exact_for)):
    original, reveal_groups.exact_for = reveal_groups.exact_for, exact
    try:
      run = redi.compile_coupler(cfg, graphdef, mesh, s.vocab)
    finally:
      reveal_groups.exact_for = original
    run(params, jax.random.PRNGKey(0), x, seeds)  # compile
    start = time.time()
    for c in range(-(-args.pairs // s.batch)):
      run(params, jax.random.PRNGKey(c), x, seeds)
    rates[name] = args.pairs / (time.time() - start)
    print(f'{name}: {rates[name]:.0f} pairs/s', flush=True)
  print(f'reveal groups / step sampler: {rates["reveal groups"] / rates["step sampler"]:.1f}x')


if __name__ == '__main__':
  main()
