"""The arms of the synthetic experiment, run with the project's own steps (no special cases).

One MDM is trained by the NELBO; every arm starts from it. IMDM arms start from the same weights
plus the zero-initialised mask-noise path (method.md §3: the IMDM student of an MDLM), so at step
0 an IMDM computes exactly the MDM. Each arm then gets the same number of student updates
(`Setting.budget`): more NELBO, SDTT rounds, or ReDi rounds; `sdtt+redi` spends a ReDi budget on
top of the SDTT student.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from imdm_jax import (init_from, noise, redi, sampler, sampling, sdtt, sharding, train_state,
                      train_step)
from imdm_jax.config import (Config, DiffusionConfig, ModelConfig, OptimConfig, RediConfig,
                             SdttConfig, TrainConfig)

from experiments.synthetic import task
from experiments.synthetic.settings import Setting

Params = train_state.Params
Log = Callable[[str], None]


def config(s: Setting, imdm: bool) -> Config:
  model = ModelConfig(vocab_size=s.vocab + 1, hidden_size=s.hidden, n_blocks=s.blocks,
                      n_heads=s.heads, cond_dim=s.hidden, dropout=0.0,
                      noise_dim=s.noise_dim if imdm else 0)
  cfg = Config(model=model, diffusion=DiffusionConfig(),
               optim=OptimConfig(lr=s.lr, warmup_steps=50, ema_decay=0.0),
               train=TrainConfig(batch_size=s.batch, seed=s.seed),
               # one mean over the batch's masked positions: the reduction its recorded results
               # were measured with (docs/results_synthetic.md), not the official per-block one
               sdtt=SdttConfig(round_steps=max(s.budget // s.sdtt_rounds, 1),
                               num_rounds=s.sdtt_rounds, base_steps=2 ** s.sdtt_rounds,
                               stratum_rows=0),
               redi=RediConfig(sampler_steps=s.teacher_steps,
                               full_mask_fraction=s.full_mask_fraction,
                               ignore_seed=s.redi_ignore_seed))
  return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=s.length))


def _with_lr(cfg: Config, lr: float) -> Config:
  return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=lr))


def balancing_offsets(scores: np.ndarray, iterations: int = 50) -> np.ndarray:
  """b [V] such that softmax(scores - b), averaged over every row of scores [..., V], is uniform:
  the fixed point of b <- b + log(V * marginal(b))."""
  scores = np.asarray(scores, np.float64).reshape(-1, scores.shape[-1])
  scores = scores - scores.max(-1, keepdims=True)
  b = np.zeros(scores.shape[-1])
  for _ in range(iterations):
    probs = np.exp(scores - b)
    b += np.log((probs / probs.sum(-1, keepdims=True)).mean(0) * scores.shape[-1])
  return b


class Runner:
  """Holds the mesh and the data; every method is one stage of an arm, returning parameters."""

  def __init__(self, s: Setting, mesh: Mesh, log: Log = print):
    self.s, self.mesh, self.log = s, mesh, log
    self.mask_id = s.vocab
    self.data = task.sequences(np.random.default_rng(s.seed), s.num_data, s.vocab, s.length)
    self._compiled = {}

  def _batch(self, rows: dict[str, np.ndarray] | Callable[[np.random.Generator], dict],
             rng: np.random.Generator) -> dict[str, jax.Array]:
    """A batch of `rows` drawn with replacement, or `rows(rng)` when it makes its own."""
    if callable(rows):
      batch = rows(rng)
    else:
      idx = rng.integers(0, len(next(iter(rows.values()))), self.s.batch)
      batch = {k: v[idx] for k, v in rows.items()}
    batch['attention_mask'] = np.ones_like(batch['z_T' if 'z_T' in batch else 'tokens'])
    return sharding.to_global(batch, self.mesh)

  def _state(self, cfg: Config, params: Params | None) -> train_state.TrainState:
    state = train_state.init_state(cfg, self.mesh)
    if params is None:
      return state
    # copies: the steps donate their state, and `params` is the start of other arms too
    params = jax.tree.map(jnp.copy, init_from.graft(state.params, params, 'synthetic'))
    return state.replace(params=params, ema=jax.tree.map(jnp.copy, params))

  def _run(self, cfg, state, step_fn, steps, rows, what, before_step=None):
    if self.s.lr_decay and steps > cfg.optim.warmup_steps:  # the schedule is not in `state`
      cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, decay_steps=steps))
    graphdef = train_state.model_graphdef(cfg)
    step = train_step.compile_train_step(cfg, graphdef, self.mesh, state, step_fn,
                                         mask_id=self.mask_id)
    # batches drawn from a stream named by the stage, so an arm's numbers do not depend on which
    # arms ran before it (`--only`)
    rng = np.random.default_rng([self.s.seed, zlib.crc32(what.encode())])
    start, loss = time.time(), float('nan')
    for k in range(steps):
      if before_step is not None:
        state = before_step(state, k)
      state, out = step(state, self._batch(rows, rng))
      loss = float(out['loss']) if k == steps - 1 else loss
    self.log(f'  {what}: {steps} steps, final loss {loss:.4f}, {time.time() - start:.0f} s')
    return state

  def nelbo(self, cfg: Config, params: Params | None, steps: int) -> Params:
    state = self._run(cfg, self._state(cfg, params), train_step.train_step, steps,
                      {'tokens': self.data}, 'NELBO')
    return state.params

  def sdtt(self, cfg: Config, params: Params) -> Params:
    """`num_rounds` rounds of `round_steps`: the teacher halves its step count each round."""
    cfg = _with_lr(cfg, self.s.sdtt_lr)
    student = self._state(cfg, params)
    state = sdtt.SdttState(student=student, teacher=jax.tree.map(jnp.copy, student.params),
                           round=jnp.zeros((), jnp.int32))

    before_step = lambda state, k: sdtt.advance_rounds(state, k, cfg.sdtt.round_steps)
    steps = cfg.sdtt.round_steps * cfg.sdtt.num_rounds
    return self._run(cfg, state, train_step.sdtt_step, steps, {'tokens': self.data},
                     f'SDTT ({cfg.sdtt.num_rounds} rounds)', before_step).student.params

  def couplings(self, cfg: Config, params: Params, n: int, round_: int,
                temperature: float) -> dict[str, np.ndarray]:
    """`n` pairs from `params` sampling as `cfg` (eps from each pair's seed, held fixed)."""
    tcfg = dataclasses.replace(cfg, redi=dataclasses.replace(
        cfg.redi, temperature=temperature, fix_eps=True))
    run = sampling.compile_coupler(tcfg, train_state.model_graphdef(tcfg), self.mesh, self.mask_id)
    rng = np.random.default_rng((self.s.seed, round_))
    out, start = [], time.time()
    for c in range(-(-n // self.s.batch)):
      x = task.sequences(rng, self.s.batch, self.s.vocab, self.s.length)
      seeds = (round_ * 10_000_000 + c * self.s.batch + np.arange(self.s.batch)).astype(np.int32)
      z, x_hat, t = run(params, jax.random.PRNGKey(round_ * 100_003 + c), x, seeds)
      out.append({'z_T': z, 'x_hat': x_hat, 't': t, 'seed': seeds})
    pairs = {k: np.concatenate([o[k] for o in out])[:n] for k in out[0]}
    fit = (pairs['x_hat'] == pairs['x_hat'][:, :1]).all(-1).mean()
    self.log(f'  couplings: {n} pairs in {time.time() - start:.0f} s, {fit:.3f} constant')
    return pairs

  def balanced(self, cfg: Config, params: Params, temperature: float, n: int = 8192,
               iterations: int = 50) -> Params:
    """`params` with per-value offsets `b` subtracted from the output bias, fitted so that the
    one-step distribution at temperature `temperature` of a fully masked position, averaged over
    fresh eps and positions, is uniform over the V_s values.

    A low-temperature teacher sharpens the student's eps -> c map, but it also amplifies any
    imbalance between values round after round (the values the student slightly prefers take over
    the regions of eps where it is unsure): the balanced teacher sharpens without collapsing.
    """
    graphdef = train_state.model_graphdef(cfg)
    z = jnp.full((n, self.s.length), self.mask_id, jnp.int32)
    eps = noise.draw_eps(jax.random.PRNGKey(self.s.seed + 77), z.shape, cfg)
    denoise = sampling.model_denoiser(graphdef, cfg, self.mask_id)
    logits = jax.jit(lambda p: denoise(p, z, eps, jnp.ones((n,))))(params)  # [n, L, V]
    b = balancing_offsets(np.asarray(logits[..., :self.s.vocab]) / temperature, iterations)
    out = jax.tree.map(lambda x: x, params)
    bias = out['output_layer']['linear']['bias']
    out['output_layer']['linear']['bias'] = bias.at[:self.s.vocab].add(
        -jnp.asarray(b * temperature, bias.dtype))
    return out

  def redi(self, student_cfg: Config, teacher_cfg: Config, params: Params,
           evaluate: Callable[[Params, int], None], balanced_temperature: float = 0.0) -> Params:
    """`redi_rounds` rounds; round k + 1 re-couples from the round-k student and starts from it.

    Round 1's teacher is `params` sampled as `teacher_cfg` (the start model, at temperature 1);
    later teachers are the student itself at `Setting.teacher_temperature`, or, given a
    `balanced_temperature`, the `balanced` student at that temperature.
    """
    s = self.s
    teacher, tcfg, temperature = params, teacher_cfg, 1.0
    for r in range(s.redi_rounds):
      pairs = self.couplings(tcfg, teacher, s.redi_first_pairs if r == 0 else s.redi_pairs, r,
                             temperature)
      state = self._state(student_cfg, params)
      steps = s.redi_first_steps if r == 0 else s.redi_round_steps
      params = self._run(student_cfg, state, train_step.redi_step, steps, pairs,
                         f'ReDi round {r + 1}').params
      evaluate(params, r + 1)
      teacher, tcfg, temperature = params, student_cfg, s.teacher_temperature
      if balanced_temperature:
        temperature = balanced_temperature
        teacher = self.balanced(student_cfg, params, temperature)
    return params

  def oracle(self, cfg: Config, params: Params) -> Params:
    """`budget` ReDi steps on perfect couplings, fresh every step: the coupling inputs of
    `couplings` (a data row masked at t, seeded eps), and the target a perfect teacher would give:
    the row's own value where any token is revealed, else the constant sequence of
    `task.oracle_partition(eps)`.

    Not a method (no teacher knows this map): a reference for what couplings can teach this
    student in this budget. When it is no better than the ReDi arms, the student's learning of a
    sharp eps -> c map is what limits them, not the quality of their couplings.
    """
    s = self.s
    cfg = _with_lr(cfg, s.online_lr)

    @jax.jit
    def pairs(x, seeds, key):
      eps = noise.seeded_eps(seeds, s.length, cfg)  # [B, L, D]
      z, t = redi.coupling_inputs(key, x, self.mask_id, cfg.redi.full_mask_fraction)
      # eps decides only when nothing is revealed, so the student also learns that a revealed
      # token outweighs eps (as from the teachers of `couplings`)
      x_hat = task.coupling_targets(x, z, task.oracle_partition(eps, s.vocab), self.mask_id)
      return {'z_T': z, 'x_hat': x_hat, 't': t}

    return self._run(cfg, self._state(cfg, params), train_step.redi_step, s.budget,
                     self._fresh_pairs(pairs), 'ReDi on oracle couplings').params

  def _fresh_pairs(self, pairs: Callable) -> Callable[[np.random.Generator], dict]:
    """`rows(rng)` for `_batch`: a batch of data rows, seeds and a key, handed to
    `pairs(x, seeds, key) -> {'z_T', 'x_hat', 't'}`."""
    s = self.s

    def draw(rng):
      x = task.sequences(rng, s.batch, s.vocab, s.length)
      seeds = rng.integers(0, np.iinfo(np.int32).max, s.batch).astype(np.int32)
      key = jax.random.PRNGKey(int(rng.integers(np.iinfo(np.int32).max)))
      return dict(jax.device_get(pairs(x, seeds, key)), seed=seeds)

    return draw

  def consensus(self, cfg: Config, teacher_cfg: Config, params: Params, refresh: int) -> Params:
    """ReDi round 1 (as in `redi`), then online self-distillation on fresh eps for the rest of the
    budget: every `refresh` steps the student is frozen as the teacher; the target of a fully
    masked pair is the teacher's balanced consensus `argmax_v [mean_l log p_l(v | eps) - b_v]`,
    of any other pair its revealed value (`task.coupling_targets`).

    An extension beyond the spec (method.md §4 stores couplings from a many-step run): like the
    oracle, every pair is fresh and its target a deterministic, balanced function of eps that all
    positions share, but the map is the student's own. The offsets `b` are re-fitted at each
    refresh on fresh eps so every value gets 1/V_s of the eps mass; without them the consensus
    drifts onto the values the student slightly prefers.
    """
    s = self.s
    cfg = _with_lr(cfg, s.online_lr)
    pairs = self.couplings(teacher_cfg, params, s.redi_first_pairs, 0, 1.0)
    state = self._state(cfg, params)
    params = self._run(cfg, state, train_step.redi_step, s.redi_first_steps, pairs,
                       'ReDi round 1').params

    @jax.jit
    def consensus_scores(params, eps):  # [N, V_s]: mean over positions of log x_theta, t = 1
      z = jnp.full(eps.shape[:2], self.mask_id, jnp.int32)
      return self._log_x_theta(cfg, params, z, eps).mean(1)

    @jax.jit
    def targets(teacher, b, x, seeds, key):
      eps = noise.seeded_eps(seeds, s.length, cfg)  # [B, L, D]
      z, t = redi.coupling_inputs(key, x, self.mask_id, cfg.redi.full_mask_fraction)
      c = jnp.argmax(consensus_scores(teacher, eps) - b, -1)  # [B]
      return {'z_T': z, 'x_hat': task.coupling_targets(x, z, c, self.mask_id), 't': t}

    held = {}  # the current teacher and its offsets

    def before_step(state, k):
      if k % refresh == 0:
        held['teacher'] = jax.tree.map(jnp.copy, state.params)
        eps = noise.draw_eps(jax.random.PRNGKey(s.seed + 1000 + k), (8192, s.length), cfg)
        # a low temperature, so the soft balance measured is that of the argmax labels
        b = balancing_offsets(np.asarray(consensus_scores(held['teacher'], eps)) / 0.05) * 0.05
        held['b'] = jnp.asarray(b, jnp.float32)
      return state

    draw = self._fresh_pairs(lambda *rows: targets(held['teacher'], held['b'], *rows))
    state = self._state(cfg, params)
    return self._run(cfg, state, train_step.redi_step, s.budget - s.redi_first_steps, draw,
                     f'online consensus (teacher refreshed every {refresh} steps)',
                     before_step).params

  def _eval_inputs(self, cfg: Config, seed: int):
    """Fully masked z [N, L] and their eps: the same for every arm of a family."""
    z = np.full((self.s.eval_samples, self.s.length), self.mask_id, np.int32)
    eps = noise.draw_eps(jax.random.PRNGKey(seed), z.shape, cfg) if noise.is_imdm(cfg) else None
    return z, eps

  def _log_x_theta(self, cfg: Config, params: Params, z, eps):
    """log x_theta [N, L, V_s] over the data values of z [N, L] with mask noise eps, at t = 1."""
    denoise = sampling.model_denoiser(train_state.model_graphdef(cfg), cfg, self.mask_id)
    logits = denoise(params, z, eps, jnp.ones(z.shape[:1]))
    return jax.nn.log_softmax(logits[..., :self.s.vocab], -1)

  def one_step(self, cfg: Config, params: Params, seed: int) -> dict[str, float]:
    """`task.one_step_diagnosis` of x_theta at t = 1 on the evaluation's eps."""
    z, eps = self._eval_inputs(cfg, seed)
    if (cfg, 'x_theta') not in self._compiled:
      self._compiled[cfg, 'x_theta'] = jax.jit(lambda p, z, eps: self._log_x_theta(cfg, p, z, eps))
    return task.one_step_diagnosis(np.asarray(self._compiled[cfg, 'x_theta'](params, z, eps)))

  def evaluate(self, cfg: Config, params: Params, seed: int) -> dict[int, dict[str, float]]:
    """`task.score` of `eval_samples` fresh samples at every step count of the setting."""
    s = self.s
    graphdef = train_state.model_graphdef(cfg)
    z, eps = self._eval_inputs(cfg, seed)
    out = {}
    for steps in s.eval_steps:
      if (cfg, steps) not in self._compiled:  # compiled once per family, not once per round
        self._compiled[cfg, steps] = sampling.compile_sampler(
            cfg, graphdef, self.mesh, sampler.SamplerConfig(steps=steps), self.mask_id)
      x, _ = self._compiled[cfg, steps](params, jax.random.PRNGKey(seed + steps), z, eps)
      out[steps] = task.score(np.asarray(x), s.vocab)
    return out
