"""Generating from a checkpoint: the work behind `sample.py`.

Restores a run's EMA weights, samples in batches over the device mesh for each requested step
count, decodes, writes `samples_steps{S}.jsonl` (text, token ids, steps, seed) and, with
evaluation, `metrics.json` / `metrics.md` (Gen PPL and entropy per step count) and a plot. Every
file is written to a temporary name and renamed, so an interrupted run leaves no partial output.

Under several processes every process runs all of it on the same inputs (each batch is one
global batch over all devices, its outputs gathered to every process), so the samples and scores
are those of one process with the same devices; process 0 alone prints and writes.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
from tqdm import tqdm

from imdm_jax import (evaluate, files, init_from, noise, sampler, sampling, sharding, train_state,
                      train_step, trainer)
from imdm_jax.config import Config, MeshConfig
from imdm_jax.data import store
from imdm_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Request:
  checkpoint: str
  steps: tuple[int, ...]
  num_samples: int
  seed: int = 0
  prefix: str = ''
  batch_size: int = 0  # 0: all samples in one batch, at most 64
  out: str = ''  # default: <run>/samples
  evaluator: str = ''  # a causal-LM checkpoint for Gen PPL
  nelbo: bool = False  # also the validation NELBO perplexity of the checkpoint
  protocol: str = 'official'  # how Gen PPL reads the samples (evaluate.PROTOCOLS, docs/sampling.md)
  scfg: sampler.SamplerConfig = sampler.SamplerConfig()


def prefix_ids(cfg: Config, tok, prefix: str) -> list[int]:
  """[BOS] + the prefix's tokens, checked to fit and to be encodable."""
  if not prefix:
    return []
  ids = [tok.bos_id] + tok.encode([prefix])[0]
  if tok.unk_id is not None and tok.unk_id in ids:
    raise UserError(f'--prefix holds characters the {tok.name} tokenizer cannot encode')
  if len(ids) >= cfg.data.seq_len:
    raise UserError(f'--prefix is {len(ids)} tokens with BOS; the model length is '
                    f'{cfg.data.seq_len}')
  return ids


def _check(req: Request, n_dev: int) -> int:
  evaluate.check_protocol(req.protocol)
  if not req.steps or min(req.steps) < 1:
    raise UserError(f'--steps must be >= 1, got {",".join(map(str, req.steps))}')
  if req.batch_size < 0:
    raise UserError(f'--batch_size must be >= 0 (0: all samples, at most 64), got {req.batch_size}')
  batch = req.batch_size or min(req.num_samples, 64)
  if req.num_samples < 1 or req.num_samples % batch:
    raise UserError(f'--num_samples {req.num_samples} cannot be split into batches of {batch}')
  sharding.rows_per_device(batch, n_dev, what='the sampling batch (--batch_size, or --num_samples '
                           'up to 64)')
  return batch


