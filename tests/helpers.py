"""Helpers shared by the tests (importable as `helpers`: pytest's `pythonpath` holds tests/).

Tiny configs, weight perturbations, exact denoisers, the entry scripts run as subprocesses, and
ReDi couplings read back from disk. Test files import from here, never from one another.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from imdm_jax.config import Config, ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A DiT of a few thousand parameters, for tests that build configs by hand.
MICRO = ModelConfig(vocab_size=37, hidden_size=32, n_blocks=2, n_heads=4, cond_dim=16, dropout=0.0)


# ----------------------------------------------------------------------------------------------
# Configs

def replaced(cfg: Config, **sections: dict) -> Config:
  """`cfg` with keys of its sections replaced: `replaced(cfg, train=dict(num_steps=2))`."""
  return dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **values)
                                     for name, values in sections.items()})


def as_imdm(cfg: Config, noise_dim: int = 8, **diffusion) -> Config:
  """`cfg` as an IMDM: `model.noise_dim` (0 with `num_mask_states`: the finite-mask ablation)."""
  return replaced(cfg, model=dict(noise_dim=noise_dim), diffusion=diffusion)


# ----------------------------------------------------------------------------------------------
# Weights

def _normals(tree, seed: int, scale: float):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return leaves, treedef, [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]


def perturbed(tree, seed: int, scale: float):
  """Every leaf plus `scale` N(0, 1) noise (one key per leaf, split from `PRNGKey(seed)`): the
  zero-initialised layers (output, IMDM noise path) come alive, so every input matters."""
  leaves, treedef, noise = _normals(tree, seed, scale)
  return jax.tree.unflatten(treedef, [x + n for x, n in zip(leaves, noise)])


def resampled(tree, seed: int, scale: float = 0.3):
  """Every leaf replaced by `scale` N(0, 1) draws (keys as `perturbed`): a "trained" network whose
  weights are all non-trivial."""
  _, treedef, noise = _normals(tree, seed, scale)
  return jax.tree.unflatten(treedef, noise)


# ----------------------------------------------------------------------------------------------
# Exact denoisers

def oracle_denoiser(sequences: np.ndarray, weights: np.ndarray, mask_id: int):
  """`denoise(params, z, eps, t)` whose x_theta is exact for data drawn from `sequences` [N, L]
  (tokens 0 .. mask_id - 1) with probabilities `weights` [N]: P(x_l = v | the unmasked tokens of
  z). The mask is the last id; its logit is a 0 that SUBS drops. eps and t are ignored."""

  def oracle(params, z, eps, t):
    del params, eps, t
    configs = jnp.asarray(sequences)
    compatible = jnp.all((z[:, None, :] == mask_id) | (z[:, None, :] == configs[None]), axis=-1)
    w = jnp.asarray(weights, jnp.float32)[None] * compatible  # [B, N]
    w = w / w.sum(-1, keepdims=True)
    x_theta = jnp.einsum('bc,clv->blv', w, jax.nn.one_hot(configs, mask_id))
    logits = jnp.log(jnp.maximum(x_theta, 1e-30))
    return jnp.concatenate([logits, jnp.zeros_like(logits[..., :1])], -1)

  return oracle


# ----------------------------------------------------------------------------------------------
# Entry scripts

CLUSTER_ENV = ('SLURM_', 'OMPI_', 'PMI_', 'KUBERNETES_', 'TPU_', 'JAX_COORDINATOR')


def script_env(devices: int) -> dict[str, str]:
  """This machine as `devices` CPU devices, with no launcher variables that would make JAX join a
  cluster, and the repository root importable (the entry scripts and tests/multihost_worker.py)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(CLUSTER_ENV)}
  return dict(env, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
              JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)


def run_script(script: str, *args: str, devices: int = 2,
               timeout: int = 600) -> subprocess.CompletedProcess:
  """`python SCRIPT ARGS...` from the repository root, on `devices` CPU devices."""
  return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=script_env(devices),
                        capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
  """Bad input: exit status 2, and the last line of stderr is `error: ...` holding `message`."""
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith('error: ') and message in lines[-1], result.stderr[-1000:]


# ----------------------------------------------------------------------------------------------
# ReDi couplings

def load_pairs(out: str) -> dict[str, np.ndarray]:
  """Every pair under `out/chunks`, in chunk order: z_T, x_hat, t, seed, attention_mask."""
  rows = []
  for f in sorted(glob.glob(os.path.join(out, 'chunks', '*.npz'))):
    chunk = np.load(f)
    rows.append({k: chunk[k] for k in chunk.files})
  return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def coupling_report(stdout: str) -> tuple[int, int, float] | None:
  """The numbers of `couplings.generate`'s closing `done:` line (distill.py documents that
  every command ends with one): (pairs on disk, pairs generated by this call, percentage with
  t = 1); None when `stdout` has no such line."""
  done = [line for line in stdout.splitlines() if line.startswith('done:')]
  if not done:
    return None
  total, new, share = re.findall(r'\d[\d,]*(?:\.\d+)?', done[-1])[:3]
  return int(total.replace(',', '')), int(new.replace(',', '')), float(share)
