"""Atomic file writes: a crash mid-write leaves the old file, never a partial one."""

from __future__ import annotations

import os
from typing import Callable


def write_atomic(path: str, content: str | Callable[[str], None]) -> None:
  """Writes `content` (text, or a function that writes the file at the path it is given) to a
  temporary name beside `path`, then renames it over `path` (a rename is atomic). The temporary
  name keeps the extension, for writers that go by it (numpy, matplotlib)."""
  root, ext = os.path.splitext(path)
  tmp = f'{root}.tmp{os.getpid()}{ext}'
  if callable(content):
    content(tmp)
  else:
    with open(tmp, 'w') as f:
      f.write(content)
  os.replace(tmp, path)
