"""ReDi: rectified discrete flow (docs/method.md §4), for MDLM and IMDM students.

A coupling pairs a perturbed start `z_T` (each token of a training row x masked with probability
t, `coupling_inputs`) with the current model's sample `x_hat` from it (`sampling.compile_coupler`;
generation and storage: `couplings.py`). Rectification trains the student by the NELBO at the
stored t on the stored pairs (`redi_loss`; the step: `train_step.redi_step`): input z_T with the pair's eps regenerated from its
seed (or fresh, with `redi.ignore_seed`), target x_hat at the positions masked in z_T.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from imdm_jax import loss, masking, noise
from imdm_jax.config import Config
from imdm_jax.loss import Denoise


def coupling_inputs(key: PRNGKeyArray, x: Int[Array, 'B L'], mask_id: int,
                    full_mask_fraction: float) -> tuple[Int[Array, 'B L'], Float[Array, 'B']]:
  """(z_T, t): perturbed starting points, t ~ U(0, 1] as in the official code (or 1 for a
  `full_mask_fraction` of the rows), each token masked with probability t.

  Deliberately t, not the schedule's `1 - alpha(t) = (1 - alpha_min) t`: the official coupling
  generation (Ugness/IMDM, `TrainerBase.test_step`) masks with `alpha_t = 1 - t` passed straight to
  its forward kernel, and the sampler then runs from t on the schedule. The 0.1 % difference is the
  reference's; we keep it. The official t is `torch.rand`, U[0, 1); ours is 1 - U[0, 1), the same
  law without t = 0 (whose loss weight 1/t is infinite).
  """
  k_t, k_full, k_mask = jax.random.split(key, 3)
  t = 1.0 - jax.random.uniform(k_t, x.shape[:1], jnp.float32)
  t = jnp.where(jax.random.uniform(k_full, t.shape) < full_mask_fraction, 1.0, t)
  return masking.mask_with_prob(k_mask, x, t, mask_id), t


def redi_loss(denoise: Denoise, params, z_T: Int[Array, 'B L'], x_hat: Int[Array, 'B L'], eps,
              t: Float[Array, 'B'], valid: Int[Array, 'B L'],
              mask_id: int) -> tuple[Float[Array, ''], Float[Array, '']]:
  """Rectification: the NELBO of the pair as if z_T had been drawn from x_hat at time t — the
  student learns to map z_T (with its eps) to the teacher's x_hat in one denoising.
  Returns (sum over valid tokens, number of valid tokens), as `loss.nelbo_loss`."""
  return loss.nelbo_loss(denoise, params, x_hat, z_T, eps, t, valid, mask_id)


def pair_eps(key: PRNGKeyArray, batch: dict[str, Array], cfg: Config):
  """The eps a pair is rectified with: regenerated from its seed, fresh with `ignore_seed`, None
  for an MDLM student."""
  z = batch['z_T']
  if not noise.is_imdm(cfg):
    return None
  if cfg.redi.ignore_seed:
    return noise.draw_eps(key, z.shape, cfg)
  return noise.seeded_eps(batch['seed'], z.shape[1], cfg)
