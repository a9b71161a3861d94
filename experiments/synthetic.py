"""The synthetic experiment (method.md §5): MDM vs IMDM, trained and distilled, at few steps.

  python experiments/synthetic.py                      # V_s = 64, about 35 minutes on 2 CPU cores
  python experiments/synthetic.py --preset quick       # a few minutes
  python experiments/synthetic.py --preset target --only imdm/consensus  # the target, ~46 minutes
  python experiments/synthetic.py --set vocab=1000 --out runs/synthetic-1000

Writes results.json, results.md and results.png to --out.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from imdm_jax import errors, runtime  # pylint: disable=wrong-import-position
from imdm_jax.synthetic import experiment, report, settings  # pylint: disable=wrong-import-position


@errors.exits_cleanly
def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
  command = 'python experiments/synthetic.py ' + shlex.join(argv)
  only = tuple(a for a in args.only.split(',') if a)
  experiment.run(setting, args.out, command.strip(), only)


if __name__ == '__main__':
  main(sys.argv[1:])
