"""The network as a denoiser, and the compiled programs that sample from it.

`sampler.py` and `reveal_groups.py` hold the reverse process as math on any
`denoise(params, z_t, eps, t)`. Here: `model_denoiser` adapts the DiT to that form (the only
place the network is called by the method), `compile_sampler` compiles a sampler over the device
mesh for `sample.py`, and `compile_coupler` compiles ReDi's coupling run (docs/method.md §4).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jaxtyping import PRNGKeyArray

from imdm_jax import noise, redi, reveal_groups, sampler, schedule, sharding
from imdm_jax.config import Config
from imdm_jax.loss import Denoise


def model_denoiser(graphdef: nnx.GraphDef, cfg: Config, mask_id: int,
                   dropout_key: PRNGKeyArray | None = None) -> Denoise:
  """`denoise(params, z_t, eps, t) -> logits [B, L, V]`: the DiT of `graphdef` at its time input
  `sigma(t)` (read only by time-conditioned networks), with dropout when given a key."""

  def denoise(params, z_t, eps, t):
    sigma = jnp.broadcast_to(schedule.sigma(t, cfg.diffusion.alpha_min), (z_t.shape[0],))
    return nnx.merge(graphdef, params)(z_t, sigma.astype(jnp.float32), eps, mask_id=mask_id,
                                       dropout_key=dropout_key)

  return denoise


@functools.cache  # one program per (network, sampler, mesh): runs of one architecture share it
def compile_sampler(cfg: Config, graphdef, mesh: Mesh, scfg: sampler.SamplerConfig, mask_id: int):
  """`run(params, key, z, eps) -> (samples, stats)`: the DiT sampler compiled over the mesh, the
  batch split over all devices, traced in float64 mode when `scfg.float64`. Under several
  processes every process calls it with the same `key`, `z` [B, L] and `eps` (the whole batch);
  each feeds its own devices' rows and gets every sample back."""
  scfg.validate(cfg)
  denoise = model_denoiser(graphdef, cfg, mask_id)

  def program(params, key, z, eps):
    return sampler.sample(denoise, params, key, z, eps, mask_id=mask_id, cfg=cfg, scfg=scfg)

  batch, everywhere = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  # the outputs are gathered onto every device, so each process can read them locally
  jitted = jax.jit(program, out_shardings=everywhere)

  def run(params, key, z, eps=None):
    with jax.enable_x64(scfg.float64):
      put = sharding.host_to_global
      return jitted(params, put(key, everywhere), put(z, batch),
                    None if eps is None else put(eps, batch))

  return run


def coupling_sampler(cfg: Config) -> tuple[sampler.SamplerConfig, object]:
  """The sampler settings of a coupling run (`cfg.redi`) and the sampling function: by reveal
  groups (at most L network calls a run) where that has `sampler.sample`'s law exactly."""
  r = cfg.redi
  scfg = sampler.SamplerConfig(steps=r.sampler_steps, temperature=r.temperature, final=r.final,
                               fix_eps=r.fix_eps)
  scfg.validate(cfg)
  exact = reveal_groups.exact_for(cfg, scfg, noise.is_imdm(cfg))
  return scfg, reveal_groups.sample if exact else sampler.sample


def compile_coupler(cfg: Config, graphdef, mesh, mask_id: int):
  """`run(params, key, x, seeds) -> (z_T, x_hat, t)`, numpy: the teacher's coupling run compiled
  over the mesh. Under several processes every process calls it with the same global `x` [B, L]
  and `seeds` [B]; each feeds its own devices' rows, and each gets all the outputs back."""
  scfg, sample = coupling_sampler(cfg)
  denoise = model_denoiser(graphdef, cfg, mask_id)

  def program(params, key, x, seeds):
    k_in, k_run = jax.random.split(key)
    z, t = redi.coupling_inputs(k_in, x, mask_id, cfg.redi.full_mask_fraction)
    eps = noise.seeded_eps(seeds, x.shape[1], cfg) if noise.is_imdm(cfg) else None
    x_hat, _ = sample(denoise, params, k_run, z, eps, mask_id=mask_id, cfg=cfg, scfg=scfg, t0=t)
    return z, x_hat, t

  # the outputs are gathered onto every device, so each process can read them locally
  jitted = jax.jit(program, out_shardings=sharding.replicated(mesh))

  def run(params, key, x, seeds):
    with jax.enable_x64(scfg.float64):
      rows, put = sharding.batch_sharding(mesh), sharding.host_to_global
      out = jitted(params, put(key, sharding.replicated(mesh)), put(x, rows), put(seeds, rows))
      return jax.device_get(out)

  return run
