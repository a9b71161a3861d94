"""Multi-controller training, emulated on one CPU: N processes x K fake devices on loopback.

Module fixtures run the jobs once; the tests read them. Each trains `micro` for 6 steps, through
`train.py`'s `main` (tests/multihost_worker.py) or `trainer.train`:
  one8    1 process x 8 devices (this pytest process), mesh data=8: the reference
  two     2 processes x 4 devices, mesh fsdp=8 (every matrix split across both processes)
  to_one  `two` resumed from its step-3 checkpoint here (1 x 8)
  one1    1 process x 1 device                                                       (slow)
  to_two  `one8` resumed from its step-3 checkpoint by 2 x 4 devices, mesh 2 x 4      (slow)
Each must match `one8`: the same losses and final state (to float tolerance: the collectives sum
in another order) and the same next batch. The default jobs take about 40 s on 2 idle cores, most
of it process 1 compiling (JAX's persistent cache serves process 0 only). Jobs run one at a
time: XLA's CPU collectives (gloo) fail if processes reach their first collective more than 30 s
apart, which a loaded machine can cause. ReDi coupling generation (`distill.py redi-generate`) and
sampling with evaluation (`sample.py --eval`) are checked the same way: 2 x 4 processes against
1 x 8 here (slow).
"""

import dataclasses
import glob
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import chex
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.experimental import multihost_utils

import sample
from imdm_jax import (checkpoint, config as config_lib, couplings, runtime, sharding, train_state,
                      trainer)
from imdm_jax.data import pipeline, store, tokenizers
from imdm_jax.errors import UserError

from helpers import ROOT, coupling_report, load_pairs, run_script, script_env

WORKER = os.path.join(ROOT, 'tests', 'multihost_worker.py')
STEPS, RESUME_AT = 6, 3
OVERRIDES = (f'train.num_steps={STEPS}', f'train.ckpt_every={RESUME_AT}', 'train.log_every=1',
             'train.eval_every=1000', 'train.eval_batches=1')
TIMEOUT_S = 300  # per job; a process whose peer died waits for JAX's heartbeat timeout (100 s)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@dataclasses.dataclass
class Job:
  procs: list[subprocess.Popen]
  logs: list[str]
  dumps: list[str]

  def wait(self) -> list[dict[str, np.ndarray]]:
    """Each process's dump (multihost_worker.py), once all have exited 0."""
    deadline = time.monotonic() + TIMEOUT_S
    try:
      for p in self.procs:
        p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      for p in self.procs:
        p.kill()
      pytest.fail(f'timed out after {TIMEOUT_S} s: {self.logs}')
    for p, log in zip(self.procs, self.logs):
      with open(log) as f:
        assert p.returncode == 0, f'{log}:\n{f.read()[-3000:]}'
    return [dict(np.load(d)) for d in self.dumps]


def _start(name: str, tmp: pathlib.Path, workdir: str | None, processes: int, devices: int,
           data_dir: str, *overrides: str, command: tuple[str, ...] = ()) -> Job:
  """`command`: the worker's (e.g. `distill redi-generate ...`; train.py's by default)."""
  sets = [f'data.data_dir={data_dir}', *OVERRIDES, *overrides]
  where = ['--workdir', workdir] if workdir else []
  args = [*command, '--preset', 'micro', *where, *[a for s in sets for a in ('--set', s)]]
  return _launch(name, tmp, processes, devices, args)


def _launch(name: str, tmp: pathlib.Path, processes: int, devices: int, args: list[str]) -> Job:
  """N worker processes with `args` (multihost_worker.py's), joined on a free loopback port."""
  port = _free_port()
  job = Job([], [], [])
  for i in range(processes):
    cluster = ['--coordinator', f'127.0.0.1:{port}', '--num_processes', str(processes),
               '--process_id', str(i)] if processes > 1 else []
    log, dump = str(tmp / f'{name}.{i}.log'), str(tmp / f'{name}.{i}.npz')
    with open(log, 'w') as out:
      job.procs.append(subprocess.Popen([sys.executable, WORKER, dump, *args, *cluster], cwd=ROOT,
                                        env=script_env(devices), stdout=out,
                                        stderr=subprocess.STDOUT))
    job.logs.append(log)
    job.dumps.append(dump)
  return job


