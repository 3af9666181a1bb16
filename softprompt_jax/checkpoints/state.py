"""Prompt-only training checkpoints with orbax: what changes is saved, the frozen model is not.

A checkpoint holds the TrainState (step, trainable params — the prompt —, optimizer state), the
base RNG key, the data iterator's position and run metadata: kilobytes to megabytes. The frozen
model is referenced by its path and a fingerprint, checked on resume. Retention: the last N
checkpoints plus the best one by a validation metric (the paper selects on dev). Orbax writes
each step to a temporary directory and renames it when complete, so a crash mid-save leaves the
previous checkpoints intact and the partial one invisible. After the rename, a sha256 of every
file goes into the step's `sha256sums.json`; a step whose files no longer match (a damaged disk,
a half-copied directory) or that fails to restore is reported, moved aside to
`damaged-<step>-<time>` (never deleted) and the previous good step is used instead.

A save that fails (a full or read-only disk) raises an OSError naming the step, after orbax's
background writes have stopped and its temporary directory is removed: the steps saved before
stay as they were, and nothing partial is left to take space or be mistaken for a checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import threading
import time
import warnings
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from softprompt_jax import output_files
from softprompt_jax.checkpoints import integrity
from softprompt_jax.checkpoints.integrity import INTEGRITY_FILE

# How long a failed save waits for orbax's other background writes to stop before it reports.
_SAVE_THREADS_TIMEOUT_S = 60
# ... and for tensorstore's last writes to settle before the partial step is removed.
_SETTLE_TIMEOUT_S = 10
# A disk or directory that refuses writes: full, over quota, read-only, not ours to write.
_REFUSED = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
# Tensorstore (orbax's array writer) reports an OS error as a ValueError ending in this.
_TENSORSTORE_OS_ERROR = re.compile(r"\[os_error_code='(\d+)'\]")


class PromptCheckpoints:
  """Save / restore the changing state of a run in `directory` (e.g. MODEL_DIR/checkpoints)."""

  def __init__(self, directory, *, keep_last: int = 2, best_metric: Optional[str] = None,
               best_mode: str = "max"):
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode {best_mode!r}: use 'max' or 'min'")
    self.directory = pathlib.Path(directory).absolute()
    self.best_metric, self.best_mode = best_metric, best_mode
    keep = [policies.LatestN(n=keep_last)]
    if best_metric:
      keep.append(policies.BestN(get_metric_fn=lambda m: m[best_metric],
                                 reverse=best_mode == "min", n=1,
                                 keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        # create=False: the directory comes with the first save, so a run that stops before
        # it leaves no empty checkpoints/ behind.
        preservation_policy=policies.AnyPreservationPolicy(keep), create=False,
        enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data", "meta"))

  def save(self, step: int, state, data_position: dict, meta: dict,
           metrics: Optional[dict] = None) -> None:
    """Writes step `step`; `metrics` (with `best_metric`) make it a candidate for best."""
    if metrics is not None and self.best_metric and self.best_metric not in metrics:
      raise KeyError(f"best_metric {self.best_metric!r} not among the eval metrics "
                     f"{sorted(metrics)}; set it to one of them")
    clean = None if metrics is None else {k: float(v) for k, v in metrics.items()}
    # The metrics also go into meta, so the best step can be found from the files alone.
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_position),
                              meta=ocp.args.JsonSave({**meta, "metrics": clean}))
    step_dir = self.directory / str(step)
    before = set(threading.enumerate())
    with _held_thread_errors() as held, _quiet_closed_loops():
      try:
        self._manager.save(step, args=args, metrics=clean, force=True)
        self._manager.wait_until_finished()
      except BaseException as error:  # an interrupt too: the partial step is not left behind
        # orbax re-raises the first failed write while its other writes go on in threads.
        self._stop_failed_save(step, before)
        refused = _refused_write(error, step_dir) if isinstance(error, Exception) else None
        if refused is None:
          held.replay()
          raise
        _quiet_abandoned_futures()
        raise refused from error
      held.replay()
    if jax.process_index() == 0:
      try:  # atomic: the file is whole or absent
        output_files.write_text(step_dir / INTEGRITY_FILE,
                                json.dumps(integrity.file_digests(step_dir), indent=0))
      except OSError as error:
        # The step itself is complete (orbax renamed it): it stays, restorable, unverified.
        refused = _refused_write(error, step_dir / INTEGRITY_FILE)
        if refused is None:
          raise
        raise refused from error

  def _stop_failed_save(self, step: int, before: set) -> None:
    """Waits for the background writes of a failed save to stop, then removes its temporary
    directory: a partial step is never a checkpoint, it only takes space the user is freeing,
    and a write landing late must not meet the next save of this step in the same directory."""
    deadline = time.monotonic() + _SAVE_THREADS_TIMEOUT_S
    while True:  # a finishing thread may start another (orbax's executors)
      running = [t for t in set(threading.enumerate()) - before if t.is_alive()]
      if not running or time.monotonic() >= deadline:
        break
      for thread in running:
        # Thread's own join: orbax's re-raises what the thread raised.
        threading.Thread.join(thread, max(0.0, deadline - time.monotonic()))
    # (Still writing after all that: orbax removes the directory when it saves this step again.)
    if not running and jax.process_index() == 0:
      self._remove_partial(step)
    gc.collect()  # the futures the failed writes left, while their complaints are held

  def _remove_partial(self, step: int) -> None:
    """Removes the temporary directory of `step` once tensorstore's own writes (C++, in no
    Python thread) have stopped landing in it."""
    deadline = time.monotonic() + _SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:
      partial = list(self.directory.glob(f"{step}.orbax-checkpoint-tmp*"))
      if not partial:
        return
      if not _settled(partial):
        continue
      try:
        for path in partial:
          shutil.rmtree(path)
      except OSError as error:  # a late write (not empty) is waited for; otherwise it stays
        if error.errno not in (errno.ENOTEMPTY, errno.ENOENT):
          return  # (a read-only disk): orbax never lists it, and removes it when it can

  def damage(self, step: int) -> Optional[str]:
    """Why `step`'s files are not the ones saved (one line), or None when they are (or when the
    step predates its checksums, e.g. a crash right after orbax's rename)."""
    return integrity.damage(self.directory / str(step))

  def set_aside(self, step: int, reason: str) -> pathlib.Path:
    """Moves a damaged step out of the way (kept for inspection) and warns with the reason."""
    target = self.directory / f"damaged-{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    # With several processes: all have looked at the step before process 0 moves it, and none
    # lists the steps again before it has.
    ocp.multihost.sync_global_processes(f"softprompt_jax_set_aside_{step}_checked")
    if jax.process_index() == 0:
      os.replace(self.directory / str(step), target)
    ocp.multihost.sync_global_processes(f"softprompt_jax_set_aside_{step}_moved")
    warnings.warn(f"checkpoint {self.directory / str(step)} is damaged ({reason}); moved to "
                  f"{target.name}, using the previous checkpoint", stacklevel=2)
    self._manager.reload()
    return target

  def restore_latest(self, abstract_state) -> tuple[Optional[tuple], list[tuple[int, str]]]:
    """((step, state, data position, meta) of the newest step that verifies and restores, or
    None), plus the [(step, reason)] of newer steps found damaged and set aside."""
    damaged = []
    for step in reversed(self.steps()):
      reason = self.damage(step)
      if reason is None:
        try:
          return (step, *self.restore(step, abstract_state)), damaged
        except Exception as e:  # orbax, tensorstore and JSON each raise their own types
          reason = f"cannot be restored: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
      self.set_aside(step, reason)
      damaged.append((step, reason))
    return None, damaged

  def steps(self) -> list[int]:
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    steps = self.steps()
    return steps[-1] if steps else None

  def best_step(self) -> Optional[int]:
    """The kept step with the best `best_metric` (None without evaluated checkpoints)."""
    if not self.best_metric:
      return None
    scored = []
    for step in self.steps():
      metrics = self._verified_metrics(step)
      if metrics is None:
        continue
      if self.best_metric in metrics:
        scored.append((metrics[self.best_metric], step))
    if not scored:
      return None
    pick = max if self.best_mode == "max" else min
    return pick(scored, key=lambda item: (item[0], -item[1]))[1]

  def _verified_metrics(self, step: int) -> Optional[dict]:
    """A step's saved metrics ({} if none), or None if the step is damaged (skipped here; a
    resume reports and sets it aside)."""
    if self.damage(step) is not None:
      return None
    try:
      return self.restore_meta(step).get("metrics") or {}
    except Exception:  # unreadable meta: the same damage, found by reading
      return None

  def restore(self, step: int, abstract_state) -> tuple[Any, dict, dict]:
    """(state, data position, meta) of `step`; `abstract_state` gives structure and shardings."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["data"]), dict(restored["meta"])

  def restore_meta(self, step: int) -> dict:
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])

  def close(self) -> None:
    self._manager.close()


def _settled(paths, quiet_s: float = 0.2) -> bool:
  """Whether nothing under `paths` changes (names, sizes, times) for `quiet_s`."""
  def listing():
    return {(str(p), p.stat().st_size, p.stat().st_mtime_ns) for path in paths
            for p in [path, *path.rglob("*")] if p.exists()}
  try:
    first = listing()
    time.sleep(quiet_s)
    return listing() == first
  except OSError:  # a file went away while listed: still changing
    return False


def _refused_write(error: BaseException, path) -> Optional[OSError]:
  """The refusal (see _REFUSED) behind a write that failed, as an OSError naming `path` where
  the OS named no file (a write(), a library's message): an OSError in `error`'s chain (orbax
  re-raises its threads' errors, sometimes wrapped), or tensorstore's ValueError ending in its
  os_error_code. None for any other error, which is not to pass for a full disk."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    code = error.errno if isinstance(error, OSError) else None
    if code is None:
      found = _TENSORSTORE_OS_ERROR.search(str(error))
      code = int(found.group(1)) if found else None
    if code in _REFUSED:
      filename = getattr(error, "filename", None) or os.fspath(path)
      return OSError(code, os.strerror(code), filename)  # the subclass for the errno, as open()
    error = error.__cause__ or error.__context__
  return None


class _HeldRecords(logging.Filter):
  """Holds the errors orbax's threads log (with a traceback apiece) and those asyncio logs for
  the futures a failed write leaves behind; `replay` logs them after all. A save the disk
  refused drops them: its caller reports that in one line."""

  def __init__(self, loggers: list[logging.Logger]):
    super().__init__()
    self.loggers, self.records = loggers, []

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR and record.exc_info:
      self.records.append(record)
      return False
    return True

  def release(self) -> None:
    for logger in self.loggers:
      logger.removeFilter(self)

  def replay(self) -> None:
    self.release()
    for record in self.records:
      logging.getLogger(record.name).handle(record)
    self.records = []


@contextlib.contextmanager
def _held_thread_errors():
  held = _HeldRecords([logging.getLogger("absl"), logging.getLogger("asyncio")])
  for logger in held.loggers:
    logger.addFilter(held)
  try:
    yield held
  finally:
    held.release()


class _AbandonedWriteErrors(logging.Filter):
  """Drops asyncio's "exception was never retrieved" for a future whose write the disk refused:
  orbax abandons those when its first write fails, and that failure has been reported; the
  traceback would come whenever the future is collected (often at exit)."""

  def filter(self, record: logging.LogRecord) -> bool:
    exception = record.exc_info[1] if record.exc_info else None
    return (exception is None or "never retrieved" not in str(record.msg)
            or _refused_write(exception, "") is None)


_ABANDONED_WRITE_ERRORS = _AbandonedWriteErrors()


def _quiet_abandoned_futures() -> None:
  logging.getLogger("asyncio").addFilter(_ABANDONED_WRITE_ERRORS)  # once: a filter set


@contextlib.contextmanager
def _quiet_closed_loops():
  """After a failed write orbax closes its event loop while tensorstore still holds callbacks
  into it; each then fails with "Event loop is closed", printed as an unraisable exception (a
  traceback) although nothing more is lost. Those are dropped; any other is printed."""
  previous = sys.unraisablehook

  def hook(unraisable):
    value = unraisable.exc_value
    if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
      previous(unraisable)
  sys.unraisablehook = hook
  try:
    yield
  finally:
    sys.unraisablehook = previous


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings where the arrays have them) to restore into."""
  def one(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)
  return jax.tree_util.tree_map(one, tree)
