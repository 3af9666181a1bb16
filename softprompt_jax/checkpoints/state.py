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
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import time
import warnings
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from softprompt_jax.pretrained import sha256

# Files above this size are fingerprinted by their size and first/last blocks, not fully hashed:
# hashing a 40 GB XXL checkpoint at every start would cost minutes.
_FULL_HASH_LIMIT = 64 * 2 ** 20
_BLOCK = 16 * 2 ** 20
INTEGRITY_FILE = "sha256sums.json"


def _file_digests(step_dir: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(step_dir)): sha256(p) for p in sorted(step_dir.rglob("*"))
          if p.is_file() and p.name != INTEGRITY_FILE}


def fingerprint(path) -> str:
  """A sha256 over a checkpoint's file names, sizes and contents (head and tail of big files)."""
  path = pathlib.Path(path)
  files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
  digest = hashlib.sha256()
  for file in files:
    size = file.stat().st_size
    digest.update(f"{file.relative_to(path) if file != path else file.name}:{size}\n".encode())
    with open(file, "rb") as f:
      if size <= _FULL_HASH_LIMIT:
        digest.update(f.read())
      else:
        digest.update(f.read(_BLOCK))
        f.seek(size - _BLOCK)
        digest.update(f.read(_BLOCK))
  return digest.hexdigest()


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
        preservation_policy=policies.AnyPreservationPolicy(keep), create=True,
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
    self._manager.save(step, args=args, metrics=clean, force=True)
    self._manager.wait_until_finished()
    if jax.process_index() == 0:
      step_dir = self.directory / str(step)
      tmp = step_dir / (INTEGRITY_FILE + ".tmp")
      tmp.write_text(json.dumps(_file_digests(step_dir), indent=0))
      os.replace(tmp, step_dir / INTEGRITY_FILE)  # atomic: the file is whole or absent

  def damage(self, step: int) -> Optional[str]:
    """Why `step`'s files are not the ones saved (one line), or None when they are (or when the
    step predates its checksums, e.g. a crash right after orbax's rename)."""
    step_dir = self.directory / str(step)
    sums = step_dir / INTEGRITY_FILE
    if not sums.is_file():
      return None
    try:
      expected = json.loads(sums.read_text())
    except ValueError:
      return f"{sums} is not valid JSON"
    actual = _file_digests(step_dir)
    missing = sorted(set(expected) - set(actual))
    if missing:
      return f"missing files {missing[:3]}"
    changed = sorted(name for name in expected if expected[name] != actual[name])
    if changed:
      return f"contents changed since saving: {changed[:3]}"
    return None

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


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings where the arrays have them) to restore into."""
  def one(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)
  return jax.tree_util.tree_map(one, tree)