def _from_step(src: str, dst: str, step: int) -> str:
  """A copy of run `src` as it was at checkpoint `step` (later checkpoints and metrics dropped)."""
  shutil.copytree(src, dst)
  ckpts = os.path.join(dst, 'checkpoints')
  for name in os.listdir(ckpts):
    if name.isdigit() and int(name) > step:
      shutil.rmtree(os.path.join(ckpts, name))
  os.remove(os.path.join(dst, 'metrics.jsonl'))
  return dst


@dataclasses.dataclass
class Runs:
  cfg: config_lib.Config
  tmp: pathlib.Path  # the jobs' logs and workdirs
  data_dir: str
  dumps: list[dict[str, np.ndarray]]  # the processes of `two`

  def workdir(self, name: str) -> str:
    return str(self.tmp / name)


@pytest.fixture(scope='module')
def runs(tmp_path_factory, data_dir) -> Runs:
  tmp = tmp_path_factory.mktemp('multihost')
  cfg = config_lib.resolve('micro', [f'data.data_dir={data_dir}', *OVERRIDES])
  store.prepare(cfg)  # here, once: the workers only read it
  r = Runs(cfg, tmp, data_dir, [])
  trainer.train(cfg, r.workdir('one8'))
  r.dumps = _start('two', tmp, r.workdir('two'), 2, 4, data_dir, 'mesh.fsdp=8').wait()
  trainer.train(cfg, _from_step(r.workdir('two'), r.workdir('to_one'), RESUME_AT))
  return r


@pytest.fixture(scope='module')
def slow_runs(runs) -> Runs:
  _start('one1', runs.tmp, runs.workdir('one1'), 1, 1, runs.data_dir).wait()
  _start('to_two', runs.tmp, _from_step(runs.workdir('one8'), runs.workdir('to_two'), RESUME_AT),
         2, 4, runs.data_dir, 'mesh.data=2', 'mesh.fsdp=4').wait()
  return runs


def _metric(workdir: str, key: str) -> dict[int, float]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  return {r['step']: r[key] for r in records if key in r}


def _final(cfg: config_lib.Config, workdir: str):
  """(state, next local batch's tokens) of the run's latest checkpoint, restored here (1 x 8)."""
  data = store.prepare(cfg)
  mesh = sharding.make_mesh(cfg.mesh)
  it = pipeline.train_iterator(data.train, cfg.train.batch_size, cfg.train.seed)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'))
  state = ckpt.restore(train_state.abstract_state(cfg, mesh), it)
  return jax.device_get(state), next(it)['tokens']


