"""One `train` at a time in a run directory: an advisory lock on `<run_dir>/.lock`.

The lock is the kernel's (`fcntl.flock`), so it ends with its process however that process ends:
a lock file left by a killed run never blocks the resume. The file names its holder (pid, host,
start time) for the message the second process prints. flock is per host: on a file system shared
between hosts it guards against a second run on the same host only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import socket
import time

from softprompt_jax.errors import UserError
from softprompt_jax.run_layout import LOCK_FILE


class RunDirectoryBusy(UserError, RuntimeError):
  """Another process is training in this run directory."""


class RunLock:
  """Held from `acquire()` to `release()`; `release()` also removes the file."""

  def __init__(self, run_dir: pathlib.Path):
    self.path = pathlib.Path(run_dir) / LOCK_FILE
    self._fd = None

  def acquire(self) -> "RunLock":
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = self._holder()
        os.close(fd)
        raise RunDirectoryBusy(
            f"{self.path.parent} is in use by another train process ({holder}); wait for it to "
            "end or stop it (a stopped run resumes), or use another --model_dir") from None
      # A holder that released and removed the file just before we locked it leaves us with
      # an unlinked file: lock the new one instead.
      try:
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
    self._fd = fd
    return self

  def _holder(self) -> str:
    try:
      info = json.loads(self.path.read_text())
      return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
      return "its pid is not recorded yet"

  def release(self) -> None:
    if self._fd is None:
      return
    # Before unlocking: a waiting process then re-checks. A read-only disk keeps the file; the
    # lock itself ends with the descriptor, so the file never blocks a resume.
    with contextlib.suppress(OSError):
      self.path.unlink(missing_ok=True)
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None
