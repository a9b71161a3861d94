"""`results.json` of the synthetic experiment as a markdown table and a plot."""

from __future__ import annotations

import numpy as np

from experiments import results_files
from experiments.synthetic import task

FAMILIES = ('mdm', 'imdm')
METHODS = ('nelbo', 'sdtt', 'redi', 'sdtt+redi')
BALANCED = 'imdm/redi-balanced'  # the extension arm (`Setting.balanced_temperature`)
CONSENSUS = 'imdm/consensus'  # an extension: online self-distillation (`Runner.consensus`)
ORACLE = 'imdm/oracle'  # a reference, not a method: ReDi on perfect couplings (`Runner.oracle`)
ARMS = tuple(f'{f}/{m}' for f in FAMILIES for m in METHODS) + (BALANCED, CONSENSUS, ORACLE)
ROUNDS_SUFFIX = ' after round {}'


def _in_order(table: dict) -> list[tuple[str, dict]]:
  """`table`'s items in the arms' fixed order (results.json keeps its keys sorted)."""
  order = ('mdm/base',) + ARMS
  return sorted(table.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))


def _rows(results: dict) -> list[tuple[str, dict]]:
  """Every arm, with the multi-round ReDi arms also shown after their first round."""
  rows = []
  for name, scores in _in_order(results['arms']):
    rounds = results['rounds'].get(name, {})
    if len(rounds) > 1:
      rows.append((name + ROUNDS_SUFFIX.format(1), rounds['1']))
      name += ROUNDS_SUFFIX.format(max(map(int, rounds)))
    rows.append((name, scores))
  return rows


def markdown(results: dict) -> str:
  s = results['setting']
  steps = sorted(results['ceiling'], key=int)  # JSON sorts the keys as strings
  head = ('| arm | ' + ' | '.join(f'{k} step{"s" * (k != "1")}' for k in steps) +
          ' | pairwise MI, 1 step (nats) |')
  lines = [f'Fraction of constant sequences (± one standard error) / distinct values among them, '
           f'out of V_s = {s["vocab"]}; {s["eval_samples"]} samples per cell, fresh eps, '
           f'temperature 1. The data has pairwise MI log V_s = {np.log(s["vocab"]):.2f} nats.', '',
           head, '|---' * (len(steps) + 2) + '|',
           '| exact MDM ceiling | ' + ' | '.join(f'{results["ceiling"][k]:.3f}' for k in steps) +
           ' | |']
  rng = np.random.default_rng(0)
  bias = task.pairwise_mutual_information(
      rng.integers(0, s['vocab'], (s['eval_samples'], s['length'])), s['vocab'])
  lines.append('| independent uniform positions (the MI estimate\'s bias at this sample size) |' +
               ' |' * len(steps) + f' {bias:.2f} |')
  for name, scores in _rows(results):
    cells = [f'{scores[k]["constant"]:.3f} ± {scores[k]["constant_se"]:.3f} / {scores[k]["distinct"]}'
             for k in steps]
    lines.append(f'| {name} | ' + ' | '.join(cells) + f' | {scores[steps[0]]["pairwise_mi"]:.2f} |')
  diagnosis = results.get('one_step', {})  # results of older versions lack it
  if diagnosis and steps[0] == '1':
    lines += ['', 'One step, from x_theta on the same eps: the expected fraction of constant '
              'samples (sum_v prod_l p_l(v)), the fraction whose argmax decoding is constant (the '
              'positions agree) / the values among those, and the mean top probability of a '
              'position (each is sure):', '',
              '| arm | sampled | expected | argmax decoding | mean top probability |',
              '|---|---|---|---|---|']
    for name, d in _in_order(diagnosis):
      sampled = results['arms'][name][steps[0]]['constant']
      greedy = f'{d["greedy_constant"]:.3f}' + (
          f' / {d["greedy_distinct"]}' if 'greedy_distinct' in d else '')  # older results lack it
      lines.append(f'| {name} | {sampled:.3f} | {d["expected_constant"]:.3f} | {greedy} | '
                   f'{d["top_prob"]:.3f} |')
  if BALANCED in results['arms']:
    lines += ['', f'`imdm/redi-balanced` is an extension beyond the spec: from round 2 its teacher '
              f'samples at temperature {s["balanced_temperature"]:g} with per-value offsets that '
              'keep its values uniform (`arms.Runner.balanced`).']
  if CONSENSUS in results['arms']:
    lines += ['', f'`imdm/consensus` is an extension beyond the spec: ReDi round 1, then the rest of '
              'the budget on fresh eps, the target of a fully masked pair being the balanced '
              'argmax of the mean log x_theta over positions of the student frozen every '
              f'{s["consensus_refresh"]} steps (`arms.Runner.consensus`).']
  if ORACLE in results['arms']:
    lines += ['', '`imdm/oracle` is a reference, not a method: the IMDM student trained by the ReDi '
              'loss for the same budget on perfect couplings, fresh every step (the target of a '
              'fully masked pair: the sign bits of the position-mean of eps, '
              '`task.oracle_partition`; of any other, its revealed value).']
  lines += ['', f'Command: `{results["command"]}`; total time {results.get("total_seconds", "?")} s.']
  return '\n'.join(lines) + '\n'


def plot(results: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  steps = sorted(int(k) for k in results['ceiling'])
  fig, ax = plt.subplots(figsize=(7, 4.5))
  ax.plot(steps, [results['ceiling'][str(k)] for k in steps], 'k--', lw=2, label='exact MDM ceiling')
  colors = plt.get_cmap('tab20').colors  # more arms than the default cycle's 10 colours
  for i, (name, scores) in enumerate(_rows(results)):
    style = '-' if name.startswith('imdm') else ':'
    ax.plot(steps, [scores[str(k)]['constant'] for k in steps], style, marker='o', label=name,
            color=colors[i % len(colors)])
  ax.set(xscale='log', xlabel='sampling steps', ylabel='fraction of constant sequences',
         ylim=(-0.02, 1.02), title=f'repeated-token task, V_s = {results["setting"]["vocab"]}')
  ax.set_xticks(steps, [str(k) for k in steps])
  ax.legend(fontsize=7, loc='lower right')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def render(out: str) -> None:
  """results.md and results.png of the results.json in `out`."""
  results_files.render(out, markdown, plot)
