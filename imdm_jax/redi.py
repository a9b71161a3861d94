"""ReDi: rectified discrete flow (method.md §4), for MDLM and IMDM students.

Coupling generation: for N training rows x, draw t (U(0, 1), or 1 for a `full_mask_fraction` of
the pairs), mask each token w.p. t, derive eps from an integer seed per pair (`noise.seeded_eps`),
and run the current model's sampler from t to 0 (`distill.teacher_steps`, the grid scaled by t;
by reveal groups, at most L network calls, when that is exact: `reveal_groups.exact_for`).
Pairs `(z_T, x_hat, t, seed)` are written chunk by chunk (a run killed half-way resumes at the
next missing chunk), then gathered into a tfds ArrayRecord dataset next to them. Under several
processes each chunk is one global batch over all their devices, and process 0 writes: the pairs
are those of a one-process run with the same seeds.

Rectification: the NELBO term at the stored t, input z_T with eps regenerated from the seed (or
fresh, with `ignore_seed`), target x_hat at the positions masked in z_T.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from flax import nnx
from jax.experimental import multihost_utils
from jaxtyping import Array, Float, Int, PRNGKeyArray
from tqdm import tqdm

from imdm_jax import (init_from, loss, noise, reveal_groups, runtime, sampler, schedule, sharding,
                      train_state)
from imdm_jax.config import Config, MeshConfig
from imdm_jax.data import pipeline, store
from imdm_jax.errors import UserError
from imdm_jax.train_step import Batch, accumulate_gradients, apply_gradients

META = 'couplings.json'


def coupling_inputs(key: PRNGKeyArray, x: Int[Array, 'B L'], mask_id: int,
                    full_mask_fraction: float) -> tuple[Int[Array, 'B L'], Float[Array, 'B']]:
  """(z_T, t): perturbed starting points, each token masked with probability t."""
  k_t, k_full, k_mask = jax.random.split(key, 3)
  t = jax.random.uniform(k_t, x.shape[:1], jnp.float32, minval=1e-3)
  t = jnp.where(jax.random.uniform(k_full, t.shape) < full_mask_fraction, 1.0, t)
  z = jnp.where(jax.random.uniform(k_mask, x.shape, jnp.float32) < t[:, None], mask_id, x)
  return z, t


def compile_coupler(cfg: Config, graphdef, mesh, mask_id: int):
  """`run(params, key, x, seeds) -> (z_T, x_hat, t)`, numpy: the teacher run compiled over the
  mesh. Under several processes every process calls it with the same global `x` [B, L] and
  `seeds` [B]; each feeds its own devices' rows, and each gets all the outputs back."""
  d = cfg.distill
  scfg = sampler.SamplerConfig(steps=d.teacher_steps, temperature=d.teacher_temperature,
                               final=d.teacher_final, fix_eps=d.teacher_fix_eps)
  sampler.validate(scfg, cfg)
  # the same law in at most L network calls per run, when it is exact
  sample = (reveal_groups.sample if reveal_groups.exact_for(cfg, scfg, noise.is_imdm(cfg))
            else sampler.sample)

  def program(params, key, x, seeds):
    k_in, k_run = jax.random.split(key)
    z, t = coupling_inputs(k_in, x, mask_id, d.full_mask_fraction)
    eps = noise.seeded_eps(seeds, x.shape[1], cfg) if noise.is_imdm(cfg) else None
    x_hat, _ = sample(sampler.model_denoiser(params, graphdef, cfg), k_run, z, eps,
                      mask_id=mask_id, cfg=cfg, scfg=scfg, t0=t)
    return z, x_hat, t

  # the outputs are gathered onto every device, so each process can read them locally
  jitted = jax.jit(program, out_shardings=sharding.replicated(mesh))

  def run(params, key, x, seeds):
    with jax.enable_x64(scfg.float64):
      rows, put = sharding.batch_sharding(mesh), sharding.host_to_global
      out = jitted(params, put(key, sharding.replicated(mesh)), put(x, rows), put(seeds, rows))
      return jax.device_get(out)

  return run


def _chunk_path(chunks: str, c: int) -> str:
  return os.path.join(chunks, f'chunk_{c:06d}.npz')


