"""Train an MDLM (or IMDM) denoiser.

  python train.py                                  # the `tiny` preset on the embedded corpus
  python train.py --preset lm1b-small --workdir runs/lm1b --set train.batch_size=256
  python train.py --preset tiny-imdm --workdir runs/imdm --init_from runs/default
  python train.py --multihost ...                  # every host of a TPU pod slice / GPU cluster

Resumes from `--workdir` automatically. Bad input: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse

from imdm_jax import config as config_lib, presets
from imdm_jax import runtime
from imdm_jax.errors import exits_cleanly


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--preset', default='tiny',
                      help=f'one of: {", ".join(sorted(presets.PRESETS))} (default tiny)')
  parser.add_argument('--set', dest='overrides', action='append', default=[],
                      metavar='SECTION.KEY=VALUE', help='override a config value (repeatable)')
  parser.add_argument('--workdir', default='runs/default',
                      help='checkpoints, metrics.jsonl and config.json go here (default runs/default)')
  parser.add_argument('--init_from', default=None, metavar='CHECKPOINT',
                      help='start a fresh run from the EMA weights of this run directory or '
                           'checkpoint (e.g. an IMDM from an MDLM); ignored when resuming')
  parser.add_argument('--list_presets', action='store_true', help='print the presets and exit')
  runtime.add_cluster_flags(parser)
  return parser.parse_args(argv)


@exits_cleanly
def main(argv=None) -> None:
  args = parse_args(argv)
  if args.list_presets:
    for name, fn in sorted(presets.PRESETS.items()):
      print(f'{name}: {fn.__doc__.strip()}\n')
    return
  cfg = config_lib.resolve(args.preset, args.overrides)  # bad flags fail before joining a job
  runtime.setup_from_args(args)
  from imdm_jax import trainer  # pylint: disable=g-import-not-at-top  (after runtime.setup)
  trainer.train(cfg, args.workdir, init_from=args.init_from)


if __name__ == '__main__':
  main()
