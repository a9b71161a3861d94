"""The training loop behind `train.py`: data, state, compiled steps, evaluation, checkpoints.

Resumes automatically: if `workdir/checkpoints` holds a checkpoint, its state and data position
are restored (after checking that the network and data match) and training continues from there.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable

import jax
from tqdm import tqdm

from imdm_jax import (checkpoint, config as config_lib, files, init_from as init_lib, memory,
                      metrics, sharding, train_state, train_step)
from imdm_jax.data import pipeline, store
from imdm_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Program:
  """What a run trains: its data, how its state is made, and its pure step. `train.py` trains a
  `TrainState` on rows; distillation wraps one (SDTT adds a frozen teacher, ReDi reads
  couplings) and reuses this loop, its checkpoints and its evaluation."""
  data: Callable[[config_lib.Config], store.Dataset]
  init: Callable[..., Any]  # (cfg, mesh, init_from) -> a fresh state
  abstract: Callable[..., Any]  # (cfg, mesh) -> its restore target
  step: Callable[..., Any]  # pure (state, batch, *, graphdef, cfg, mask_id) -> (state, metrics)
  student: Callable[[Any], train_state.TrainState] = lambda state: state
  before_step: Callable[[Any, int], Any] = lambda state, step: state  # e.g. round boundaries


def _fresh_train_state(cfg, mesh, init_from):
  state = train_state.init_state(cfg, mesh)
  return init_lib.initialise(state, cfg, init_from, mesh) if init_from else state


TRAIN = Program(data=store.prepare, init=_fresh_train_state, abstract=train_state.abstract_state,
                step=train_step.train_step)


@dataclasses.dataclass
class Summary:
  step: int
  val_loss: float
  val_ppl: float
  workdir: str


def evaluate(eval_fn, params, rows, cfg: config_lib.Config, mesh) -> tuple[float, float]:
  """(loss per token, perplexity) over the validation rows: for a diffusion model the NELBO and
  the bound it gives. The same keys every time, so numbers at different steps are comparable."""
  key = jax.random.PRNGKey(cfg.train.seed + 1)
  total = count = 0.0
  for b, batch in enumerate(pipeline.eval_batches(rows, cfg.train.batch_size,
                                                  cfg.train.eval_batches)):
    out = jax.device_get(eval_fn(params, sharding.to_global(batch, mesh), jax.random.fold_in(key, b)))
    total += float(out['nll_sum'])
    count += float(out['count'])
  nelbo = total / max(count, 1.0)
  return nelbo, math.exp(min(nelbo, 50.0))


def train(cfg: config_lib.Config, workdir: str, init_from: str | None = None,
          program: Program = TRAIN) -> Summary:
  """Trains (or resumes) a run in `workdir`; a fresh run may start from `init_from`'s EMA weights.
  Process 0 holds the workdir's lock throughout: a second run on it is refused."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f'workdir {workdir} is a file, not a directory')
  created = not os.path.exists(workdir)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() != 0:
    return _train(cfg, workdir, init_from, program)
  try:
    with files.locked(workdir):
      return _train(cfg, workdir, init_from, program)
  except UserError:
    if created:  # a refused fresh run leaves no empty workdir behind
      files.remove_if_empty(workdir, ignoring=('.lock',))
    raise