def generate(cfg: Config, teacher: str, out: str, seed_offset: int = 0) -> str:
  """Writes `cfg.distill.num_pairs` couplings of `teacher` into `out`; returns the dataset dir.

  Chunk c holds pairs [cB, (c + 1)B) (B = train.batch_size), generated as one global batch over
  all devices of all processes, so the pairs do not depend on the number of processes. Only
  process 0 writes (chunks, dataset, couplings.json); the others return once it has."""
  start = time.perf_counter()
  is_main = jax.process_index() == 0
  n, batch = cfg.distill.num_pairs, cfg.train.batch_size
  pipeline.local_batch_size(batch)  # refuses a batch the devices cannot split, before any work
  mesh = sharding.make_mesh(MeshConfig())
  data = store.prepare(cfg)
  mask_id = data.tokenizer.mask_id
  params, teacher_cfg = init_from.load_ema(teacher, mask_id, mesh)
  for section, key in (('model', 'vocab_size'), ('data', 'seq_len'), ('data', 'tokenizer')):
    theirs, ours = getattr(getattr(teacher_cfg, section), key), getattr(getattr(cfg, section), key)
    if theirs != ours:
      raise UserError(f'--teacher {teacher} has {section}.{key}={theirs!r}, the student {ours!r}')
  # The teacher samples as itself (an MDLM teacher may couple for an IMDM student); the seeds are
  # stored either way, and the student derives its own eps from them.
  tcfg = dataclasses.replace(teacher_cfg, distill=cfg.distill)
  run = compile_coupler(tcfg, train_state.model_graphdef(tcfg, mask_id), mesh, mask_id)
  chunks = os.path.join(out, 'chunks')
  if is_main:
    os.makedirs(chunks, exist_ok=True)
  # Chunks written by an interrupted earlier run are skipped; process 0's view decides, since
  # every chunk is one program all processes run together.
  missing = np.array([not os.path.exists(_chunk_path(chunks, c)) for c in range(-(-n // batch))])
  if jax.process_count() > 1:
    missing = np.asarray(multihost_utils.broadcast_one_to_all(missing))
  order = np.random.default_rng(cfg.train.seed + seed_offset).permutation(len(data.train))
  new = 0  # pairs generated by this call
  for c in tqdm(np.flatnonzero(missing).tolist(), desc='couplings', disable=not is_main):
    index = np.arange(c * batch, (c + 1) * batch)
    rows = [data.train[int(order[i % len(order)])] for i in index]
    x = np.stack([r['tokens'] for r in rows])
    seeds = (seed_offset + index).astype(np.int32)
    z, x_hat, t = run(params, jax.random.PRNGKey(seed_offset * 1_000_003 + c), x, seeds)
    keep = index < n
    new += int(keep.sum())
    if is_main:
      path = _chunk_path(chunks, c)
      tmp = path + f'.tmp{os.getpid()}.npz'
      np.savez(tmp, z_T=z[keep], x_hat=x_hat[keep], t=t[keep].astype(np.float32),
               seed=seeds[keep], attention_mask=np.stack([r['attention_mask'] for r in rows])[keep])
      os.replace(tmp, path)
  runtime.barrier('redi: chunks written')
  if is_main:
    meta = {'seq_len': cfg.data.seq_len, 'vocab_size': cfg.model.vocab_size,
            'tokenizer': data.tokenizer.name, 'num_pairs': n, 'teacher': os.path.abspath(teacher)}
    Couplings(chunks=chunks, seq_len=cfg.data.seq_len, data_dir=out).download_and_prepare()
    with open(os.path.join(out, META), 'w') as f:
      json.dump(meta, f, indent=2)
    t = np.concatenate([np.load(p)['t'] for p in sorted(glob.glob(os.path.join(chunks, '*.npz')))])
    print(f'done: {len(t):,} pairs ({new:,} generated now, {np.mean(t == 1.0):.1%} with t = 1) in '
          f'{time.perf_counter() - start:.1f} s | couplings {os.path.abspath(out)}')
  runtime.barrier('redi: dataset written')
  return out


class Couplings(tfds.core.GeneratorBasedBuilder):
  """ReDi pairs as ArrayRecord: z_T, x_hat, attention_mask [L] int32, t float32, seed int32."""

  VERSION = tfds.core.Version('1.0.0')

  def __init__(self, *, chunks: str = '', seq_len: int = 0, **kwargs):
    self._chunks, self._seq_len = chunks, seq_len
    super().__init__(file_format='array_record', **kwargs)

  def _info(self):
    row = tfds.features.Tensor(shape=(self._seq_len,), dtype=np.int32)
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'z_T': row, 'x_hat': row, 'attention_mask': row,
        't': tfds.features.Scalar(dtype=np.float32), 'seed': tfds.features.Scalar(dtype=np.int32)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for path in sorted(glob.glob(os.path.join(self._chunks, 'chunk_*.npz'))):
      chunk = np.load(path)
      for i, seed in enumerate(chunk['seed']):
        yield int(seed), {k: chunk[k][i] for k in chunk.files}


def load(path: str, cfg: Config, tokenizer_name: str):
  """The coupling rows at `path`, checked against the student's vocabulary and length."""
  meta_path = os.path.join(path, META)
  if not os.path.exists(meta_path):
    raise UserError(f'--couplings {path}: no {META} (generate with `distill.py redi-generate`)')
  with open(meta_path) as f:
    meta = json.load(f)
  for key, ours in (('seq_len', cfg.data.seq_len), ('vocab_size', cfg.model.vocab_size),
                    ('tokenizer', tokenizer_name)):
    if meta[key] != ours:
      raise UserError(f'--couplings {path}: {key}={meta[key]!r}, the student has {ours!r}')
  builder = tfds.builder_from_directory(glob.glob(os.path.join(path, 'couplings', '*'))[0])
  return builder.as_data_source()['train']


def redi_step(state: train_state.TrainState, batch: Batch, *, graphdef: nnx.GraphDef,
              cfg: Config) -> tuple[train_state.TrainState, dict[str, Array]]:
  k_eps, k_drop = jax.random.split(jax.random.fold_in(state.rng, state.step))
  z = batch['z_T']
  if not noise.is_imdm(cfg):
    eps = None
  elif cfg.distill.ignore_seed:
    eps = noise.draw_eps(k_eps, z.shape, cfg)
  else:
    eps = noise.seeded_eps(batch['seed'], z.shape[1], cfg)
  rows = {'z': z, 'x_hat': batch['x_hat'], 't': batch['t'], 'valid': batch['attention_mask'],
          'eps': eps}

  def sums(params, r, key):
    model = nnx.merge(graphdef, params)
    logits = model(r['z'], schedule.sigma(r['t'], cfg.diffusion.eps), r['eps'], dropout_key=key)
    return loss.nelbo(logits, r['x_hat'], r['z'], r['t'], r['valid'], model.mask_id)

  value, grads = accumulate_gradients(sums, state.params, rows, k_drop, cfg.train.grad_accum)
  return apply_gradients(state, grads, value, cfg)