def run(req: Request) -> dict:
  is_main = jax.process_index() == 0
  say = print if is_main else lambda *_: None
  mesh = sharding.make_mesh(MeshConfig())
  batch = _check(req, mesh.devices.size)
  params, cfg, what, _ = init_from.load_weights(req.checkpoint, mesh)
  if cfg.model.arch != 'dit':
    raise UserError(f'{req.checkpoint}: a diffusion checkpoint is needed, not {cfg.model.arch!r}')
  tok = store.load_tokenizer(cfg)
  given = prefix_ids(cfg, tok, req.prefix)
  evaluator = evaluate.Evaluator.load(req.evaluator, mesh) if req.evaluator else None
  say(f'sampling from {what}')
  graphdef = train_state.model_graphdef(cfg)
  out = req.out or os.path.join(os.path.dirname(init_from.checkpoint_dir(req.checkpoint)),
                                'samples')
  if is_main:
    os.makedirs(out, exist_ok=True)
  L = cfg.data.seq_len

  results = []
  for steps in req.steps:
    scfg = dataclasses.replace(req.scfg, steps=steps)
    run_sampler = sampling.compile_sampler(cfg, graphdef, mesh, scfg, tok.mask_id)
    key = jax.random.PRNGKey(req.seed)
    ids, nfe = [], 0
    for b in tqdm(range(req.num_samples // batch), desc=f'{steps} steps', leave=False,
                  disable=not is_main):
      k_sample, k_eps = jax.random.split(jax.random.fold_in(key, b))
      z = np.full((batch, L), tok.mask_id, np.int32)
      z[:, :len(given)] = given
      eps = noise.draw_eps(k_eps, z.shape, cfg) if noise.is_imdm(cfg) else None
      x, stats = jax.device_get(run_sampler(params, k_sample, z, eps))
      ids.append(np.asarray(x))
      nfe += int(stats['nfe'])
    ids = np.concatenate(ids)
    docs = [evaluate.split_documents(row, tok) for row in ids]
    lines = [json.dumps({'text': '\n'.join(d), 'token_ids': row.tolist(), 'steps': steps,
                         'seed': req.seed, 'index': i}) for i, (d, row) in enumerate(zip(docs, ids))]
    path = os.path.join(out, f'samples_steps{steps}.jsonl')
    if is_main:
      files.write_atomic(path, '\n'.join(lines) + '\n')
    entropies = evaluate.sample_entropies(ids)
    row = {'steps': steps, 'num_samples': len(ids), 'entropy': float(np.mean(entropies)),
           'entropy_ci': evaluate.bootstrap_interval(np.mean, (entropies,)),
           'network_calls_per_batch': nfe / (req.num_samples // batch), 'samples': path}
    if evaluator is not None:  # on every process: the scorer is one program over all devices
      # official: each text cut at the model length in evaluator tokens, padded per sampling batch
      nll, counted = evaluator.score_samples(evaluate.sample_texts(ids, tok, req.protocol),
                                             protocol=req.protocol, model_length=L, group=batch)
      row['gen_ppl'] = evaluate.gen_ppl(nll, counted)
      row['gen_ppl_ci'] = evaluate.bootstrap_interval(evaluate.gen_ppl, (nll, counted))
      row['scored_tokens'] = int(counted.sum())
    results.append(row)
    say(f'{steps} steps: ' + ', '.join(_show(k, v) for k, v in row.items() if k != 'samples'))
    for d in docs[:2]:
      say('  > ' + ' / '.join(d)[:300])
  summary = {'checkpoint': os.path.abspath(req.checkpoint), 'seed': req.seed, 'prefix': req.prefix,
             'evaluator': req.evaluator, 'gen_ppl_protocol': req.protocol,
             'sampler': dataclasses.asdict(req.scfg), 'results': results}
  if req.nelbo:
    summary['val_nelbo_ppl'] = _validation_nelbo(cfg, graphdef, mesh, params, say)
  if is_main:
    files.write_atomic(os.path.join(out, 'metrics.json'), json.dumps(summary, indent=2))
    files.write_atomic(os.path.join(out, 'metrics.md'), _table(results, req.protocol))
    _plot(results, os.path.join(out, 'metrics.png'))
  return summary


def _validation_nelbo(cfg: Config, graphdef, mesh, params, say=print) -> float | None:
  """NELBO perplexity bound on the run's validation split (None if its data is not here)."""
  try:
    data = store.prepare(cfg)
  except UserError as e:
    say(f'validation NELBO skipped: {e}')
    return None
  eval_fn = train_step.compile_eval_step(cfg, graphdef, mesh, params,
                                         mask_id=data.tokenizer.mask_id)
  _, ppl = trainer.evaluate(eval_fn, params, data.validation, cfg, mesh)
  say(f'validation NELBO perplexity <= {ppl:.2f}')
  return ppl


def _show(key: str, value) -> str:
  if isinstance(value, float):
    return f'{key} {value:.3f}'
  if isinstance(value, tuple):
    return f'{key} [{value[0]:.3f}, {value[1]:.3f}]'
  return f'{key} {value}'


def _table(results: list[dict], protocol: str) -> str:
  lines = ['Gen PPL and entropy with 95 % bootstrap intervals over samples; Gen PPL under the '
           f'`{protocol}` protocol (docs/sampling.md).', '',
           '| steps | Gen PPL | entropy | network calls |', '|---|---|---|---|']
  for r in results:
    ppl = (f'{r["gen_ppl"]:.2f} [{r["gen_ppl_ci"][0]:.2f}, {r["gen_ppl_ci"][1]:.2f}]'
           if 'gen_ppl' in r else '-')
    ent = f'{r["entropy"]:.3f} [{r["entropy_ci"][0]:.3f}, {r["entropy_ci"][1]:.3f}]'
    lines.append(f'| {r["steps"]} | {ppl} | {ent} | {r["network_calls_per_batch"]:.1f} |')
  return '\n'.join(lines) + '\n'


def _plot(results: list[dict], path: str) -> None:
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  steps = [r['steps'] for r in results]
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
  if all('gen_ppl' in r for r in results):
    axes[0].plot(steps, [r['gen_ppl'] for r in results], 'o-')
  axes[0].set(xscale='log', yscale='log', xlabel='sampling steps', ylabel='Gen PPL')
  axes[1].plot(steps, [r['entropy'] for r in results], 'o-')
  axes[1].set(xscale='log', xlabel='sampling steps', ylabel='unigram entropy (nats)')
  fig.tight_layout()
  files.write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100))
  plt.close(fig)
