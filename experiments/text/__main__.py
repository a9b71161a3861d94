"""The text study (issue #17): MDLM vs IMDM, undistilled and after SDTT, ReDi and SDTT -> ReDi,
sampled at 1 to 128 steps and scored by Gen PPL and unigram entropy.

From the repository root:

  python -m experiments.text --preset cpu --out runs/text-cpu      # the embedded corpus, 2 cores
  python -m experiments.text --preset micro --out runs/text-micro  # the chain in about a minute
  python -m experiments.text --preset lm1b --out runs/text-lm1b \\
      --set all:data.data_dir=/data/tfds --set evaluator=runs/gpt2-large   # on an accelerator

Resumable: run the same command again after an interruption. Writes results.json, results.md and
results.png to --out (each stage's run directory beneath it).
"""

from __future__ import annotations

import argparse
import shlex
import sys

from imdm_jax import errors, runtime

from experiments.text import report, settings


@errors.exits_cleanly
def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(prog='python -m experiments.text',
                                   description=__doc__.splitlines()[0],
                                   epilog='presets: ' + ', '.join(settings.PRESETS))
  parser.add_argument('--preset', default='cpu', help=', '.join(settings.PRESETS))
  parser.add_argument('--set', action='append', default=[],
                      metavar='FIELD=VALUE or STAGE:SECTION.KEY=VALUE')
  parser.add_argument('--out', default='runs/text')
  parser.add_argument('--render', action='store_true',
                      help='only re-render results.md and results.png from --out/results.json')
  args = parser.parse_args(argv)
  if args.render:
    report.render(args.out)
    return
  study = settings.resolve(args.preset, args.set)
  runtime.setup()
  from experiments.text import study as study_lib  # pylint: disable=g-import-not-at-top
  command = 'python -m experiments.text ' + shlex.join(argv)
  study_lib.run(study, args.out, command.strip())


if __name__ == '__main__':
  main(sys.argv[1:])
