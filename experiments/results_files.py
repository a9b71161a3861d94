"""`results.json` of an experiment rendered as `results.md` and `results.png` beside it."""

from __future__ import annotations

import json
import os
from typing import Callable

from imdm_jax import files
from imdm_jax.errors import UserError


def render(out: str, markdown: Callable[[dict], str], plot: Callable[[dict, str], None]) -> None:
  path = os.path.join(out, 'results.json')
  if not os.path.exists(path):
    raise UserError(f'--out {out}: no results.json to render')
  with open(path) as f:
    results = json.load(f)
  files.write_atomic(os.path.join(out, 'results.md'), markdown(results))
  plot(results, os.path.join(out, 'results.png'))
