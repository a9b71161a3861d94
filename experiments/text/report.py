"""`results.json` of the text study as a markdown table, a plot, and the check of the target."""

from __future__ import annotations

from imdm_jax import files

from experiments import results_files
from experiments.text.settings import ARMS

# The target (issue #17): after SDTT -> ReDi, IMDM's 2-step Gen PPL at most half of MDLM's, with
# unigram entropy within 5 % and non-overlapping 95 % intervals; the two within 10 % at 16 steps.
FEW, MANY = '2', '16'
TARGET_ARMS = ('mdlm/sdtt+redi', 'imdm/sdtt+redi')


def target(results: dict) -> dict | None:
  arms = results['arms']
  mdlm, imdm = (arms.get(a) for a in TARGET_ARMS)
  if not mdlm or not imdm or FEW not in mdlm or MANY not in mdlm:
    return None
  m, i = mdlm[FEW], imdm[FEW]
  checks = {
      'ratio_2_steps': i['gen_ppl'] / m['gen_ppl'],
      'entropy_gap_2_steps': abs(i['entropy'] - m['entropy']) / m['entropy'],
      'intervals_apart_2_steps': i['gen_ppl_ci'][1] < m['gen_ppl_ci'][0],
      'ratio_16_steps': imdm[MANY]['gen_ppl'] / mdlm[MANY]['gen_ppl'],
  }
  checks['met'] = bool(checks['ratio_2_steps'] <= 0.5 and checks['entropy_gap_2_steps'] <= 0.05
                       and checks['intervals_apart_2_steps']
                       and abs(checks['ratio_16_steps'] - 1) <= 0.10)
  return checks


def _in_order(table: dict) -> list[tuple[str, dict]]:
  """`table`'s items in the arms' fixed order (results.json keeps its keys sorted)."""
  return sorted(table.items(), key=lambda kv: ARMS.index(kv[0]) if kv[0] in ARMS else len(ARMS))


def markdown(results: dict) -> str:
  arms = results['arms']
  steps = sorted({s for scores in arms.values() for s in scores}, key=int)
  lines = [f'Command: `{results["command"]}`' + (f' at commit `{results["commit"]}`'
                                                  if results.get('commit') else ''), '',
           f'Gen PPL under the evaluator `{results["evaluator"]}` (protocol '
           f'`{results["study"].get("gen_ppl_protocol", "ours")}`) [95 % bootstrap interval] / '
           f'unigram entropy (nats); {results["study"]["num_samples"]} samples per cell, the same '
           f'seeds in every arm.', '',
           '| arm | ' + ' | '.join(f'{s} step{"s" * (s != "1")}' for s in steps) + ' |',
           '|---' * (len(steps) + 1) + '|']
  for arm, scores in _in_order(arms):
    cells = []
    for s in steps:
      r = scores.get(s)
      cells.append('-' if r is None else f'{r["gen_ppl"]:.1f} [{r["gen_ppl_ci"][0]:.1f}, '
                   f'{r["gen_ppl_ci"][1]:.1f}] / {r["entropy"]:.2f}')
    lines.append(f'| {arm} | ' + ' | '.join(cells) + ' |')
  t = results.get('target')
  if t:
    verdict = 'met' if t['met'] else 'not met'
    lines += ['', f'Target ({verdict}): after SDTT -> ReDi, IMDM / MDLM Gen PPL at 2 steps '
              f'{t["ratio_2_steps"]:.3f} (needs <= 0.5), entropy gap {t["entropy_gap_2_steps"]:.1%} '
              f'(<= 5 %), intervals apart: {"yes" if t["intervals_apart_2_steps"] else "no"}; at '
              f'16 steps {t["ratio_16_steps"]:.3f} (within 10 % of 1).']
  diagnostics = results.get('diagnostics', {})
  if diagnostics:
    lines += ['', 'The IMDM noise path: the norm of its output layer, and the fraction of positions '
              'of 1-step samples that change when only eps is redrawn (eps effect) or only the '
              'sampler key (key effect), from the same fully masked start.', '',
              '| arm | noise-out norm | eps effect | key effect |', '|---|---|---|---|']
    for arm, d in _in_order(diagnostics):
      lines.append(f'| {arm} | {d["noise_out_norm"]:.3f} | {d["eps_effect"]:.3f} | '
                   f'{d["key_effect"]:.3f} |')
  seconds = results.get('seconds', {})
  if seconds:
    lines += ['', 'Seconds per stage: ' + ', '.join(f'{k} {v}' for k, v in seconds.items()) +
              f'; total {sum(seconds.values())} s.']
  return '\n'.join(lines) + '\n'


def plot(results: dict, path: str) -> None:
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  fig, (ppl_ax, ent_ax) = plt.subplots(1, 2, figsize=(11, 4))
  for arm, scores in _in_order(results['arms']):
    steps = sorted(scores, key=int)
    x = [int(s) for s in steps]
    style = '-' if arm.startswith('imdm') else '--'
    line, = ppl_ax.plot(x, [scores[s]['gen_ppl'] for s in steps], style, marker='o', label=arm)
    ppl_ax.fill_between(x, [scores[s]['gen_ppl_ci'][0] for s in steps],
                        [scores[s]['gen_ppl_ci'][1] for s in steps], color=line.get_color(),
                        alpha=0.15)
    ent_ax.plot(x, [scores[s]['entropy'] for s in steps], style, marker='o',
                color=line.get_color(), label=arm)
  ppl_ax.set(xscale='log', yscale='log', xlabel='sampling steps', ylabel='Gen PPL')
  ent_ax.set(xscale='log', xlabel='sampling steps', ylabel='unigram entropy (nats)')
  ppl_ax.legend(fontsize=7)
  fig.tight_layout()
  files.write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100))
  plt.close(fig)


def render(out: str) -> None:
  """results.md and results.png of the results.json in `out`."""
  results_files.render(out, markdown, plot)