def _assert_same_run(runs: Runs, name: str, steps) -> None:
  expected, got = (_metric(runs.workdir(run), 'train/loss') for run in ('one8', name))
  assert sorted(got) == list(steps)
  np.testing.assert_allclose([got[s] for s in steps], [expected[s] for s in steps], rtol=1e-5)
  val = [_metric(runs.workdir(run), 'val/loss')[STEPS] for run in ('one8', name)]
  np.testing.assert_allclose(val[1], val[0], rtol=1e-5)  # the evaluation, split over processes
  ref_state, ref_next = _final(runs.cfg, runs.workdir('one8'))
  state, next_tokens = _final(runs.cfg, runs.workdir(name))
  assert int(state.step) == STEPS
  np.testing.assert_array_equal(state.rng, ref_state.rng)
  chex.assert_trees_all_close(state.params, ref_state.params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(state.ema, ref_state.ema, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(state.opt_state, ref_state.opt_state, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(next_tokens, ref_next)


def test_two_processes_train_like_one(runs):
  """`two`'s checkpoint, written by 2 processes, is read here by 1."""
  _assert_same_run(runs, 'two', range(1, STEPS + 1))


def test_two_process_checkpoint_resumes_in_one_process(runs):
  _assert_same_run(runs, 'to_one', range(RESUME_AT + 1, STEPS + 1))


@pytest.mark.slow
def test_one_device_trains_like_eight(slow_runs):
  _assert_same_run(slow_runs, 'one1', range(1, STEPS + 1))


@pytest.mark.slow
def test_one_process_checkpoint_resumes_in_two_processes(slow_runs):
  # its metrics (the copy has none) start after step 3: resumed there, not started afresh
  _assert_same_run(slow_runs, 'to_two', range(RESUME_AT + 1, STEPS + 1))


def test_each_process_reads_its_slice_of_the_global_batches(runs):
  first, second = runs.dumps
  for d in runs.dumps:
    assert d['topology'].tolist() == [2, 8, 4]  # one job of 8 devices, not two jobs of 4
  # One process's iterator here (1 x 8) yields the global batches.
  it = pipeline.train_iterator(store.prepare(runs.cfg).train, runs.cfg.train.batch_size,
                               runs.cfg.train.seed)
  global_batches = np.stack([next(it)['tokens'] for _ in range(STEPS)])  # [S, B, L]
  np.testing.assert_array_equal(np.concatenate([first['tokens'], second['tokens']], axis=1),
                                global_batches)
  rows = [{r.tobytes() for r in d['tokens'].reshape(-1, d['tokens'].shape[-1])} for d in runs.dumps]
  assert len(rows[0]) == len(rows[1]) == STEPS * 8 and not rows[0] & rows[1]
  assert str(first['position']) == str(second['position']) == json.dumps(it.get_state(),
                                                                         sort_keys=True)
  epoch = np.concatenate([first['epoch'], second['epoch']], axis=1)  # [4 global batches, 16]
  assert sorted(epoch.ravel().tolist()) == list(range(64))
  assert not set(first['epoch'].ravel()) & set(second['epoch'].ravel())


def test_fsdp_splits_every_matrix_across_both_processes(runs):
  for d in runs.dumps:
    assert len(d['fsdp']) >= 20  # params, EMA and Adam moments of micro's matrices
    assert (d['fsdp'][:, 0] == 4).all()  # 4 of the 8 shards live in each process...
    np.testing.assert_array_equal(d['fsdp'][:, 1], 1 / 8)  # ...each an eighth of the matrix


COUPLINGS = ('model.noise_dim=8', 'redi.num_pairs=40', 'redi.sampler_steps=4',
             'redi.full_mask_fraction=0.25')


def _pairs(out: str) -> dict[str, np.ndarray]:
  chunks = sorted(glob.glob(os.path.join(out, 'chunks', '*')))
  assert [os.path.basename(c) for c in chunks] == [f'chunk_{c:06d}.npz' for c in range(3)]
  return load_pairs(out)


@pytest.mark.slow  # ~60 s: a teacher, a 2-process job and the same generation here
def test_two_processes_generate_the_couplings_of_one(tmp_path, data_dir):
  """`distill.py redi-generate` on 2 processes x 4 devices (an IMDM teacher: seeded eps, resets)
  writes the pairs `couplings.generate` writes here on 1 x 8, bit for bit: 3 chunks of 16 (the last
  one partial), the dataset and couplings.json, all by process 0."""
  cfg = config_lib.resolve('micro', [f'data.data_dir={data_dir}', *OVERRIDES, *COUPLINGS])
  teacher = str(tmp_path / 'teacher')
  trainer.train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_steps=2)),
                teacher)
  two = str(tmp_path / 'two')
  job = _start('couple', tmp_path, None, 2, 4, data_dir, *COUPLINGS,
               command=('distill', 'redi-generate', '--teacher', teacher, '--out', two))
  assert [d['topology'].tolist() for d in job.wait()] == [[2, 8, 4]] * 2
  one = couplings.generate(cfg, teacher, str(tmp_path / 'one'))
  expected, got = _pairs(one), _pairs(two)
  assert len(got['seed']) == 40 and (got['t'] == 1.0).any() and (got['t'] < 1.0).any()
  for k in expected:
    np.testing.assert_array_equal(got[k], expected[k], err_msg=k)
  tokenizer = store.prepare(cfg).tokenizer.name
  rows = [couplings.load(path, cfg, tokenizer) for path in (one, two)]
  assert len(rows[0]) == len(rows[1]) == 40
  by_seed = lambda source: sorted(source, key=lambda r: int(r['seed']))
  for a, b in zip(by_seed(rows[0]), by_seed(rows[1])):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  with open(tmp_path / 'couple.0.log') as f0, open(tmp_path / 'couple.1.log') as f1:
    # process 0 reports the pairs it wrote, process 1 reports nothing
    assert coupling_report(f0.read())[:2] == (40, 40) and coupling_report(f1.read()) is None
  assert not glob.glob(os.path.join(two, 'chunks', '*tmp*'))


