"""The training loop: `train` (prompt tuning, or model tuning with trainable='.*'), resumable.

A run: check every value and every split (before anything is read) -> set up (run_setup) ->
masked optimizer and sharded step -> resume from the latest good checkpoint -> steps, with
periodic evaluation and prompt-only checkpoints; on SIGTERM / SIGINT a checkpoint and `Preempted`
-> the best prompt, curves and, last, the summary that marks the run finished. Every process runs
all of it (checkpoints are saved collectively); only process 0 writes other files."""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from softprompt_jax import config_checks as cc
from softprompt_jax import optim, partitioning, paths, preemption, prompts
from softprompt_jax import sweep
from softprompt_jax import train_step as ts
from softprompt_jax.checkpoints.integrity import fingerprint
from softprompt_jax.checkpoints.state import PromptCheckpoints, abstract_like
from softprompt_jax.data import pipeline
from softprompt_jax.errors import ConfigError
from softprompt_jax.evaluation import run_eval
from softprompt_jax.methods import Method, PromptTuning
from softprompt_jax.model_spec import ModelSpec
from softprompt_jax.prompted_t5 import PLACEMENTS
from softprompt_jax.run_dir import completed_summary, last_logged_loss, write_results
from softprompt_jax.run_layout import CHECKPOINT_SUBDIR
from softprompt_jax.run_log import RunLog
from softprompt_jax.run_setup import TASK_RULE, check_same_run, data_identity, setup_run

ALREADY_COMPLETE = "already_complete"  # in train's result: a rerun that changed nothing


def _is_optimizer(value) -> bool:
  return callable(getattr(value, "init", None)) and callable(getattr(value, "update", None))


# What each of train's parameters accepts (checked first thing, before anything is read).
TRAIN_RULES = {
    "model_dir": cc.path(), "model": cc.instance(ModelSpec, "@frozen_model()"),
    "task": TASK_RULE, "vocabulary": cc.text(optional=True),
    "data_source": cc.data_source(), "prompt_length": cc.integer(0),
    "prompt_init": cc.function("an initializer such as @prompts.class_labels"),
    "placement": cc.one_of(*PLACEMENTS), "trainable": cc.texts(optional=True),
    "optimizer": cc.Rule("an optax optimizer such as @optim.adafactor()", _is_optimizer,
                         optional=True),
    "num_steps": cc.POSITIVE, "batch_size": cc.POSITIVE, "input_length": cc.POSITIVE,
    "target_length": cc.POSITIVE, "dropout_rate": cc.number(0, 1, high_open=True, optional=True),
    "z_loss": cc.number(0), "label_smoothing": cc.number(0, 1, high_open=True),
    "loss_normalizer": cc.Rule("'num_real_target_tokens', 'sum' or a number > 0",
                               lambda v: v in ("num_real_target_tokens", "sum")
                               or cc.number(0, low_open=True).test(v)),
    "eval_every": cc.POSITIVE,
    # Its logs go to a directory of that name beside train's.
    "eval_split": cc.Rule("a split name other than 'train' (no '/')",
                          lambda v: (cc.text().test(v) and v != "train" and "/" not in v
                                     and v not in (".", ".."))),
    "eval_max_examples": cc.integer(1, optional=True), "best_metric": cc.text(optional=True),
    "best_mode": cc.one_of("max", "min"), "keep_checkpoints": cc.POSITIVE,
    "num_partitions": cc.POSITIVE, "mesh_shape": cc.integers(1, optional=True),
    "parameter_partitioning_dims": cc.integer(1, 2),
    "activation_partitioning_dims": cc.integer(1, 2), "seed": cc.SEED,
    "log_every": cc.POSITIVE, "stop_after_steps": cc.integer(1, optional=True),
    "bad_records": cc.one_of("error", "skip"),
    "method": cc.instance(Method, "a method such as @methods.prompt_tuning()", optional=True),
    "members": sweep.MEMBERS_RULE,
}


