"""Named configurations: `--preset NAME` of train.py, sample.py, distill.py and convert.py.

Each preset is a function registered with `@preset` (its name with `-` for `_`); its docstring
says the command to run and what to expect. `config.resolve` applies `--set` overrides on top.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from imdm_jax.config import Config, DataConfig, ModelConfig, TrainConfig

PRESETS: dict[str, Callable[[], Config]] = {}


def preset(fn: Callable[[], Config]) -> Callable[[], Config]:
  PRESETS[fn.__name__.replace('_', '-')] = fn
  return fn


def _with(cfg: Config, **sections) -> Config:
  return dataclasses.replace(cfg, **{
      name: dataclasses.replace(getattr(cfg, name), **values) for name, values in sections.items()})


@preset
def tiny() -> Config:
  """MDLM on the embedded World English Bible, CPU-sized (d=128, 4 blocks, L=128, V=2049).

  `python train.py` (the default). About 5 minutes on 2 CPU cores; validation NELBO perplexity
  falls well below the corpus unigram perplexity (docs/results_text.md).
  """
  return _with(Config(), optim=dict(lr=1e-3, warmup_steps=100))


@preset
def micro() -> Config:
  """A network small enough for tests and smoke runs: `python train.py --preset micro`.

  Seconds per hundred steps; its numbers mean nothing beyond "the pipeline runs".
  """
  return _with(Config(),
               model=dict(vocab_size=513, hidden_size=32, n_blocks=2, n_heads=2, cond_dim=16),
               data=dict(seq_len=32),
               optim=dict(warmup_steps=10, lr=1e-3),
               train=dict(batch_size=16, num_steps=40, log_every=10, eval_every=20,
                          eval_batches=2, ckpt_every=20))


def _imdm(cfg: Config, noise_dim: int, **model) -> Config:
  return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, noise_dim=noise_dim, **model))


@preset
def tiny_imdm() -> Config:
  """`tiny` with the IMDM mask noise (D = 64): `python train.py --preset tiny-imdm`.

  Trained by the NELBO alone it matches `tiny` (eps is independent of the data, so the network
  has no reason to use it); it is the starting point for distillation.
  """
  return _imdm(tiny(), 64)


@preset
def micro_imdm() -> Config:
  """`micro` with the IMDM mask noise (D = 8): tests and smoke runs of IMDM programs."""
  return _imdm(micro(), 8)


@preset
def tiny_ar() -> Config:
  """The offline Gen PPL evaluator: a causal GPT-2 (4 x 128) on `tiny`'s data and tokenizer.

  `python train.py --preset tiny-ar --workdir runs/ar`, then
  `python sample.py --checkpoint runs/default --eval --evaluator runs/ar`.
  """
  return _with(tiny(), model=dict(arch='gpt2'))


def _small(**model) -> ModelConfig:
  return ModelConfig(hidden_size=768, n_blocks=12, n_heads=12, **model)


def _paper(vocab_size: int, data: DataConfig, eval_batches: int) -> Config:
  """The MDLM paper's network and schedule (batch 512 for 1M steps) on `data`."""
  return Config(model=_small(vocab_size=vocab_size), data=data,
                train=TrainConfig(batch_size=512, num_steps=1_000_000, log_every=100,
                                  eval_every=10_000, eval_batches=eval_batches, ckpt_every=10_000))


@preset
def lm1b_small() -> Config:
  """MDLM on LM1B as the IMDM paper trains it: 12x768 DiT, L=128 packed (the official
  `lm1b-wrap`), bert-base-uncased (V=30522), attention soft-cap 50, batch 512, 1M steps.

  `tfds build lm1b --file_format=array_record --data_dir ~/.cache/imdm_jax` once, then
  `python train.py --preset lm1b-small`. (The MDLM paper's 27.04 NELBO perplexity bound is for
  padded rows without the soft-cap: `--set data.wrap=false --set model.attn_softcap=0`.)
  """
  cfg = _paper(30522, DataConfig(source='tfds:lm1b', seq_len=128, wrap=True,
                                 tokenizer='bert-base-uncased', val_split='test'), eval_batches=0)
  return _with(cfg, model=dict(attn_softcap=50.0))