def _train(cfg: config_lib.Config, workdir: str, init_from: str | None,
           program: Program) -> Summary:
  is_main = jax.process_index() == 0
  mesh = sharding.make_mesh(cfg.mesh)
  # fail fast on a batch or micro-batch the devices cannot split
  sharding.rows_per_device(cfg.train.batch_size, jax.device_count(), cfg.train.grad_accum)

  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), cfg.train.keep_checkpoints)
  latest = ckpt.latest_step()
  compatible = lambda saved: checkpoint.check_compatible(saved, cfg, workdir)
  if latest is not None:
    try:  # fail fast, before the data is prepared (a damaged config is dealt with below)
      early = ckpt.saved_config(latest)
    except Exception:  # pylint: disable=broad-except
      early = None
    if early is not None:
      compatible(early)

  data = program.data(cfg)
  mask_id = data.tokenizer.mask_id
  graphdef = train_state.model_graphdef(cfg)
  train_iter = pipeline.train_iterator(data.train, cfg.train.batch_size, cfg.train.seed)
  if latest is not None:
    state = ckpt.restore_latest_intact(program.abstract(cfg, mesh), train_iter, compatible)
  else:
    state = program.init(cfg, mesh, init_from)
  checkpoint.write_json_atomic(os.path.join(workdir, 'config.json'), config_lib.to_dict(cfg))

  step_fn = train_step.compile_train_step(cfg, graphdef, mesh, state, program.step,
                                          mask_id=mask_id)
  eval_fn = train_step.compile_eval_step(cfg, graphdef, mesh, program.student(state).params,
                                         mask_id=mask_id)
  writer = metrics.MetricWriter(workdir)
  start = int(program.student(state).step)
  if is_main:
    print(f'{train_state.param_count(program.student(state).params):,} parameters | '
          f'mesh {dict(mesh.shape)} | '
          f'{len(data.train):,} train rows, {len(data.validation):,} validation rows | '
          f'{"resuming at step " + str(start) if start else "fresh start"}'
          f'{" from " + init_from if init_from and latest is None else ""} | {workdir}')
    print(memory.estimate(cfg, mesh).summary())

  tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
  val_loss = val_ppl = float('nan')
  last_time, last_step = time.perf_counter(), start
  bar = tqdm(total=cfg.train.num_steps, initial=start, disable=not is_main, dynamic_ncols=True)
  pending = None
  for step in range(start + 1, cfg.train.num_steps + 1):
    state = program.before_step(state, step)
    state, out = step_fn(state, sharding.to_global(next(train_iter), mesh))
    if pending is not None:  # one step in flight: the host prepares the next batch meanwhile,
      jax.block_until_ready(pending)  # and the bar counts finished steps, not queued ones
      bar.update(1)
    pending = out
    done = step == cfg.train.num_steps
    saving = step % cfg.train.ckpt_every == 0 or done
    evaluating = step % cfg.train.eval_every == 0 or done
    if step % cfg.train.log_every == 0 or saving or evaluating:
      out = jax.device_get(out)
      if not (math.isfinite(out['loss']) and math.isfinite(out['grad_norm'])):
        writer.write(step, {'train/loss': out['loss'], 'train/grad_norm': out['grad_norm']})
        bar.close()
        _stop_diverged(step, out, ckpt, writer)
      now = time.perf_counter()
      rate = (step - last_step) / (now - last_time)
      last_time, last_step = now, step
      values = {'train/loss': out['loss'], 'train/grad_norm': out['grad_norm'],
                'perf/steps_per_s': rate, 'perf/tokens_per_s': rate * tokens_per_step}
      values.update({k: v for k, v in out.items() if k.startswith('imdm/')})
      writer.write(step, values)
      bar.set_postfix(loss=f'{out["loss"]:.3f}', steps_s=f'{rate:.2f}',
                      tok_s=f'{rate * tokens_per_step:,.0f}')
    if evaluating:
      val_loss, val_ppl = evaluate(eval_fn, program.student(state).ema, data.validation, cfg, mesh)
      writer.write(step, {'val/loss': val_loss, 'val/ppl': val_ppl})
      if is_main:
        bound = '' if cfg.model.arch == 'gpt2' else ' <='  # the NELBO only bounds the perplexity
        tqdm.write(f'step {step}: validation loss {val_loss:.4f} nats/token, '
                   f'perplexity{bound} {val_ppl:.2f} (EMA weights)')
      last_time = time.perf_counter()  # keep evaluation out of the throughput numbers
    if saving:  # only after the check above: a checkpoint never holds a diverged state
      ckpt.save(step, state, cfg, train_iter, force=True)
  if pending is not None:
    jax.block_until_ready(pending)
    bar.update(1)
  bar.close()
  if start >= cfg.train.num_steps:  # nothing left to train: still report where the run stands
    val_loss, val_ppl = evaluate(eval_fn, program.student(state).ema, data.validation, cfg, mesh)
  ckpt.wait()
  ckpt.close()
  writer.close()
  step = int(program.student(state).step)
  if is_main:
    print(f'done: step {step}, validation perplexity {val_ppl:.2f} | checkpoints '
          f'{ckpt.directory} | metrics {writer.path} | config {os.path.join(workdir, "config.json")}')
  return Summary(step, val_loss, val_ppl, workdir)


def _stop_diverged(step: int, out: dict, ckpt: checkpoint.Checkpointer,
                   writer: metrics.MetricWriter) -> None:
  """Ends a run whose loss or gradient is no longer finite, keeping its checkpoints (every one
  was saved from a finite step): one line naming the step and the last good checkpoint."""
  ckpt.wait()
  last = ckpt.latest_step()
  ckpt.close()
  writer.close()
  kept = f'the last checkpoint (step {last}) is intact' if last is not None else 'no checkpoint'
  raise UserError(f'diverged at step {step}: loss {out["loss"]}, gradient norm '
                  f'{out["grad_norm"]}; {kept} (lower optim.lr, or raise optim.warmup_steps)')


def unigram_baseline(cfg: config_lib.Config) -> float:
  data = store.prepare(cfg)
  return store.unigram_perplexity(data.train, data.validation, cfg.model.vocab_size)

