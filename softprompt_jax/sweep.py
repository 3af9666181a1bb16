"""A sweep: `train(members=...)` trains every member over one loaded frozen model.

Members with the same prompt length (sweep_plan.groups) train together: their states are
stacked and one compiled step (sweep_step) takes them all a step at a time, each on its own
batches, dropout and optimizer hyperparameters. Each member has a normal run directory,
`<model_dir>/members/<name>/`: checkpoints in the single-run format, metrics.jsonl, TensorBoard
events, summary.json, prompt.npy, curves.png, and (when run from the command line) a config.gin
that trains it alone. `eval`, `export`, `interpret` and `infer` take it as they take any run.
Running the same sweep again skips the finished members and resumes the others from their own
latest checkpoints (members stopped at different steps train in separate groups).
`<model_dir>/sweep.json` lists the members' results once all are finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import re
import sys
import time
from typing import Mapping, Optional

import gin
import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from softprompt_jax import config_checks as cc
from softprompt_jax import optim, output_files, partitioning, preemption, prompts, progress
from softprompt_jax import sweep_plan, sweep_step
from softprompt_jax import train_step as ts
from softprompt_jax.checkpoints.integrity import fingerprint
from softprompt_jax.checkpoints.state import PromptCheckpoints, abstract_like
from softprompt_jax.data import pipeline
from softprompt_jax.errors import ConfigError, NumericalError
from softprompt_jax.evaluation import run_eval
from softprompt_jax.prompted_t5 import prompt_shape
from softprompt_jax.run_dir import completed_summary, last_logged_loss, read_meta, write_results
from softprompt_jax.run_layout import (CHECKPOINT_SUBDIR, CONFIG_FILE, OPERATIVE_CONFIG_FILE,
                                       SUMMARY_FILE)
from softprompt_jax.run_lock import RunLock
from softprompt_jax.run_log import RunLog
from softprompt_jax.run_setup import (check_same_run, data_identity, load_vocabulary,
                                      model_config, prompt_initializer, run_task, setup_run)
from softprompt_jax.sweep_plan import MEMBERS_RULE, Member
from softprompt_jax.t5 import T5, logical_axes

ALREADY_COMPLETE = "already_complete"  # the key training_loop.ALREADY_COMPLETE names
SWEEP_FILE = "sweep.json"


class _Quiet:
  """A stream that drops what is written: the members' own progress lines (the sweep shows
  one line for all of them)."""

  def write(self, text: str) -> int:
    return len(text)

  def flush(self) -> None:
    pass


@dataclasses.dataclass
class _Run:
  """A member being trained: its model, state and files."""
  member: Member
  net: object
  labels: dict
  single_shardings: dict
  state: ts.TrainState
  meta: dict
  checkpoints: PromptCheckpoints
  batches: object
  start_step: int = 0
  last_eval: Optional[dict] = None
  log: Optional[RunLog] = None
  pending_tokens: int = 0
  final_loss: Optional[float] = None


def train_members(members: Mapping, s: dict) -> dict:
  """Trains the sweep `members` (sweep_plan's surface) with `s`, train's other arguments
  (model_dir, method and trainable resolved). Returns {'model_dir', 'members': {name: its
  summary}, 'wall_time_s'}, with ALREADY_COMPLETE when every member had finished before."""
  start_time = time.time()
  model_dir = s["model_dir"]
  cc.check("train", {"members": members}, {"members": MEMBERS_RULE})
  optimizer = s["optimizer"] if s["optimizer"] is not None else optim.adafactor()
  planned = sweep_plan.plan(members, model_dir=model_dir, seed=s["seed"],
                            prompt_length=s["prompt_length"], prompt_init=s["prompt_init"],
                            optimizer=optimizer)
  with_prompt = s["method"].has_prompt  # (a method without one writes no prompt.npy)
  todo = [m for m in planned if completed_summary(
      m.run_dir, s["num_steps"], m.prompt_length if with_prompt else 0) is None]
  if not todo:
    print(f"{model_dir}: every member of the sweep is complete; nothing to do", file=sys.stderr,
          flush=True)
    return {**_finish(model_dir, planned, start_time, rewrite=False), ALREADY_COMPLETE: True}
  pipeline.check_splits(s["task"], s["data_source"], evals=(s["eval_split"],),
                        bad_records=s["bad_records"])
  task = run_task(s["task"], s["method"])  # a task, or a mixture for a prompt per task
  for m in todo:  # a member resumed with other settings is refused before anything is loaded
    saved = _saved_meta(m.run_dir)
    if saved is not None:
      check_same_run(saved, {"task": task.name, "prompt_length": m.prompt_length,
                             "trainable": list(s["trainable"]),
                             **data_identity(m.seed, s["data_source"])}, m.run_dir)
  vocabulary = load_vocabulary(s["vocabulary"])
  config = model_config(s["model"], {} if s["dropout_rate"] is None
                        else {"dropout_rate": s["dropout_rate"]})  # metadata only
  t5_paths = _frozen_paths(config, s["trainable"])
  for m in todo if s["method"].has_prompt else ():  # every prompt fits, before any loading
    prompts.check_fits(prompt_initializer(m.prompt_init, task, vocabulary),
                       prompt_shape(m.prompt_length, config.emb_dim), config.vocab_size,
                       config.emb_dim)
  first = todo[0]
  setup = setup_run(model=s["model"], task=task, vocabulary=s["vocabulary"],
                    prompt_length=first.prompt_length, prompt_init=first.prompt_init,
                    placement=s["placement"], trainable=s["trainable"],
                    num_partitions=s["num_partitions"], mesh_shape=s["mesh_shape"],
                    parameter_partitioning_dims=s["parameter_partitioning_dims"],
                    activation_partitioning_dims=s["activation_partitioning_dims"],
                    dropout_rate=s["dropout_rate"], seed=first.seed, batch_size=s["batch_size"],
                    input_length=s["input_length"], target_length=s["target_length"],
                    method=s["method"])
  frozen = unflatten_dict({k: v for k, v in flatten_dict(setup.params).items() if k in t5_paths})
  best_metric = s["best_metric"] or (getattr(setup.task, "metric_names", None)
                                     or ["accuracy"])[0]
  model = s["model"]
  meta = {"model": model.describe(), "task": setup.task.name, "placement": s["placement"],
          "trainable": list(s["trainable"]), "config": setup.config.to_dict(),
          "method": s["method"].describe(), "best_metric": best_metric,
          "best_mode": s["best_mode"],
          "vocabulary": s["vocabulary"] if isinstance(s["vocabulary"], str) else None,
          "model_fingerprint": fingerprint(model.checkpoint) if model.checkpoint else None}
  loss_config = ts.LossConfig(s["z_loss"], s["label_smoothing"], s["loss_normalizer"],
                              s["method"].regularizer)
  primary = partitioning.is_primary_process()
  sweep_config = model_dir / CONFIG_FILE
  sweep_config = sweep_config.read_text() if primary and sweep_config.is_file() else None
  frozen_placed = None
  with contextlib.ExitStack() as stack, preemption.StopSignals() as signals:
    plan_groups = sweep_plan.groups(todo)
    for index, group in enumerate(plan_groups, 1):
      _check_group_fits(setup, s, group)
      runs = []
      for m in group:  # the members of a group share their shardings: computed once
        runs.append(_start(m, setup, frozen, s, meta, best_metric, loss_config, stack, primary,
                           runs[0].single_shardings if runs else None))
      if frozen_placed is None:
        frozen_placed = jax.device_put(frozen, runs[0].single_shardings["frozen"])
      for start in sorted({r.start_step for r in runs}):
        same_start = [r for r in runs if r.start_step == start]
        for r in same_start:
          _write_member_config(sweep_config, r.member, model_dir)
          r.log = stack.enter_context(RunLog(
              r.member.run_dir, s["num_steps"], start_step=start, enabled=primary,
              stream=_Quiet(), tty=False, batch_size=s["batch_size"],
              learning_rate=optim.learning_rate_of(r.member.optimizer)))
        label = (f"sweep {index}/{len(plan_groups)}: {len(same_start)} members, prompt length "
                 f"{group[0].prompt_length}")
        finished = _train_group(same_start, setup, frozen_placed, s, loss_config, signals,
                                label)
        if not finished:  # stop_after_steps: this invocation ends here
          return {"model_dir": str(model_dir), "wall_time_s": time.time() - start_time,
                  "members": {}}
        for r in same_start:
          _write_results(r, s, start_time, best_metric, primary)
  return _finish(model_dir, planned, start_time)


def _saved_meta(run_dir: pathlib.Path) -> Optional[dict]:
  try:
    return read_meta(run_dir)
  except Exception:  # an unreadable step: the resume reports it and sets it aside
    return None


def _frozen_paths(config, trainable) -> set:
  """The paths of the frozen T5's params, from its configuration alone (every member adds its
  own trainable ones to these). A sweep shares them, so what it trains must be the method's
  own parameters, not the model's: refused here, before the weights are read."""
  t5_paths = set(flatten_dict(logical_axes(T5(config))))
  patterns = [trainable] if isinstance(trainable, str) else list(trainable)
  shared = sorted(k for k in t5_paths if any(re.fullmatch(p, "/".join(k)) for p in patterns))
  if shared:
    raise ConfigError(f"train.trainable matches the frozen model's {'/'.join(shared[0])} (and "
                      f"{len(shared) - 1} more): a sweep shares one frozen model and trains the "
                      "method's own parameters (the prompt); train model tuning runs one by one")
  return t5_paths


