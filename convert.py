"""Port a PyTorch MDLM / SDTT / IMDM checkpoint to this project's checkpoint format.

  python convert.py ~/hf/mdlm-owt --out runs/mdlm-owt --tokenizer_path ~/hf/gpt2
  python convert.py mdlm.ckpt --out runs/mdlm-ema              # Lightning: EMA weights by default
  python convert.py mdlm.ckpt --out runs/mdlm-raw --raw
  python convert.py ~/hf/mdlm-owt --out runs/imdm-start --set model.noise_dim=2048

SRC: a Hugging Face `model.safetensors` (or a sharded `model.safetensors.index.json`), a
`pytorch_model.bin`, a directory holding one of them (plus an optional `config.json`), or a
Lightning `.ckpt`. The architecture is inferred from the tensors; the preset follows the vocabulary
(V=50258: owt-small, V=30522: lm1b-small, `-imdm` variants for IMDM weights) unless --preset says.

Hugging Face GPT-2 weights (`gpt2` ... `gpt2-large`: keys `wte.weight`, `h.0.attn.c_attn.weight`,
...) are recognised and become a causal-LM run (`model.arch=gpt2`), the Gen PPL evaluator of
`sample.py --eval --evaluator OUT`.

Security: a `.ckpt` is a pickle that must be unpickled in full, which executes code from the file:
convert only checkpoints you trust. `.bin` files are read with torch's safe `weights_only` loader,
safetensors without any pickle.

Writes OUT/checkpoints (step 0; params and EMA both the converted weights) and OUT/config.json,
ready for `train.py --init_from OUT` and sampling. Bad input: one line on stderr, exit status 2,
nothing written.
"""

from __future__ import annotations

import argparse

from imdm_jax import presets
from imdm_jax import runtime
from imdm_jax.errors import exits_cleanly


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('src', metavar='SRC', help='checkpoint file or directory (see above)')
  parser.add_argument('--out', required=True, metavar='DIR', help='run directory to create')
  parser.add_argument('--raw', action='store_true',
                      help='.ckpt only: convert the raw weights instead of the EMA weights')
  parser.add_argument('--force', action='store_true',
                      help='replace the checkpoints already in DIR')
  parser.add_argument('--tokenizer_path', default='', metavar='P',
                      help='local GPT-2 (vocab.json + merges.txt, or tokenizer.json) or '
                           'bert-base-uncased (vocab.txt) files; checked against V and saved as '
                           'data.tokenizer_path')
  parser.add_argument('--preset', default=None,
                      help=f'base config, one of: {", ".join(sorted(presets.PRESETS))} '
                           '(default: by vocabulary); an -imdm preset adds a fresh noise path to '
                           'MDLM weights')
  parser.add_argument('--set', dest='overrides', action='append', default=[],
                      metavar='SECTION.KEY=VALUE',
                      help='override a config value, e.g. model.n_heads=16, model.attn_softcap=50, '
                           'model.noise_dim=768 (repeatable; applied last)')
  return parser.parse_args(argv)


@exits_cleanly
def main(argv=None) -> None:
  args = parse_args(argv)
  runtime.setup()
  from imdm_jax.convert import convert  # pylint: disable=g-import-not-at-top  (after runtime.setup)
  print(convert(args.src, args.out, raw=args.raw, force=args.force,
                tokenizer_path=args.tokenizer_path, preset=args.preset, overrides=args.overrides))


if __name__ == '__main__':
  main()
