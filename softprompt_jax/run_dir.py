"""A run directory (its layout is in `run_layout`): the settings it was trained with, its best
prompt, whether it is finished, and the results that finish it."""

from __future__ import annotations

import contextlib
import json
import pathlib
from typing import Iterator, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from softprompt_jax import prompted_t5, prompts
from softprompt_jax.checkpoints.state import PromptCheckpoints, abstract_like
from softprompt_jax.run_layout import (CHECKPOINT_SUBDIR, CONFIG_FILE, OPERATIVE_CONFIG_FILE,
                                       PROMPT_FILE, SUMMARY_FILE)
from softprompt_jax.curves import plot_curves
from softprompt_jax.run_log import read_metrics
from softprompt_jax.run_summary import write_summary


@contextlib.contextmanager
def _checkpoints(model_dir, **ranking) -> Iterator[PromptCheckpoints]:
  checkpoints = PromptCheckpoints(pathlib.Path(model_dir) / CHECKPOINT_SUBDIR, **ranking)
  try:
    yield checkpoints
  finally:
    checkpoints.close()


def read_meta(model_dir) -> Optional[dict]:
  """The settings the run recorded with its latest checkpoint (model, task, prompt length,
  trainable, seed, data, best metric, …); None when it has no checkpoint yet."""
  if not (pathlib.Path(model_dir) / CHECKPOINT_SUBDIR).is_dir():
    return None
  with _checkpoints(model_dir) as checkpoints:
    steps = checkpoints.steps()
    return checkpoints.restore_meta(steps[-1]) if steps else None


def required_meta(model_dir) -> dict:
  """`read_meta`, or FileNotFoundError saying there is nothing to read the settings from."""
  meta = read_meta(model_dir)
  if meta is None:
    raise FileNotFoundError(f"{model_dir}: no checkpoints to read the run's settings from; "
                            "train first")
  return meta


def best_step(model_dir, meta: dict) -> Optional[int]:
  """The best step by the metric and mode the run recorded (`meta`), else the latest."""
  ranking = ({"best_metric": meta["best_metric"], "best_mode": meta.get("best_mode", "max")}
             if meta.get("best_metric") else {})
  with _checkpoints(model_dir, **ranking) as checkpoints:
    return (checkpoints.best_step() if ranking else None) or checkpoints.latest_step()


def best_prompt(model_dir) -> np.ndarray:
  """A run's best (else latest) prompt [P, H]: its exported prompt.npy, or from checkpoints."""
  model_dir = pathlib.Path(model_dir)
  exported = model_dir / PROMPT_FILE
  if exported.is_file():
    return prompts.load_npy(exported)
  meta = read_meta(model_dir)
  if meta is None:
    raise FileNotFoundError(f"{model_dir}: no {PROMPT_FILE} and no checkpoints; train first")

  step_dir = model_dir / CHECKPOINT_SUBDIR / str(best_step(model_dir, meta)) / "state"
  # The trained state's tree as saved, without building a model to restore it into.
  restored = ocp.StandardCheckpointer().restore(step_dir.absolute())
  return np.asarray(prompted_t5.get_prompt(restored["trainable"]), np.float32)


def best_trainable(model_dir) -> dict:
  """The trained subtree (every parameter the run's method trains) of a run's best, else
  latest, checkpoint, as numpy arrays."""
  model_dir = pathlib.Path(model_dir)
  meta = read_meta(model_dir)
  if meta is None:
    raise FileNotFoundError(f"{model_dir}: no checkpoints; train first")
  step_dir = model_dir / CHECKPOINT_SUBDIR / str(best_step(model_dir, meta)) / "state"
  restored = ocp.StandardCheckpointer().restore(step_dir.absolute())
  return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), restored["trainable"])


def completed_summary(model_dir: pathlib.Path, num_steps: int,
                      prompt_length: int) -> Optional[dict]:
  """The saved summary of a run that trained `num_steps` and wrote its results (summary, and
  the prompt when it has one); None while anything is left to do."""
  try:
    summary = json.loads((model_dir / SUMMARY_FILE).read_text())
  except (OSError, ValueError):
    return None
  if not isinstance(summary, dict) or not isinstance(summary.get("steps"), int):
    return None
  if summary["steps"] < num_steps or (prompt_length and not (model_dir / PROMPT_FILE).is_file()):
    return None
  # A run recorded by the command line (config.gin) has its operative config among its results;
  # without it (a full disk stopped that last write) the same command finalizes the run again
  # from its checkpoints, so the operative config written is the run's, not a no-op rerun's.
  if (model_dir / CONFIG_FILE).is_file() and not (model_dir / OPERATIVE_CONFIG_FILE).is_file():
    return None
  return summary


def write_results(summary: dict, checkpoints: PromptCheckpoints, state, model_dir: pathlib.Path, *,
            final_loss: Optional[float], final_eval: Optional[dict], with_prompt: bool,
            primary: bool) -> None:
  """The results of a run that trained every step: the best prompt, the curves and, last, the
  summary that marks the run finished (so a write that fails before it — a full disk — leaves
  a run the same command finalizes from its checkpoints). Every process takes part in
  restoring (orbax restores sharded arrays collectively); only process 0 writes."""
  best = checkpoints.best_step() or checkpoints.latest_step()
  summary["best_step"] = best
  best_prompt = None
  if best is not None:
    best_meta = checkpoints.restore_meta(best)
    summary["best_value"] = (best_meta.get("metrics") or {}).get(summary["best_metric"])
    if with_prompt:
      best_state, _, _ = checkpoints.restore(best, abstract_like(state))
      best_prompt = np.asarray(prompted_t5.get_prompt(best_state.trainable))
  summary["final_eval"] = final_eval
  summary["final_loss"] = final_loss
  if primary:
    if best_prompt is not None:
      prompts.save_npy(model_dir / PROMPT_FILE, best_prompt)
    plot_curves(model_dir)
    write_summary(model_dir, summary)


def last_logged_loss(model_dir: pathlib.Path, step: int) -> Optional[float]:
  logged = [r for r in read_metrics(model_dir, "train") if r.get("step") == step]
  return float(logged[-1]["loss"]) if logged and "loss" in logged[-1] else None