SAMPLE_ARGS = ('--steps', '4', '--num_samples', '16', '--batch_size', '8', '--seed', '3',
               '--prefix', 'In the beginning')
SAMPLE_FILES = ['metrics.json', 'metrics.md', 'metrics.png', 'samples_steps4.jsonl']


@pytest.mark.slow  # ~50 s: two 2-step checkpoints, a 2-process job and the same sampling here
def test_two_processes_sample_like_one(tmp_path, data_dir):
  """`sample.py --eval --evaluator` on 2 processes x 4 devices (an IMDM: host-drawn eps, resets)
  writes the samples it writes here on 1 x 8, bit for bit, with the same Gen PPL and validation
  NELBO; process 0 prints and writes every file, process 1 neither."""
  short = [f'data.data_dir={data_dir}', *OVERRIDES, 'train.num_steps=2']
  trainer.train(config_lib.resolve('micro', [*short, 'model.noise_dim=8']), str(tmp_path / 'imdm'))
  trainer.train(config_lib.resolve('micro', [*short, 'model.arch=gpt2']), str(tmp_path / 'ar'))
  args = ['--checkpoint', str(tmp_path / 'imdm'), '--eval', '--evaluator', str(tmp_path / 'ar'),
          *SAMPLE_ARGS]
  job = _launch('sample', tmp_path, 2, 4, ['sample', *args, '--out', str(tmp_path / 'two')])
  dumps = job.wait()
  assert [d['topology'].tolist() for d in dumps] == [[2, 8, 4]] * 2
  assert sorted(dumps[0]['written'].tolist()) == SAMPLE_FILES and not dumps[1]['written'].size
  assert sorted(os.listdir(tmp_path / 'two')) == SAMPLE_FILES  # no temporary file left behind
  sample.main([*args, '--out', str(tmp_path / 'one')])

  def read(out: str):
    with open(tmp_path / out / 'samples_steps4.jsonl') as f:
      samples = [json.loads(line) for line in f]
    with open(tmp_path / out / 'metrics.json') as f:
      return samples, json.load(f)

  (expected, one), (got, two) = read('one'), read('two')
  assert got == expected
  ids = np.array([s['token_ids'] for s in got])
  assert ids.shape == (16, 32) and len({row.tobytes() for row in ids}) == 16
  assert all(s['text'].startswith('In the beginning') for s in got)
  for a, b in zip(one['results'], two['results']):
    assert a['entropy'] == b['entropy'] and a['scored_tokens'] == b['scored_tokens'] > 0
    assert a['network_calls_per_batch'] == b['network_calls_per_batch']
    np.testing.assert_allclose(b['gen_ppl'], a['gen_ppl'], rtol=1e-5)  # sums in another order
  assert one['val_nelbo_ppl'] is not None
  np.testing.assert_allclose(two['val_nelbo_ppl'], one['val_nelbo_ppl'], rtol=1e-5)
  with open(tmp_path / 'sample.0.log') as f0, open(tmp_path / 'sample.1.log') as f1:
    first, second = f0.read(), f1.read()
  # process 0 reports the numbers it wrote to metrics.json, process 1 none of them
  reported = [f'{two["results"][0]["gen_ppl"]:.3f}', f'{two["results"][0]["entropy"]:.3f}',
              f'{two["val_nelbo_ppl"]:.2f}']
  assert all(r in first for r in reported) and not any(r in second for r in reported)


