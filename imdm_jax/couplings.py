"""ReDi couplings on disk: generation from a teacher run, and the dataset the student reads
(docs/method.md §4).

For N training rows `generate` draws perturbed starts (`redi.coupling_inputs`), derives each
pair's eps from an integer seed (`noise.seeded_eps`) and runs the teacher's sampler from t to 0
(`redi.sampler_steps`, the grid scaled by t; by reveal groups, at most L network calls, when that
is exact: `sampling.coupling_sampler`). Pairs `(z_T, x_hat, t, seed)` are written chunk by chunk
(a run killed half-way resumes at the next missing chunk), then gathered into a tfds ArrayRecord
dataset next to them. Under several processes each chunk is one global batch over all their
devices, and process 0 writes: the pairs are those of a one-process run with the same seeds.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import time

import jax
import numpy as np
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils
from tqdm import tqdm

from imdm_jax import files, init_from, runtime, sampling, sharding, train_state
from imdm_jax.config import Config, MeshConfig
from imdm_jax.data import pipeline, store
from imdm_jax.errors import UserError

META = 'couplings.json'
REQUEST = 'request.json'  # what the chunks in a directory were made by: a rerun must match it


def _chunk_path(chunks: str, c: int) -> str:
  return os.path.join(chunks, f'chunk_{c:06d}.npz')


def _request(cfg: Config, teacher: str, seed_offset: int) -> dict:
  """Everything the pairs of a directory depend on: a resumed run must ask for the same."""
  return {'teacher': os.path.abspath(teacher), 'seed_offset': seed_offset,
          'seed': cfg.train.seed, 'chunk': cfg.train.batch_size, 'num_pairs': cfg.redi.num_pairs,
          'redi': {k: v for k, v in dataclasses.asdict(cfg.redi).items()
                   if k not in ('num_pairs', 'ignore_seed', 'rounds')},  # training-side keys
          'data': dataclasses.asdict(cfg.data)}


def _claim(out: str, request: dict, force: bool) -> None:
  """Makes `out` the directory of `request`'s pairs: new, or already holding (some of) them. Pairs
  of another request are refused (or, with `force`, removed) rather than reused."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise UserError(f'--out {out} is a file, not a directory')
  path = os.path.join(out, REQUEST)
  earlier = None
  if os.path.exists(path):
    try:
      with open(path) as f:
        earlier = json.load(f)
    except (OSError, ValueError):
      earlier = {}
  elif os.path.isdir(os.path.join(out, 'chunks')):
    earlier = {}  # chunks of an unknown request
  if earlier is not None and earlier != request:
    if not force:
      diff = next((k for k in request if earlier.get(k) != request[k]), 'its request')
      raise UserError(f'--out {out} holds couplings of another request ({diff}: '
                      f'{earlier.get(diff, "unknown")!r}, now {request.get(diff)!r}); use another '
                      '--out, or --force to replace them')
    for name in ('chunks', 'couplings', META, REQUEST):
      target = os.path.join(out, name)
      if os.path.isdir(target):
        shutil.rmtree(target)
      elif os.path.exists(target):
        os.remove(target)
  os.makedirs(out, exist_ok=True)
  files.write_atomic(path, json.dumps(request, indent=2, sort_keys=True))


def generate(cfg: Config, teacher: str, out: str, seed_offset: int = 0,
             force: bool = False) -> str:
  """Writes `cfg.redi.num_pairs` couplings of `teacher` into `out`; returns the dataset dir.

  Chunk c holds pairs [cB, (c + 1)B) (B = train.batch_size), generated as one global batch over
  all devices of all processes, so the pairs do not depend on the number of processes. Only
  process 0 writes (chunks, dataset, couplings.json); the others return once it has."""
  start = time.perf_counter()
  is_main = jax.process_index() == 0
  n, batch = cfg.redi.num_pairs, cfg.train.batch_size
  pipeline.local_batch_size(batch)  # refuses a batch the devices cannot split, before any work
  mesh = sharding.make_mesh(MeshConfig())
  data = store.prepare(cfg)
  mask_id = data.tokenizer.mask_id
  params, teacher_cfg, what, _ = init_from.load_weights(teacher, mesh)
  if is_main:
    print(f'teacher: {what}')
  for section, key in (('model', 'vocab_size'), ('data', 'seq_len'), ('data', 'tokenizer')):
    theirs, ours = getattr(getattr(teacher_cfg, section), key), getattr(getattr(cfg, section), key)
    if theirs != ours:
      raise UserError(f'--teacher {teacher} has {section}.{key}={theirs!r}, the student {ours!r}')
  # The teacher samples as itself (an MDLM teacher may couple for an IMDM student); the seeds are
  # stored either way, and the student derives its own eps from them.
  tcfg = dataclasses.replace(teacher_cfg, redi=cfg.redi)
  run = sampling.compile_coupler(tcfg, train_state.model_graphdef(tcfg), mesh, mask_id)
  chunks = os.path.join(out, 'chunks')
  if is_main:
    _claim(out, _request(cfg, teacher, seed_offset), force)
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
      arrays = dict(z_T=z[keep], x_hat=x_hat[keep], t=t[keep].astype(np.float32),
                    seed=seeds[keep],
                    attention_mask=np.stack([r['attention_mask'] for r in rows])[keep])
      files.write_atomic(_chunk_path(chunks, c), lambda tmp: np.savez(tmp, **arrays))
  runtime.barrier('redi: chunks written')
  if is_main:
    meta = {'seq_len': cfg.data.seq_len, 'vocab_size': cfg.model.vocab_size,
            'tokenizer': data.tokenizer.name, 'num_pairs': n, 'teacher': os.path.abspath(teacher)}
    Couplings(chunks=chunks, seq_len=cfg.data.seq_len, data_dir=out).download_and_prepare()
    files.write_atomic(os.path.join(out, META), json.dumps(meta, indent=2))
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
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'--couplings {path}: {META} is unreadable ({type(e).__name__})') from None
  for key, ours in (('seq_len', cfg.data.seq_len), ('vocab_size', cfg.model.vocab_size),
                    ('tokenizer', tokenizer_name)):
    if not isinstance(meta, dict) or key not in meta:
      raise UserError(f'--couplings {path}: {META} has no {key!r}')
    if meta[key] != ours:
      raise UserError(f'--couplings {path}: {key}={meta[key]!r}, the student has {ours!r}')
  builder = tfds.builder_from_directory(glob.glob(os.path.join(path, 'couplings', '*'))[0])
  return builder.as_data_source()['train']