@preset
def owt_small() -> Config:
  """MDLM paper, OpenWebText: 12x768 DiT, L=1024 wrapped, GPT-2 BPE (V=50258), batch 512, 1M steps.

  Export OpenWebText to `.jsonl` files (docs/data.md) then
  `python train.py --preset owt-small --set data.source='text:/data/owt/*.jsonl'`.
  The paper reports validation NELBO perplexity <= 23.21 after 1M steps.
  """
  return _paper(50258, DataConfig(source='text:openwebtext/*.jsonl', seq_len=1024, wrap=True,
                                  tokenizer='gpt2', val_split='last:100000'), eval_batches=100)


@preset
def lm1b_small_imdm() -> Config:
  """IMDM on LM1B as in the paper: `lm1b-small` (soft-cap 50) with D = 768.

  `python train.py --preset lm1b-small-imdm --init_from runs/lm1b-mdlm` starts from an MDLM's
  EMA weights (the noise MLP's output layer at zero, so step 0 is exactly that MDLM).
  """
  return _imdm(lm1b_small(), 768)


@preset
def owt_small_imdm() -> Config:
  """IMDM on OpenWebText as in the paper: `owt-small` with D = 2048.

  `python train.py --preset owt-small-imdm --init_from CONVERTED_MDLM_OWT`.
  """
  return _imdm(owt_small(), 2048)


def _sdtt(cfg: Config, batch: int) -> Config:
  return _with(cfg, optim=dict(lr=6e-5, warmup_steps=500, grad_clip=1.0, ema_decay=0.9999),
               train=dict(batch_size=batch, log_every=100, eval_every=10_000, ckpt_every=5_000),
               sdtt=dict(round_steps=10_000, num_rounds=7, divergence='kl-bwd'))


def _redi(cfg: Config) -> Config:
  # the official ReDi scripts keep the default constant schedule with its 2500 warm-up steps
  return _with(cfg, optim=dict(lr=3e-4, warmup_steps=2500, ema_decay=0.9999),
               train=dict(batch_size=512, num_steps=50_000, log_every=100, eval_every=10_000,
                          ckpt_every=5_000),
               redi=dict(num_pairs=100_000, sampler_steps=1024))


@preset
def lm1b_sdtt_imdm() -> Config:
  """SDTT of an IMDM student on LM1B, the paper's hyperparameters (lr 6e-5, 500 warm-up, EMA
  0.9999, clip 1.0, batch 32, 7 rounds of 10k steps).

  `python distill.py sdtt --preset lm1b-sdtt-imdm --teacher MDLM_LM1B --workdir runs/sdtt-lm1b`.
  The paper reports Gen PPL 122.5 at 8 steps (Table 4).
  """
  return _sdtt(lm1b_small_imdm(), 32)


@preset
def owt_sdtt_imdm() -> Config:
  """SDTT of an IMDM student on OpenWebText (batch 128, otherwise as `lm1b-sdtt-imdm`).

  `python distill.py sdtt --preset owt-sdtt-imdm --teacher runs/mdlm-owt --workdir runs/sdtt-owt`.
  """
  return _sdtt(owt_small_imdm(), 128)


@preset
def lm1b_redi_imdm() -> Config:
  """ReDi of an IMDM student on LM1B (lr 3e-4, batch 512, 50k steps, 100k pairs from a
  1024-step teacher).

  `python distill.py redi --preset lm1b-redi-imdm --teacher runs/sdtt-lm1b --workdir runs/redi`.
  After SDTT the paper reports Gen PPL 65.6 at 8 steps (Table 4).
  """
  return _redi(lm1b_small_imdm())


@preset
def owt_large() -> Config:
  """SDTT's 860M model: 24x1536 DiT with 16 heads, otherwise as `owt-small`; bf16 matmuls,
  per-block rematerialisation, batch 512 in 2 micro-batches.

  `python train.py --preset owt-large --set mesh.fsdp=8` on an accelerator slice. Estimated
  per device on 8 chips with fsdp=8 (`imdm_jax.memory`; 64 rows each): float32 without remat
  ~370 GiB, bf16 ~250 GiB, bf16 + remat ~58 GiB, bf16 + remat in 2 micro-batches ~30 GiB — the
  last fits an 80 GB GPU with room for XLA's transient buffers (grad_accum=1 would leave ~17 GiB).
  """
  cfg = owt_small()
  return _with(cfg, model=dict(hidden_size=1536, n_blocks=24, n_heads=16, dtype='bfloat16',
                               remat=True),
               train=dict(grad_accum=2))
