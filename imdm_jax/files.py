"""Atomic file writes (a crash mid-write leaves the old file, never a partial one), and the lock
that keeps two runs out of one directory."""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Callable, Iterator

from imdm_jax.errors import UserError


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


@contextlib.contextmanager
def locked(directory: str) -> Iterator[None]:
  """Holds `directory/.lock` (an advisory `flock`, released when the holder exits or dies) for the
  block: a second run on the same directory is refused in one line naming the holder."""
  path = os.path.join(directory, '.lock')
  with open(path, 'a+') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or 'another process'
      raise UserError(f'{directory} is in use by another run ({holder}); wait for it, or use '
                      'another directory') from None
    f.seek(0)
    f.truncate()
    f.write(f'pid {os.getpid()} on {os.uname().nodename}')
    f.flush()
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def remove_if_empty(directory: str, ignoring: tuple[str, ...] = ()) -> None:
  """Removes `directory` if it holds nothing but empty directories and the files named in
  `ignoring` (and those)."""
  for name in os.listdir(directory):
    path = os.path.join(directory, name)
    if os.path.isdir(path) and not os.listdir(path):
      os.rmdir(path)
  if set(os.listdir(directory)) <= set(ignoring):
    for name in ignoring:
      if os.path.isfile(os.path.join(directory, name)):
        os.remove(os.path.join(directory, name))
    os.rmdir(directory)