def train(*, model_dir: str, model: ModelSpec, task: str, vocabulary=None, data_source=None,
          prompt_length: int = 100, prompt_init: Callable = prompts.class_labels,
          placement: str = "prepend", trainable: Optional[Sequence[str]] = None,
          optimizer=None, num_steps: int = 30000, batch_size: int = 32, input_length: int = 512,
          target_length: int = 8, dropout_rate: Optional[float] = 0.1, z_loss: float = 1e-4,
          label_smoothing: float = 0.0,
          loss_normalizer: str | float = "num_real_target_tokens", eval_every: int = 1000,
          eval_split: str = "validation", eval_max_examples: Optional[int] = None,
          best_metric: Optional[str] = None, best_mode: str = "max", keep_checkpoints: int = 2,
          num_partitions: int = 1, mesh_shape: Optional[Sequence[int]] = None,
          parameter_partitioning_dims: int = 1, activation_partitioning_dims: int = 1,
          seed: int = 0, log_every: int = 50, stop_after_steps: Optional[int] = None,
          bad_records: str = "error", method: Optional[Method] = None,
          members: Optional[dict] = None) -> dict:
  """Prompt tuning (or, with trainable='.*', model tuning; or another `method`: per-layer
  prompts, IA3, ...); resumes when run again. `trainable` defaults to what the method trains.
  `members` ({name: {gin parameter: value}}) makes it a sweep of runs (sweep.py, sweep_plan.py).

  SIGTERM or SIGINT (an eviction notice, Ctrl-C) finishes the current step, saves a checkpoint
  there (at the same step in every process) and raises `preemption.Preempted`; running again
  resumes from it. `stop_after_steps` ends this invocation early without a checkpoint of its
  own, leaving the periodic ones to resume from; tests use it.
  """
  cc.check("train", locals(), TRAIN_RULES)
  start_time = time.time()
  method = method if method is not None else PromptTuning()
  trainable = method.trainable if trainable is None else trainable
  model_dir = paths.local_path(model_dir, "train.model_dir")  # `~` expanded; a URL refused
  _check_train_values(model_dir, prompt_length, trainable)
  if members is not None:  # a sweep: every member over one loaded frozen model (sweep.py)
    return sweep.train_members(members, dict(locals()))
  finished = completed_summary(model_dir, num_steps, prompt_length if method.has_prompt else 0)
  if finished is not None:  # a rerun of a finished run: every file stays as it is
    print(f"{model_dir}: already complete at step {finished['steps']}; nothing to do",
          file=sys.stderr, flush=True)
    return {**finished, ALREADY_COMPLETE: True}
  # Every split the run reads, read now: a bad record or an empty split stops the run before
  # the model is loaded and anything is written, not at the first evaluation (cached for later).
  pipeline.check_splits(task, data_source, evals=(eval_split,), bad_records=bad_records)
  identity = data_identity(seed, data_source)
  setup = setup_run(model=model, task=task, vocabulary=vocabulary, prompt_length=prompt_length,
                    prompt_init=prompt_init, placement=placement, trainable=trainable,
                    num_partitions=num_partitions, mesh_shape=mesh_shape,
                    parameter_partitioning_dims=parameter_partitioning_dims,
                    activation_partitioning_dims=activation_partitioning_dims,
                    dropout_rate=dropout_rate, seed=seed, batch_size=batch_size,
                    input_length=input_length, target_length=target_length,
                    resume_dir=model_dir, resume_identity=identity, method=method)
  best_metric = best_metric or (getattr(setup.task, "metric_names", None) or ["accuracy"])[0]
  optimizer = optim.masked_optimizer(optimizer if optimizer is not None else optim.adafactor(),
                                     setup.labels)
  primary = partitioning.is_primary_process()
  state, frozen = ts.init_train_state(setup.params, setup.labels, optimizer)
  train_step, _, shardings = ts.sharded_steps(
      setup.model, optimizer, setup.partitioner, *jax.eval_shape(lambda: (state, frozen)),
      ts.LossConfig(z_loss, label_smoothing, loss_normalizer, method.regularizer))
  state = jax.device_put(state, shardings["state"])
  frozen = jax.device_put(frozen, shardings["frozen"])

  meta = {"model": model.describe(), "task": setup.task.name, "prompt_length": prompt_length,
          "placement": placement, "trainable": list(trainable), "config": setup.config.to_dict(),
          "method": method.describe(),
          "best_metric": best_metric, "best_mode": best_mode,
          "vocabulary": vocabulary if isinstance(vocabulary, str) else None,
          "model_fingerprint": fingerprint(model.checkpoint) if model.checkpoint else None,
          **identity}
  checkpoints = PromptCheckpoints(model_dir / CHECKPOINT_SUBDIR, keep_last=keep_checkpoints,
                                  best_metric=best_metric, best_mode=best_mode)
  batches = pipeline.train_batches(setup.task, "train", setup.vocabulary, source=data_source,
                                   batch_size=batch_size, input_length=input_length,
                                   target_length=target_length, seed=seed,
                                   rows=setup.partitioner.process_rows(batch_size),
                                   bad_records=bad_records)
  state, resumed_meta, notes = _resume(checkpoints, state, batches, meta, model_dir)
  start_step = int(state.step)
  last_eval = (resumed_meta or {}).get("metrics")  # the summary's, if no step is left to run
  model_dir.mkdir(parents=True, exist_ok=True)

  log = RunLog(model_dir, num_steps, start_step=start_step, enabled=primary,
               batch_size=batch_size, learning_rate=optim.learning_rate_of(optimizer))
  for note in notes:
    log.message(note)
  rng = jax.random.PRNGKey(seed)
  step = start_step
  unchecked = []  # (step, metrics) since the last check
  pending_tokens = 0
  preempted = None
  try:
    with preemption.StopSignals() as signals:
      while step < num_steps:
        local = next(batches).arrays
        global_batch = setup.partitioner.shard_batch(local, batch_size)
        state, metrics = train_step(state, frozen, global_batch, rng)
        step += 1
        unchecked.append((step, metrics))
        pending_tokens += jax.process_count() * int(np.sum(local["encoder_input_tokens"] > 0)
                                                    + np.sum(local["decoder_target_tokens"] > 0))
        if step % log_every == 0 or step == num_steps or step % eval_every == 0:
          ts.check_finite(unchecked)
          values = {k: float(v) for k, v in metrics.items() if k != ts.FINITE_TRAINABLE}
          log.log_train(step, values, pending_tokens)
          pending_tokens = 0
        saved = False
        if step % eval_every == 0 or step == num_steps:
          params = optim.merge(state.trainable, frozen)
          last_eval = run_eval(setup, params, eval_split, data_source=data_source,
                               batch_size=batch_size, input_length=input_length,
                               target_length=target_length, max_examples=eval_max_examples,
                               bad_records=bad_records)
          log.log_eval(step, last_eval, eval_split)
          checkpoints.save(step, state, batches.state(), meta, last_eval)
          saved = True
        if step < num_steps and signals.should_stop():  # every process answers alike
          if not saved:
            ts.check_finite(unchecked)
            checkpoints.save(step, state, batches.state(), meta)
          preempted = preemption.Preempted(step, signals.stop_signal,
                                           checkpoints.directory / str(step))
          break
        if stop_after_steps is not None and step - start_step >= stop_after_steps:
          break
  finally:
    log.close()
  try:
    if preempted is not None:
      raise preempted
    summary = {"steps": step, "wall_time_s": time.time() - start_time,
               "best_metric": best_metric, "model_dir": str(model_dir),
               "data": dataclasses.asdict(batches.stats)}
    if step >= num_steps:
      # A run stopped during its final save has trained every step: the loss is in its log.
      final_loss = (float(metrics["loss"]) if step > start_step
                    else last_logged_loss(model_dir, step))
      write_results(summary, checkpoints, state, model_dir, final_loss=final_loss,
              final_eval=last_eval, with_prompt=bool(prompt_length) and method.has_prompt,
              primary=primary)
    return summary
  finally:
    checkpoints.close()


