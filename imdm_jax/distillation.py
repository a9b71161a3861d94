"""Distillation runs as trainer `Program`s: the loop, checkpoints, resumption and evaluation are
`trainer.train`'s; what differs is the state (a student plus a frozen teacher) and the step."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from imdm_jax import couplings as couplings_lib, sdtt, train_state, train_step, trainer
from imdm_jax.config import Config
from imdm_jax.data import store
from imdm_jax.errors import UserError


def sdtt_config(cfg: Config) -> Config:
  """An SDTT run's config: it lasts its rounds (`train.num_steps` = num_rounds x round_steps),
  and its batch splits into the loss's blocks of t (`sdtt.stratum_rows`)."""
  if cfg.sdtt.stratum_rows and cfg.train.batch_size % cfg.sdtt.stratum_rows:
    raise UserError(f'train.batch_size={cfg.train.batch_size} is not divisible by '
                    f'sdtt.stratum_rows={cfg.sdtt.stratum_rows} (or set it to 0: one mean)')
  return dataclasses.replace(cfg, train=dataclasses.replace(
      cfg.train, num_steps=cfg.sdtt.num_rounds * cfg.sdtt.round_steps))


def sdtt_program(cfg: Config) -> trainer.Program:
  """SDTT: the student starts from the teacher checkpoint's EMA weights (an IMDM student adds a
  zero-initialised noise path), the teacher is a copy of them; rounds advance by step count, so a
  run resumed mid-round continues that round with the saved teacher."""

  def init(cfg, mesh, teacher):
    if not teacher:
      raise UserError('SDTT needs --teacher CHECKPOINT (an MDLM or IMDM run or conversion)')
    student = trainer.TRAIN.init(cfg, mesh, teacher)
    return sdtt.SdttState(student=student, teacher=jax.tree.map(jnp.copy, student.params),
                          round=jnp.zeros((), jnp.int32))

  def abstract(cfg, mesh: Mesh):
    student = train_state.abstract_state(cfg, mesh)
    round_ = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))
    return sdtt.SdttState(student=student, teacher=student.params, round=round_)

  def before_step(state: sdtt.SdttState, step: int) -> sdtt.SdttState:  # step: 1-based
    return sdtt.advance_rounds(state, step - 1, cfg.sdtt.round_steps)

  return trainer.Program(data=store.prepare, init=init, abstract=abstract, step=train_step.sdtt_step,
                         student=lambda state: state.student, before_step=before_step)


def redi_program(couplings: str) -> trainer.Program:
  """ReDi rectification: the student (from `--init`'s EMA weights) trains on the pairs in
  `couplings`; validation is the NELBO on the real validation split."""

  def data(cfg):
    real = store.prepare(cfg)
    pairs = couplings_lib.load(couplings, cfg, real.tokenizer.name)
    return store.Dataset(real.tokenizer, pairs, real.validation, couplings)

  def init(cfg, mesh, start):
    if not start:
      raise UserError('ReDi training needs --init CHECKPOINT (the model that made the couplings)')
    return trainer.TRAIN.init(cfg, mesh, start)

  return trainer.Program(data=data, init=init, abstract=train_state.abstract_state,
                         step=train_step.redi_step)
