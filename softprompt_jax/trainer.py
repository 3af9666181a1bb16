"""Runs: `train` (prompt tuning, resumable), `evaluate` and `infer` — plain functions gin binds.

The path of a run: validate the configuration (before anything expensive) -> mesh -> frozen T5
loaded into its shards -> PromptedT5 + prompt init from the real embedding -> masked optimizer ->
resume from the latest good checkpoint -> loop (sharded train step, periodic eval, prompt-only
checkpoints, logs on process 0; on SIGTERM a checkpoint and `Preempted`) -> best prompt exported,
summary, curves. Every process runs all of it (checkpoints are saved and restored collectively);
only process 0 writes files other than checkpoints.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import pathlib
import sys
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from softprompt_jax import config_checks as cc
from softprompt_jax import decoding, optim, partitioning, preemption, prompts
from softprompt_jax import train_step as ts
from softprompt_jax.checkpoints.state import PromptCheckpoints, abstract_like, fingerprint
from softprompt_jax.config_checks import ConfigError
from softprompt_jax.curves import plot_curves
from softprompt_jax.model_spec import ModelSpec, load_frozen
from softprompt_jax.prompted import PromptedT5, make_prompted_params
from softprompt_jax.run_log import RunLog, read_metrics
from softprompt_jax.run_summary import SUMMARY_FILE, write_summary
from softprompt_jax.t5 import T5
from softprompt_jax.tokenizers import get_vocabulary

CHECKPOINT_SUBDIR = "checkpoints"
PROMPT_FILE = "prompt.npy"


class NumericalError(FloatingPointError):
  """NaN or Inf in the loss or the prompt; the last good checkpoint is kept."""


# --------------------------------------------------------------------------------------------
# Setting a run up


@dataclasses.dataclass
class Setup:
  """Everything a run needs, built in the order that fails fastest."""
  task: object
  vocabulary: object
  partitioner: partitioning.Partitioner
  config: object
  model: object
  params: dict
  labels: dict


def _prompt_initializer(factory: Callable, task, vocabulary) -> prompts.PromptInit:
  """Calls a gin-bound initializer factory with what it asks for (labels, vocabulary)."""
  params = inspect.signature(factory).parameters
  kwargs = {}
  if "labels" in params:
    if not task.choices:
      raise ConfigError(f"prompt init {getattr(factory, '__name__', factory)} needs class labels, "
                        f"but task {task.name} has no fixed label set; use sampled_vocab or "
                        "random_uniform")
    kwargs["labels"] = list(task.choices)
  if "vocabulary" in params:
    kwargs["vocabulary"] = vocabulary
  try:
    return factory(**kwargs)
  except ValueError as e:  # e.g. labels that encode to no tokens; ConfigErrors pass as they are
    if isinstance(e, (ConfigError, prompts.PromptShapeError, prompts.PromptFileError)):
      raise
    raise ConfigError(str(e)) from None


def load_vocabulary(spec):
  """The vocabulary named by `spec`; a missing or unknown one is a ConfigError."""
  if spec is None:
    raise ConfigError("no vocabulary: set VOCABULARY (a sentencepiece .model path, or 'byte')")
  try:
    return get_vocabulary(spec)
  except ValueError as e:  # an unknown name, or a file that is no SentencePiece model
    raise ConfigError(str(e)) from None


def _check_vocabulary_fits(vocabulary, config):
  if vocabulary.vocab_size > config.vocab_size:
    raise ConfigError(f"the vocabulary has {vocabulary.vocab_size} ids but the model's embedding "
                      f"has {config.vocab_size} rows; use the vocabulary the model was trained "
                      "with")


def _config_of(spec: ModelSpec, overrides: dict):
  """The frozen model's configuration: the spec's, or the checkpoint's read from its metadata
  (no weights). Bad overrides, sizes or families are ConfigErrors; a checkpoint that cannot be
  read raises its own (FileNotFoundError, CheckpointError)."""
  from softprompt_jax.checkpoints.reader import CheckpointError
  from softprompt_jax.loading import checked_overrides, open_checkpoint
  from softprompt_jax.t5_config import FAMILIES
  try:
    spec.check()
    merged = checked_overrides({**dict(spec.overrides), **overrides}, who="overrides")
    if not spec.checkpoint:
      if spec.family not in FAMILIES:
        raise ValueError(f"unknown T5 family {spec.family!r}; use one of {list(FAMILIES)}")
      return dataclasses.replace(spec.config(), **overrides)
    with open_checkpoint(spec.checkpoint) as reader:
      return reader.config(**merged)
  except CheckpointError:
    raise
  except (TypeError, ValueError) as e:
    raise ConfigError(f"frozen_model: {e}") from None


def setup_run(*, model: ModelSpec, task, vocabulary, prompt_length: int, prompt_init: Callable,
              placement: str, trainable: Sequence[str], num_partitions: int,
              mesh_shape, parameter_partitioning_dims: int, activation_partitioning_dims: int,
              dropout_rate: Optional[float], seed: int, num_prompts: Optional[int] = None,
              prompt_values=None, prompt_source: Optional[str] = None,
              batch_size: Optional[int] = None, input_length: Optional[int] = None,
              target_length: Optional[int] = None, resume_dir=None,
              resume_identity: Optional[dict] = None) -> Setup:
  """Checks everything that can be checked from configuration and metadata (task, vocabulary,
  mesh and batch, resumed run, model config, prompt shape), then loads the frozen weights.

  `prompt_source`: where `prompt_values` came from, for messages. `batch_size`: checked against
  the mesh's data axis and, with the lengths, against a device's memory. `resume_dir`: a run
  directory whose saved settings (task, prompt length, trainable, and `resume_identity`: seed,
  data) must match.
  """
  from softprompt_jax.data import get_task
  task = get_task(task) if isinstance(task, str) else task
  vocabulary = load_vocabulary(vocabulary)
  try:
    partitioner = partitioning.Partitioner.create(
        num_partitions=num_partitions, mesh_shape=mesh_shape,
        parameter_partitioning_dims=parameter_partitioning_dims,
        activation_partitioning_dims=activation_partitioning_dims)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  data_axis = partitioner.mesh.shape["data"]
  if batch_size is not None and batch_size % data_axis:
    raise ConfigError(f"batch_size {batch_size} does not divide over the mesh's data axis "
                      f"({data_axis} of the {jax.device_count()} devices, mesh "
                      f"{dict(partitioner.mesh.shape)}); use a multiple of {data_axis}")
  if resume_dir is not None:
    checkpoint_dir = pathlib.Path(resume_dir) / CHECKPOINT_SUBDIR
    if checkpoint_dir.is_dir():
      saved = PromptCheckpoints(checkpoint_dir)
      try:
        steps = saved.steps()
        meta = saved.restore_meta(steps[-1]) if steps else None
      except Exception:  # an unreadable step: the resume itself reports and sets it aside
        meta = None
      finally:
        saved.close()
      if meta is not None:  # the fingerprint is checked on restore, after hashing the model
        _check_same_run(meta, {"task": task.name, "prompt_length": prompt_length,
                               "trainable": list(trainable), **(resume_identity or {})},
                        resume_dir)
  overrides = {} if dropout_rate is None else {"dropout_rate": dropout_rate}
  config = _config_of(model, overrides)  # reads metadata only
  _check_vocabulary_fits(vocabulary, config)
  if batch_size is not None and input_length is not None and target_length is not None:
    cc.check_activations_fit(config, who=f"batch_size {batch_size}",
                             examples_per_device=max(1, batch_size // data_axis),
                             prompt_length=prompt_length, input_length=input_length,
                             target_length=target_length, device=partitioner.mesh.devices.flat[0])
  init = _prompt_initializer(prompt_init, task, vocabulary) if prompt_length else None
  if prompt_length:
    shape = ((prompt_length, config.emb_dim) if num_prompts is None
             else (num_prompts, prompt_length, config.emb_dim))
    # Traced on shapes only: a prompt that does not fit fails before the weights are read.
    fixed = None if prompt_values is None else prompts.from_array(prompt_values, prompt_source)
    prompts.check_fits(fixed or init, shape, config.vocab_size, config.emb_dim)
    net = PromptedT5(config, prompt_length=prompt_length, prompt_init=init,
                     num_prompts=num_prompts, placement=placement)
  else:
    net = T5(config)
  config, frozen_params = load_frozen(model, partitioner, **overrides)
  if prompt_length:
    params = make_prompted_params(net, frozen_params, jax.random.PRNGKey(seed), prompt_values)
  else:
    params = frozen_params
  try:
    labels = optim.param_labels(params, tuple(trainable))
  except ValueError as e:  # no path matches: nothing would train
    raise ConfigError(f"trainable: {e}") from None
  return Setup(task, vocabulary, partitioner, config, net, params, labels)


# --------------------------------------------------------------------------------------------
# Evaluation


def predict(model, params, task, examples_batch, vocabulary, target_length: int,
            **encoder_kwargs) -> list[str]:
  """Text predictions for one host-local batch: rank classification when the task has a fixed
  label set (as T5 evaluates classification), greedy decoding otherwise."""
  tokens = np.asarray(examples_batch["encoder_input_tokens"])
  if task.choices:
    candidates = vocabulary.encode_batch(list(task.choices), max_length=target_length)
    chosen = np.asarray(decoding.rank_classify(model, params, tokens, candidates,
                                               **encoder_kwargs))
    return [task.choices[i] for i in chosen]
  decoded = np.asarray(decoding.greedy_decode(model, params, tokens, target_length,
                                              **encoder_kwargs))
  return [vocabulary.decode(row) for row in decoded]


def run_eval(setup: Setup, params, split: str, *, data_source, batch_size: int,
             input_length: int, target_length: int, max_examples: Optional[int],
             bad_records: str = "error") -> dict:
  """Metrics of the task's `split` with `params` (frozen + prompt), and the counts of what was
  evaluated, as training reports its own: `num_examples`, `num_truncated_inputs` /
  `num_truncated_targets` (longer than input_length / target_length, so cut) and, with
  bad_records='skip', `num_skipped_records`. A long pass shows its progress on stderr."""
  from softprompt_jax import progress
  from softprompt_jax.data import pipeline
  stream = pipeline.eval_batches(setup.task, split, setup.vocabulary, source=data_source,
                                 batch_size=batch_size, input_length=input_length,
                                 target_length=target_length, max_examples=max_examples,
                                 bad_records=bad_records)
  examples, predictions = [], []
  with progress.Progress(f"eval {split}", stream.num_examples) as shown:
    for batch in stream:
      texts = predict(setup.model, params, setup.task, batch.arrays, setup.vocabulary,
                      target_length)
      real = [i for i, keep in enumerate(batch.mask) if keep]
      examples += [batch.examples[i] for i in real]
      predictions += [texts[i] for i in real]
      shown.update(len(examples))
  if not examples:
    raise ConfigError(f"{setup.task.name}: split {split!r} has no examples to evaluate")
  metrics = setup.task.evaluate(examples, predictions)
  metrics["num_examples"] = float(len(examples))
  metrics["num_truncated_inputs"] = float(stream.stats.num_truncated_inputs)
  metrics["num_truncated_targets"] = float(stream.stats.num_truncated_targets)
  if stream.stats.num_skipped_records:
    metrics["num_skipped_records"] = float(stream.stats.num_skipped_records)
  return metrics


# --------------------------------------------------------------------------------------------
# Training


def _default_metric(task) -> str:
  names = getattr(task, "metric_names", None)
  if names:
    return names[0]
  return "accuracy"


def _check_finite(recent: list[tuple[int, dict]]) -> None:
  """NumericalError naming the first step (of those not yet checked) whose loss or updated
  trainable params hold NaN or Inf. The loop keeps each step's metrics (device values, so steps
  are not made to wait) and checks them before it logs or checkpoints: no checkpoint ever holds
  a NaN or Inf, and the error names the step where it began."""
  for step, metrics in recent:
    if not np.isfinite(float(metrics["loss"])):
      raise NumericalError(f"step {step}: the loss is {float(metrics['loss'])}; training "
                           "stopped, the last good checkpoint is kept (lower the learning rate, "
                           "or check the data)")
    if not bool(metrics[ts.FINITE_TRAINABLE]):
      raise NumericalError(f"step {step}: the prompt holds NaN or Inf; training stopped, the "
                           "last good checkpoint is kept (lower the learning rate)")
  recent.clear()


def _is_optimizer(value) -> bool:
  return callable(getattr(value, "init", None)) and callable(getattr(value, "update", None))


def _is_task(value) -> bool:
  return (isinstance(value, str) and bool(value)) or hasattr(value, "evaluate")


# What each of train's parameters accepts (checked first thing, before anything is read).
TRAIN_RULES = {
    "model_dir": cc.path(), "model": cc.instance(ModelSpec, "@frozen_model()"),
    "task": cc.Rule("a task name", _is_task), "vocabulary": cc.text(optional=True),
    "data_source": cc.data_source(), "prompt_length": cc.integer(0),
    "prompt_init": cc.function("an initializer such as @prompts.class_labels"),
    "placement": cc.one_of("prepend", "append"), "trainable": cc.texts(),
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
}


def train(*, model_dir: str, model: ModelSpec, task: str, vocabulary=None, data_source=None,
          prompt_length: int = 100, prompt_init: Callable = prompts.class_labels,
          placement: str = "prepend", trainable: Sequence[str] = optim.PROMPT_ONLY,
          optimizer=None, num_steps: int = 30000, batch_size: int = 32, input_length: int = 512,
          target_length: int = 8, dropout_rate: Optional[float] = 0.1, z_loss: float = 1e-4,
          label_smoothing: float = 0.0,
          loss_normalizer: str | float = "num_real_target_tokens", eval_every: int = 1000,
          eval_split: str = "validation", eval_max_examples: Optional[int] = None,
          best_metric: Optional[str] = None, best_mode: str = "max", keep_checkpoints: int = 2,
          num_partitions: int = 1, mesh_shape: Optional[Sequence[int]] = None,
          parameter_partitioning_dims: int = 1, activation_partitioning_dims: int = 1,
          seed: int = 0, log_every: int = 50, stop_after_steps: Optional[int] = None,
          bad_records: str = "error") -> dict:
  """Prompt tuning (or, with trainable='.*', model tuning); resumes when run again.

  SIGTERM or SIGINT (an eviction notice, Ctrl-C) finishes the current step, saves a checkpoint
  there (at the same step in every process) and raises `preemption.Preempted`; running again
  resumes from it. `stop_after_steps` ends this invocation early without a checkpoint of its
  own, leaving the periodic ones to resume from; tests use it.
  """
  cc.check("train", locals(), TRAIN_RULES)
  from softprompt_jax.data import pipeline
  start_time = time.time()
  model_dir = pathlib.Path(model_dir)
  if model_dir.exists() and not model_dir.is_dir():
    raise ConfigError(f"--model_dir {model_dir} is a file; give a directory (new or a run's)")
  patterns = (trainable,) if isinstance(trainable, str) else tuple(trainable)
  if prompt_length == 0 and patterns == optim.PROMPT_ONLY:
    raise ConfigError("train.prompt_length = 0 leaves nothing to train (the prompt is the "
                      "trainable part); use a prompt length >= 1 (the paper: 1..150), or "
                      "train.trainable = ['.*'] for model tuning")
  finished = completed_summary(model_dir, num_steps, prompt_length)
  if finished is not None:  # a rerun of a finished run: every file stays as it is
    print(f"{model_dir}: already complete at step {finished['steps']}; nothing to do",
          file=sys.stderr, flush=True)
    return {**finished, ALREADY_COMPLETE: True}
  # Every split the run reads, read now: a bad record or an empty split stops the run before
  # the model is loaded and anything is written, not at the first evaluation (cached for later).
  pipeline.check_splits(task, data_source, evals=(eval_split,), bad_records=bad_records)
  setup = setup_run(model=model, task=task, vocabulary=vocabulary, prompt_length=prompt_length,
                    prompt_init=prompt_init, placement=placement, trainable=trainable,
                    num_partitions=num_partitions, mesh_shape=mesh_shape,
                    parameter_partitioning_dims=parameter_partitioning_dims,
                    activation_partitioning_dims=activation_partitioning_dims,
                    dropout_rate=dropout_rate, seed=seed, batch_size=batch_size,
                    input_length=input_length, target_length=target_length,
                    resume_dir=model_dir, resume_identity=_data_identity(seed, data_source))
  best_metric = best_metric or _default_metric(setup.task)
  optimizer = optim.masked_optimizer(optimizer if optimizer is not None else optim.adafactor(),
                                     setup.labels)
  primary = partitioning.is_primary_process()
  state, frozen = ts.init_train_state(setup.params, setup.labels, optimizer)
  train_step, _, shardings = partitioning.sharded_steps(
      setup.model, optimizer, setup.partitioner, *jax.eval_shape(lambda: (state, frozen)),
      ts.LossConfig(z_loss, label_smoothing, loss_normalizer))
  state = jax.device_put(state, shardings["state"])
  frozen = jax.device_put(frozen, shardings["frozen"])

  meta = {"model": model.describe(), "task": setup.task.name, "prompt_length": prompt_length,
          "placement": placement, "trainable": list(trainable), "config": setup.config.to_dict(),
          "best_metric": best_metric, "best_mode": best_mode,
          "vocabulary": vocabulary if isinstance(vocabulary, str) else None,
          "model_fingerprint": fingerprint(model.checkpoint) if model.checkpoint else None,
          **_data_identity(seed, data_source)}
  checkpoints = PromptCheckpoints(model_dir / CHECKPOINT_SUBDIR, keep_last=keep_checkpoints,
                                  best_metric=best_metric, best_mode=best_mode)
  rows = setup.partitioner.process_rows(batch_size)
  batches = pipeline.train_batches(setup.task, "train", setup.vocabulary, source=data_source,
                                   batch_size=batch_size, input_length=input_length,
                                   target_length=target_length, seed=seed, rows=rows,
                                   bad_records=bad_records)
  rng = jax.random.PRNGKey(seed)
  start_step = 0
  restored, damaged = checkpoints.restore_latest(abstract_like(state))
  latest = None
  last_eval = None
  if restored is not None:
    latest, state, position, saved_meta = restored
    _check_same_run(saved_meta, meta, model_dir)
    try:
      batches.restore(position)
    except ValueError as e:  # the same files, edited: the saved position means other examples
      raise ConfigError(f"{model_dir}: cannot resume, the training data changed: {e}; use a "
                        "new --model_dir or restore the original data") from None
    start_step = int(state.step)
    last_eval = saved_meta.get("metrics")  # the summary's, if no step is left to run
  model_dir.mkdir(parents=True, exist_ok=True)

  log = RunLog(model_dir, num_steps, start_step=start_step, enabled=primary)
  for bad_step, reason in damaged:
    log.message(f"checkpoint {bad_step} is damaged ({reason}); set aside")
  if latest is not None:
    log.message(f"resumed from {checkpoints.directory / str(latest)} at step {start_step}")
  step = start_step
  unchecked = []  # (step, metrics) since the last check
  pending_tokens = 0
  preempted = None
  try:
    with preemption.StopSignals() as signals:
      while step < num_steps:
        local = next(batches)
        global_batch = setup.partitioner.shard_batch(local, batch_size)
        state, metrics = train_step(state, frozen, global_batch, rng)
        step += 1
        unchecked.append((step, metrics))
        pending_tokens += int(np.sum(local["encoder_input_tokens"] > 0)
                              + np.sum(local["decoder_target_tokens"] > 0)) * \
            jax.process_count()
        if step % log_every == 0 or step == num_steps or step % eval_every == 0:
          _check_finite(unchecked)
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
            _check_finite(unchecked)
            checkpoints.save(step, state, batches.state(), meta)
          preempted = preemption.Preempted(step, signals.stop_signal,
                                           checkpoints.directory / str(step))
          break
        if stop_after_steps is not None and step - start_step >= stop_after_steps:
          break
  finally:
    log.close()
  if preempted is not None:
    checkpoints.close()
    raise preempted

  summary = {"steps": step, "wall_time_s": time.time() - start_time,
             "best_metric": best_metric, "model_dir": str(model_dir),
             "data": dataclasses.asdict(batches.stats)}
  if step >= num_steps:
    # Every process takes part in restoring (orbax restores sharded arrays collectively);
    # only process 0 writes.
    best = checkpoints.best_step() or checkpoints.latest_step()
    summary["best_step"] = best
    best_prompt = None
    if best is not None:
      best_meta = checkpoints.restore_meta(best)
      summary["best_value"] = (best_meta.get("metrics") or {}).get(best_metric)
      if prompt_length:
        best_state, _, _ = checkpoints.restore(best, abstract_like(state))
        best_prompt = np.asarray(best_state.trainable["prompt"]["prompt"])
    summary["final_eval"] = last_eval
    # A run stopped during its final save has trained every step: the loss is in its log.
    summary["final_loss"] = (float(metrics["loss"]) if step > start_step
                             else _last_logged_loss(model_dir, step))
    if primary:
      if best_prompt is not None:
        prompts.save_npy(model_dir / PROMPT_FILE, best_prompt)
      plot_curves(model_dir)
      # Last: the summary marks the run complete (completed_summary), so a write that fails
      # before it (a full disk) leaves a run that the same command finalizes from its checkpoints.
      write_summary(model_dir, summary)
  checkpoints.close()
  return summary


ALREADY_COMPLETE = "already_complete"  # in train's result: a rerun that changed nothing


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
  if (model_dir / "config.gin").is_file() and not (model_dir / "operative_config.gin").is_file():
    return None
  return summary


def _last_logged_loss(model_dir: pathlib.Path, step: int) -> Optional[float]:
  logged = [r for r in read_metrics(model_dir, "train") if r.get("step") == step]
  return float(logged[-1]["loss"]) if logged and "loss" in logged[-1] else None


_RUN_IDENTITY = ("task", "prompt_length", "trainable", "model_fingerprint", "seed",
                 "data_source")


def _data_identity(seed: int, data_source) -> dict:
  """The settings that fix which examples each step sees (JSON-comparable)."""
  return {"seed": seed, "data_source": json.loads(json.dumps(data_source, default=str))}


def _check_same_run(saved: dict, current: dict, model_dir) -> None:
  """Resuming with a different model, task, prompt shape, seed or data would silently mix two
  runs. Compares the identity keys that `current` holds (and, for the seed and data, that the
  saved run recorded: older runs did not)."""
  for key in (k for k in _RUN_IDENTITY if k in current):
    if key in ("seed", "data_source") and key not in saved:
      continue
    if saved.get(key) != current.get(key):
      raise ConfigError(f"{model_dir}: this run directory was trained with {key}="
                        f"{saved.get(key)!r}, now {current.get(key)!r}; use a new --model_dir "
                        "or restore the original setting")


# --------------------------------------------------------------------------------------------
# Using a trained prompt


def run_prompt(model_dir) -> np.ndarray:
  """A run's best (else latest) prompt [P, H]."""
  model_dir = pathlib.Path(model_dir)
  exported = model_dir / PROMPT_FILE
  if exported.is_file():
    return prompts.load_npy(exported)
  checkpoints = PromptCheckpoints(model_dir / CHECKPOINT_SUBDIR)
  steps = checkpoints.steps()
  if not steps:
    raise FileNotFoundError(f"{model_dir}: no {PROMPT_FILE} and no checkpoints; train first")
  best = _best_from_meta(checkpoints, steps) or steps[-1]
  import orbax.checkpoint as ocp
  restored = ocp.StandardCheckpointer().restore(checkpoints.directory / str(best) / "state")
  checkpoints.close()
  return np.asarray(restored["trainable"]["prompt"]["prompt"], np.float32)


def _best_from_meta(checkpoints: PromptCheckpoints, steps) -> Optional[int]:
  """The best step by the metric and mode the run recorded in its checkpoints' meta."""
  meta = checkpoints.restore_meta(steps[-1])
  if not meta.get("best_metric"):
    return None
  ranked = PromptCheckpoints(checkpoints.directory, best_metric=meta["best_metric"],
                             best_mode=meta.get("best_mode", "max"))
  try:
    return ranked.best_step()
  finally:
    ranked.close()