def _check_train_values(model_dir: pathlib.Path, prompt_length: int, trainable) -> None:
  """What the per-parameter rules cannot see: the run directory, and the parameters together."""
  if model_dir.exists() and not model_dir.is_dir():
    raise ConfigError(f"--model_dir {model_dir} is a file; give a directory (new or a run's)")
  patterns = (trainable,) if isinstance(trainable, str) else tuple(trainable)
  if prompt_length == 0 and patterns == optim.PROMPT_ONLY:
    raise ConfigError("train.prompt_length = 0 leaves nothing to train (the prompt is the "
                      "trainable part); use a prompt length >= 1 (the paper: 1..150), or "
                      "train.trainable = ['.*'] for model tuning")


def _resume(checkpoints: PromptCheckpoints, state, batches, meta: dict, model_dir):
  """(state, the resumed checkpoint's meta or None, notes for the log) after restoring the
  latest good checkpoint, its data position included; damaged ones are set aside."""
  restored, damaged = checkpoints.restore_latest(abstract_like(state))
  notes = [f"checkpoint {step} is damaged ({reason}); set aside" for step, reason in damaged]
  if restored is None:
    return state, None, notes
  latest, state, position, saved_meta = restored
  check_same_run(saved_meta, meta, model_dir)
  try:
    batches.restore(position)
  except ValueError as e:  # the same files, edited: the saved position means other examples
    raise ConfigError(f"{model_dir}: cannot resume, the training data changed: {e}; use a "
                      "new --model_dir or restore the original data") from None
  notes.append(f"resumed from {checkpoints.directory / str(latest)} at step {int(state.step)}")
  return state, saved_meta, notes
