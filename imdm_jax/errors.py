"""User-facing errors: one line naming the problem, exit status 2, nothing overwritten."""

from __future__ import annotations

import functools
import sys


class UserError(Exception):
  """Bad input from the user (a key, a shape, a file). Entry scripts turn it into exit status 2."""


def exits_cleanly(main):
  """Decorates an entry point so that a `UserError` prints one line and exits with status 2."""

  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except UserError as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)

  return wrapped
