"""Few-step distillation of MDLM and IMDM students: SDTT (and, next, ReDi).

  python distill.py sdtt --teacher runs/default --workdir runs/sdtt
  python distill.py sdtt --teacher runs/default --workdir runs/sdtt-imdm --preset tiny-imdm \\
      --set distill.round_steps=500 --set distill.num_rounds=3

The run lasts `distill.num_rounds x distill.round_steps` steps; the preset's optimizer applies
(the SDTT paper: lr 6e-5, 500 warm-up steps, EMA 0.9999, clip 1.0: `--preset` + `--set optim.*`).
Resumes from --workdir like train.py. Bad input: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses

from imdm_jax import config as config_lib
from imdm_jax import runtime
from imdm_jax.errors import exits_cleanly


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('method', choices=['sdtt'])
  p.add_argument('--teacher', required=True, help='the run or converted checkpoint to distil')
  p.add_argument('--workdir', required=True)
  p.add_argument('--preset', default='tiny',
                 help='architecture, data and optimizer of the student (default tiny)')
  p.add_argument('--set', dest='overrides', action='append', default=[],
                 metavar='SECTION.KEY=VALUE')
  return p.parse_args(argv)


@exits_cleanly
def main(argv=None) -> None:
  args = parse_args(argv)
  runtime.setup()
  from imdm_jax import distillation, trainer  # pylint: disable=g-import-not-at-top
  cfg = config_lib.resolve(args.preset, args.overrides)
  d = cfg.distill
  cfg = dataclasses.replace(cfg, train=dataclasses.replace(
      cfg.train, num_steps=d.num_rounds * d.round_steps))
  config_lib.validate(cfg)
  trainer.train(cfg, args.workdir, init_from=args.teacher,
                program=distillation.sdtt_program(cfg))


if __name__ == '__main__':
  main()
