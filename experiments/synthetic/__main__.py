"""The synthetic experiment (method.md §5): MDM vs IMDM, trained and distilled, at few steps.

From the repository root:

  python -m experiments.synthetic                      # V_s = 64, about 35 minutes on 2 CPU cores
  python -m experiments.synthetic --preset quick       # a few minutes
  python -m experiments.synthetic --preset target --only imdm/consensus  # the target, ~46 minutes
  python -m experiments.synthetic --set vocab=1000 --out runs/synthetic-1000

Writes results.json, results.md and results.png to --out.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from imdm_jax import errors, runtime

from experiments.synthetic import experiment, report, settings


@errors.exits_cleanly
def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(prog='python -m experiments.synthetic',
                                   description=__doc__.splitlines()[0])
  parser.add_argument('--preset', default='default', help=', '.join(settings.PRESETS))
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE')
  parser.add_argument('--out', default='runs/synthetic')
  parser.add_argument('--render', action='store_true',
                      help='only re-render results.md and results.png from --out/results.json')
  parser.add_argument('--only', default='', metavar='ARM[,ARM]',
                      help='run only these arms (e.g. imdm/redi,imdm/redi-balanced)')
  args = parser.parse_args(argv)
  if args.render:
    report.render(args.out)
    return
  setting = settings.resolve(args.preset, args.set)
  runtime.setup()
  command = 'python -m experiments.synthetic ' + shlex.join(argv)
  only = tuple(a for a in args.only.split(',') if a)
  experiment.run(setting, args.out, command.strip(), only)


if __name__ == '__main__':
  main(sys.argv[1:])