def _check_group_fits(setup, s: dict, group: list[Member]) -> None:
  """The members' activations together fit a device (one step holds all of them)."""
  data_axis = setup.partitioner.mesh.shape["data"]
  cc.check_activations_fit(
      setup.config, who=f"a sweep group of {len(group)} members x batch_size {s['batch_size']}",
      examples_per_device=len(group) * max(1, s["batch_size"] // data_axis),
      prompt_length=group[0].prompt_length, input_length=s["input_length"],
      target_length=s["target_length"], device=setup.partitioner.mesh.devices.flat[0])


def _start(m: Member, setup, frozen: dict, s: dict, meta: dict, best_metric: str, loss_config,
           stack: contextlib.ExitStack, primary: bool, single: Optional[dict]) -> _Run:
  """A member's initial state (its prompt made as a single run makes it), restored from its
  latest checkpoint when it has one, with its data at the same position."""
  init = (prompt_initializer(m.prompt_init, setup.task, setup.vocabulary) if m.prompt_length
          else None)
  net = s["method"].model(setup.config, prompt_length=m.prompt_length, prompt_init=init,
                          num_prompts=len(setup.task) if s["method"].mixes_tasks else None,
                          placement=s["placement"])
  params = s["method"].init_params(net, frozen, jax.random.PRNGKey(m.seed), None)
  labels = optim.param_labels(params, tuple(s["trainable"]))
  optimizer = optim.masked_optimizer(m.optimizer, labels)
  state, frozen_part = ts.init_train_state(params, labels, optimizer)
  if single is None:  # one member's shardings, as a single run's (its checkpoints restore so)
    _, _, single = ts.sharded_steps(net, optimizer, setup.partitioner,
                                    *jax.eval_shape(lambda: (state, frozen_part)), loss_config)
  state = jax.device_put(state, single["state"])
  if primary:
    m.run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(m.run_dir).acquire()
    stack.callback(lock.release)
  member_meta = {**meta, "prompt_length": m.prompt_length,
                 **data_identity(m.seed, s["data_source"]),
                 "sweep": {"model_dir": str(m.run_dir.parent.parent), "member": m.name}}
  checkpoints = PromptCheckpoints(m.run_dir / CHECKPOINT_SUBDIR, keep_last=s["keep_checkpoints"],
                                  best_metric=best_metric, best_mode=s["best_mode"])
  stack.callback(checkpoints.close)
  batches = pipeline.train_batches(setup.task, "train", setup.vocabulary,
                                   source=s["data_source"], batch_size=s["batch_size"],
                                   input_length=s["input_length"],
                                   target_length=s["target_length"], seed=m.seed,
                                   rows=setup.partitioner.process_rows(s["batch_size"]),
                                   bad_records=s["bad_records"])
  run = _Run(m, net, labels, single, state, member_meta, checkpoints, batches)
  restored, damaged = checkpoints.restore_latest(abstract_like(state))
  for step, reason in damaged:
    print(f"{m.name}: checkpoint {step} is damaged ({reason}); set aside", file=sys.stderr)
  if restored is not None:
    _, run.state, position, saved_meta = restored
    check_same_run(saved_meta, member_meta, m.run_dir)
    try:
      batches.restore(position)
    except ValueError as e:
      raise ConfigError(f"{m.run_dir}: cannot resume, the training data changed: {e}; use a "
                        "new --model_dir or restore the original data") from None
    run.start_step = int(run.state.step)
    run.last_eval = saved_meta.get("metrics")
  return run


def _write_member_config(sweep_config: Optional[str], m: Member, model_dir) -> None:
  """`config.gin` of a member (from the sweep's, written by the command line): train with it
  to train this member alone."""
  text = None if sweep_config is None else sweep_plan.member_config(sweep_config, m, model_dir)
  path = m.run_dir / CONFIG_FILE
  if text is not None and (not path.is_file() or path.read_text() != text):
    output_files.write_text(path, text)


def _train_group(runs: list[_Run], setup, frozen, s: dict, loss_config, signals,
                 label: str) -> bool:
  """Trains `runs` (same prompt length, same start step) to num_steps with one compiled step;
  False when stop_after_steps ended it early. Evaluates and checkpoints every member as a
  single run does; on SIGTERM / SIGINT saves them all and raises `preemption.Preempted`."""
  num_steps, eval_every, batch_size = s["num_steps"], s["eval_every"], s["batch_size"]
  members = [r.member for r in runs]
  traced = sweep_plan.traced_settings(members)
  first = runs[0]

  def optimizer_for(hyper: dict):
    if first.member.optimizer_name is None:
      return optim.masked_optimizer(first.member.optimizer, first.labels)
    return optim.masked_optimizer(optim.transformation(
        first.member.optimizer_name, {**first.member.optimizer_settings, **hyper}), first.labels)

  step_fn, shardings = sweep_step.sharded_members_step(first.net, optimizer_for,
                                                       setup.partitioner,
                                                       first.single_shardings, loss_config)
  states = jax.device_put(sweep_step.stack([r.state for r in runs]), shardings["state"])
  rngs = jax.device_put(np.stack([np.asarray(jax.random.PRNGKey(m.seed)) for m in members]),
                        setup.partitioner.replicated)
  hyper = {k: np.asarray([m.optimizer_settings[k] for m in members], np.float32) for k in traced}
  group_setup = dataclasses.replace(setup, model=first.net, labels=first.labels)
  step = start = first.start_step
  unchecked, metrics = [], None
  with progress.Progress(label, num_steps - start, unit="steps") as shown:
    while step < num_steps:
      local = [next(r.batches).arrays for r in runs]
      batch = sweep_step.shard_batches(setup.partitioner, local, batch_size, shardings["batch"])
      states, metrics = step_fn(states, frozen, batch, rngs, hyper)
      step += 1
      unchecked.append((step, metrics))
      for r, arrays in zip(runs, local):
        r.pending_tokens += jax.process_count() * int(np.sum(arrays["encoder_input_tokens"] > 0)
                                                      + np.sum(arrays["decoder_target_tokens"] > 0))
      if step % s["log_every"] == 0 or step == num_steps or step % eval_every == 0:
        losses = _check_and_log(runs, unchecked, step)
        shown.update(step - start, note=f"loss {min(losses):.4g}..{max(losses):.4g}")
      saved = False
      if step % eval_every == 0 or step == num_steps:
        for i, r in enumerate(runs):
          params = optim.merge(sweep_step.member(states.trainable, i), frozen)
          r.last_eval = run_eval(group_setup, params, s["eval_split"],
                                 data_source=s["data_source"], batch_size=batch_size,
                                 input_length=s["input_length"],
                                 target_length=s["target_length"],
                                 max_examples=s["eval_max_examples"],
                                 bad_records=s["bad_records"])
          r.log.log_eval(step, r.last_eval, s["eval_split"])
          shown.message(f"{r.member.name}: {s['eval_split']} @ step {step}: "
                        + ", ".join(f"{k} {v:.4g}" for k, v in r.last_eval.items()))
          r.checkpoints.save(step, sweep_step.member(states, i), r.batches.state(), r.meta,
                             r.last_eval)
        saved = True
      if step < num_steps and signals.should_stop():  # every process answers alike
        if not saved:
          _check_and_log(runs, unchecked, step, log=False)
          for i, r in enumerate(runs):
            r.checkpoints.save(step, sweep_step.member(states, i), r.batches.state(), r.meta)
        where = first.member.run_dir.parent / f"<member>/{CHECKPOINT_SUBDIR}/{step}"
        raise preemption.Preempted(step, signals.stop_signal, where)
      if s["stop_after_steps"] is not None and step - start >= s["stop_after_steps"]:
        return False
  for i, r in enumerate(runs):
    r.state = sweep_step.member(states, i)
    r.final_loss = (float(metrics["loss"][i]) if metrics is not None
                    else last_logged_loss(r.member.run_dir, step))
  return True


def _check_and_log(runs: list[_Run], unchecked: list, step: int, log: bool = True) -> list:
  """Checks every member's steps since the last check (a NaN names the member and the step),
  then logs each member's metrics at `step`; returns their losses."""
  host = jax.device_get([m for _, m in unchecked])
  steps = [st for st, _ in unchecked]
  unchecked.clear()
  losses = []
  for i, r in enumerate(runs):
    mine = [(st, {k: v[i] for k, v in m.items()}) for st, m in zip(steps, host)]
    try:
      ts.check_finite(list(mine))  # (it empties the list it checks)
    except NumericalError as e:
      raise NumericalError(f"sweep member {r.member.name!r}: {e}") from None
    values = {k: float(v) for k, v in mine[-1][1].items() if k != ts.FINITE_TRAINABLE}
    losses.append(values["loss"])
    if log:
      r.log.log_train(step, values, r.pending_tokens)
      r.pending_tokens = 0
  return losses


def _write_results(r: _Run, s: dict, start_time: float, best_metric: str,
                   primary: bool) -> None:
  """A finished member's results, as a single run writes them (the summary last)."""
  r.log.close()
  summary = {"steps": s["num_steps"], "wall_time_s": time.time() - start_time,
             "best_metric": best_metric, "model_dir": str(r.member.run_dir),
             "data": dataclasses.asdict(r.batches.stats), "sweep": r.meta["sweep"]}
  own = sweep_plan.member_bindings(r.member, r.member.run_dir.parent.parent)
  if primary and own is not None and (r.member.run_dir / CONFIG_FILE).is_file():
    # As the command line records a run: the operative config marks it complete.
    output_files.write_text(r.member.run_dir / OPERATIVE_CONFIG_FILE,
                            gin.operative_config_str().rstrip("\n") + "\n\n" + own)
  write_results(summary, r.checkpoints, r.state, r.member.run_dir, final_loss=r.final_loss,
                final_eval=r.last_eval, with_prompt=s["method"].has_prompt, primary=primary)


def _finish(model_dir: pathlib.Path, planned: list[Member], start_time: float,
            rewrite: bool = True) -> dict:
  """The sweep's result: every member's summary, also written to <model_dir>/sweep.json (kept
  as it is when not `rewrite`: a rerun of a finished sweep)."""
  if not rewrite and (model_dir / SWEEP_FILE).is_file():
    return json.loads((model_dir / SWEEP_FILE).read_text())
  results = {}
  for m in planned:
    try:
      results[m.name] = json.loads((m.run_dir / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
      results[m.name] = None
  result = {"model_dir": str(model_dir), "wall_time_s": time.time() - start_time,
            "members": results}
  if partitioning.is_primary_process():
    output_files.write_text(model_dir / SWEEP_FILE, json.dumps(result, indent=2) + "\n")
  return result
