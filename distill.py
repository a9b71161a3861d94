"""Few-step distillation of MDLM and IMDM students: SDTT and ReDi (and SDTT followed by ReDi).

  python distill.py sdtt --teacher runs/default --workdir runs/sdtt \\
      --set sdtt.round_steps=500 --set sdtt.num_rounds=3
  python distill.py redi-generate --teacher runs/sdtt --out runs/pairs --set redi.num_pairs=4096
  python distill.py redi-train --couplings runs/pairs --init runs/sdtt --workdir runs/redi
  python distill.py redi --teacher runs/sdtt --workdir runs/reflow --set redi.rounds=3
  python distill.py redi-generate --multihost ...  # every host of a TPU pod slice / GPU cluster

`sdtt` lasts num_rounds x round_steps steps. `redi` runs redi.rounds rounds of
generate + train (round k + 1 couples from the round-k student, with fresh seeds) in
WORKDIR/round{k}. `--preset` sets the student's architecture, data and optimizer (the papers'
hyperparameters: `--set optim.lr=6e-5` for SDTT, `3e-4` for ReDi). Runs resume from their
directories like train.py, join multi-process jobs like train.py (every process runs the same
command; `redi-generate` splits each chunk over all devices and process 0 writes) and end with a
`done: ...` line. Bad input: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import os

from imdm_jax import config as config_lib
from imdm_jax import runtime
from imdm_jax.errors import exits_cleanly


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('method', choices=['sdtt', 'redi-generate', 'redi-train', 'redi'])
  p.add_argument('--teacher', help='sdtt, redi-generate, redi: the run or checkpoint to distil')
  p.add_argument('--couplings', help='redi-train: a redi-generate output directory')
  p.add_argument('--init', help='redi-train: the student\'s starting checkpoint')
  p.add_argument('--out', help='redi-generate: where the couplings go')
  p.add_argument('--workdir', help='sdtt, redi-train, redi: the run directory')
  p.add_argument('--preset', default='tiny', help='the student (default tiny)')
  p.add_argument('--force', action='store_true',
                 help='redi-generate: replace couplings of another request in --out')
  p.add_argument('--set', dest='overrides', action='append', default=[],
                 metavar='SECTION.KEY=VALUE')
  runtime.add_cluster_flags(p)
  return p.parse_args(argv)


def _need(args, *names):
  from imdm_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  for name in names:
    if not getattr(args, name):
      raise UserError(f'{args.method} needs --{name}')


@exits_cleanly
def main(argv=None) -> None:
  args = parse_args(argv)
  cfg = config_lib.resolve(args.preset, args.overrides)  # bad flags fail before joining a job
  runtime.setup_from_args(args)
  import jax  # pylint: disable=g-import-not-at-top  (after runtime.setup)
  from imdm_jax import couplings, distillation, trainer  # pylint: disable=g-import-not-at-top
  if args.method == 'sdtt':
    _need(args, 'teacher', 'workdir')
    cfg = distillation.sdtt_config(cfg)
    trainer.train(cfg, args.workdir, init_from=args.teacher, program=distillation.sdtt_program(cfg))
  elif args.method == 'redi-generate':
    _need(args, 'teacher', 'out')
    couplings.generate(cfg, args.teacher, args.out, force=args.force)  # prints its `done:` line
  elif args.method == 'redi-train':
    _need(args, 'couplings', 'init', 'workdir')
    trainer.train(cfg, args.workdir, init_from=args.init,
                  program=distillation.redi_program(args.couplings))
  else:  # reflow: each round couples from the previous round's student, with fresh seeds
    _need(args, 'teacher', 'workdir')
    teacher = args.teacher
    for k in range(cfg.redi.rounds):
      root = os.path.join(args.workdir, f'round{k}')
      pairs = couplings.generate(cfg, teacher, os.path.join(root, 'couplings'),
                            seed_offset=k * cfg.redi.num_pairs)
      trainer.train(cfg, root, init_from=teacher, program=distillation.redi_program(pairs))
      teacher = root
    if jax.process_index() == 0:
      print(f'done: {cfg.redi.rounds} ReDi round(s) of {cfg.redi.num_pairs:,} pairs '
            f'| final student {os.path.abspath(teacher)}')


if __name__ == '__main__':
  main()