@pytest.mark.parametrize('process,fails', [(0, False), (1, False), (0, True)])
def test_process_0_loads_the_tokenizer_before_the_others(micro_cfg, monkeypatch, process, fails):
  """A tokenizer missing from a shared data_dir is trained by process 0 alone: the others wait
  for it at a barrier, which process 0 reaches even when it fails."""
  events, load = [], tokenizers.load_tokenizer

  def recording_load(*args, **kwargs):
    events.append('load')
    if fails:
      raise UserError('no corpus')
    return load(*args, **kwargs)

  monkeypatch.setattr(tokenizers, 'load_tokenizer', recording_load)
  monkeypatch.setattr(multihost_utils, 'sync_global_devices', lambda name: events.append(name))
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(jax, 'process_index', lambda: process)
  if fails:
    with pytest.raises(UserError, match='no corpus'):
      store.load_tokenizer(micro_cfg)
  else:
    assert store.load_tokenizer(micro_cfg).vocab_size == micro_cfg.model.vocab_size
  barrier = 'imdm_jax.data.tokenizer'
  assert events == (['load', barrier] if process == 0 else [barrier, 'load'])


def test_checkpoint_with_per_process_data_position_is_refused(micro_cfg, tmp_path):
  """Older checkpoints hold grain's per-process iterator files, which only as many processes as
  wrote them could read: refused in one line rather than guessed."""
  mesh = sharding.make_mesh(micro_cfg.mesh)
  state = train_state.init_state(micro_cfg, mesh)
  it = pipeline.train_iterator([{'tokens': np.arange(4, dtype=np.int32)}] * 16, 16, seed=0)
  older = ocp.CheckpointManager(str(tmp_path))
  older.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                        data=grain.checkpoint.CheckpointSave(it)))
  older.wait_until_finished()
  with pytest.raises(UserError, match='checkpoint 2 in .* keeps its data position per process'):
    checkpoint.Checkpointer(str(tmp_path)).restore(
        train_state.abstract_state(micro_cfg, mesh), it)


def test_launcher_environments_that_mean_multiprocess():
  yes = [{'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234'}, {'SLURM_STEP_NUM_TASKS': '4'},
         {'OMPI_COMM_WORLD_SIZE': '2'}]
  no = [{}, {'SLURM_NTASKS': '64', 'SLURM_STEP_NUM_TASKS': '1'},  # an sbatch script runs once
        {'OMPI_COMM_WORLD_SIZE': '1'}, {'SLURM_STEP_NUM_TASKS': ''}]
  assert all(runtime.launched_as_multiprocess(env) for env in yes)
  assert not any(runtime.launched_as_multiprocess(env) for env in no)


@pytest.mark.parametrize('args,message', [
    (['--multihost'], 'coordinator_address should be defined'),
    (['--coordinator', 'localhost', '--num_processes', '2', '--process_id', '0'],
     "--coordinator 'localhost': expected HOST:PORT"),
    (['--coordinator', '127.0.0.1:1', '--num_processes', '2', '--process_id', '2'],
     'process_id < num_processes'),
])
def test_bad_cluster_flags_exit_2_with_one_line(tmp_path, args, message):
  result = run_script('train.py', '--preset', 'micro', '--workdir', str(tmp_path / 'w'), *args,
                      devices=1, timeout=120)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], result.stderr
  assert not os.path.exists(tmp_path / 'w')
