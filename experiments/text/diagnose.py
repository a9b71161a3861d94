"""Does an IMDM's noise path carry information? Two measurements on a run's weights.

- `noise_out_norm`: the norm of the layer that turns eps into the mask embedding (zero when the
  IMDM starts from an MDLM; it grows only if training finds eps useful).
- `eps_effect`: one-step samples from the fully masked start, drawn twice with the *same*
  sampler randomness and two independent eps. An MDLM-like network gives identical samples (the
  fraction of positions that differ is 0); a network that maps eps to a choice among the data's
  modes changes them. `key_effect` is the same fraction with one eps and two sampler keys: the
  scale of a change that carries no information about eps.
"""

from __future__ import annotations

import jax
import numpy as np

from imdm_jax import init_from, noise, sampler, sampling, sharding, train_step, train_state
from imdm_jax.config import MeshConfig
from imdm_jax.data import store


def noise_path(run: str, seed: int, num: int = 64) -> dict[str, float]:
  mesh = sharding.make_mesh(MeshConfig())
  params, cfg = init_from.load_weights(run, mesh)[:2]
  mask_id = store.load_tokenizer(cfg).mask_id
  sample = sampling.compile_sampler(cfg, train_state.model_graphdef(cfg), mesh,
                                    sampler.SamplerConfig(steps=1), mask_id)
  z = np.full((num, cfg.data.seq_len), mask_id, np.int32)
  key = jax.random.PRNGKey(seed)
  k_a, k_b, e_a, e_b = jax.random.split(key, 4)
  eps_a, eps_b = (noise.draw_eps(k, z.shape, cfg) for k in (e_a, e_b))
  x = {name: np.asarray(jax.device_get(sample(params, k, z, e))[0])
       for name, (k, e) in {'a': (k_a, eps_a), 'eps': (k_a, eps_b), 'key': (k_b, eps_a)}.items()}
  return {'noise_out_norm': float(train_step.noise_output_norm(params)),
          'eps_effect': float(np.mean(x['a'] != x['eps'])),
          'key_effect': float(np.mean(x['a'] != x['key']))}
