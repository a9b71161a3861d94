"""Sample from a trained (or converted) MDLM / IMDM checkpoint, optionally scoring the samples.

  python sample.py --checkpoint runs/default --steps 8 --num_samples 64
  python sample.py --checkpoint runs/default --steps 1,2,4,8,16,32,128 --eval --evaluator runs/ar
  python sample.py ... --eval --evaluator runs/ar --protocol ours   # Gen PPL by our protocol
  python sample.py --checkpoint runs/default --prefix "In the beginning" --steps 32
  python sample.py --multihost ...                 # every host of a TPU pod slice / GPU cluster

Writes <run>/samples/samples_steps{S}.jsonl (text, token ids, steps, seed) and metrics.json /
metrics.md / metrics.png (entropy per step count, and Gen PPL under --evaluator, a causal-LM
checkpoint: `train.py --preset tiny-ar`, or GPT-2 ported by convert.py). Joins multi-process jobs
like train.py: every process runs the same command, each batch is split over all devices, and
process 0 prints and writes; the samples depend on the seed only, not on the number of processes.
Bad input: one line on stderr, exit status 2, no output file.
"""

from __future__ import annotations

import argparse

from imdm_jax import runtime
from imdm_jax.errors import UserError, exits_cleanly


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--checkpoint', required=True, help='a run directory or its checkpoints/')
  p.add_argument('--steps', default='128', help='sampling steps, or a comma list (default 128)')
  p.add_argument('--num_samples', type=int, default=64)
  p.add_argument('--batch_size', type=int, default=0, help='default: min(num_samples, 64)')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--prefix', default='', help='condition on this text (clamped after BOS)')
  p.add_argument('--out', default='', help='output directory (default <run>/samples)')
  p.add_argument('--eval', action='store_true',
                 help='also report the validation NELBO perplexity (if the run\'s data is here) and '
                      'Gen PPL under --evaluator')
  p.add_argument('--evaluator', default='', help='causal-LM checkpoint scoring Gen PPL (--eval)')
  # = evaluate.PROTOCOLS (a test checks), spelled out: the model code loads after the flags parse
  p.add_argument('--protocol', default='official', choices=('official', 'ours'),
                 help='Gen PPL protocol (docs/sampling.md): official (the IMDM reference: literal '
                      'special tokens, no BOS, cut at the model length) or ours (documents, BOS, '
                      'every token scored)')
  p.add_argument('--final', default='ancestral', choices=['ancestral', 'greedy'],
                 help='last step: draw every remaining mask, or take the argmax')
  p.add_argument('--temperature', type=float, default=1.0)
  p.add_argument('--top_p', type=float, default=1.0, help='nucleus sampling when < 1')
  p.add_argument('--float32', action='store_true', help='float32 categorical draws (biased)')
  p.add_argument('--no_cache', action='store_true', help='call the network at every step')
  p.add_argument('--fix_eps', action='store_true', help='IMDM: never re-draw the mask noise')
  runtime.add_cluster_flags(p)
  return p.parse_args(argv)


@exits_cleanly
def main(argv=None) -> None:
  args = parse_args(argv)
  try:  # bad flags fail before joining a job
    steps = tuple(int(s) for s in args.steps.split(','))
  except ValueError:
    raise UserError(f'--steps: expected integers separated by commas, got {args.steps!r}') from None
  if args.evaluator and not args.eval:
    raise UserError('--evaluator scores samples only with --eval')
  runtime.setup_from_args(args)
  from imdm_jax import generation, sampler  # pylint: disable=g-import-not-at-top
  scfg = sampler.SamplerConfig(steps=steps[0], final=args.final, float64=not args.float32,
                               temperature=args.temperature, top_p=args.top_p,
                               cache=not args.no_cache, fix_eps=args.fix_eps)
  generation.run(generation.Request(
      checkpoint=args.checkpoint, steps=steps, num_samples=args.num_samples, seed=args.seed,
      prefix=args.prefix, batch_size=args.batch_size, out=args.out,
      evaluator=args.evaluator if args.eval else '', nelbo=args.eval, protocol=args.protocol,
      scfg=scfg))


if __name__ == '__main__':
  main()
