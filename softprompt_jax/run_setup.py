"""Setting a run up: everything that can be checked from the configuration and metadata is
checked first (task, vocabulary, mesh and batch, the resumed run's settings, the model's
configuration, memory, the prompt's shape), in the order that fails fastest; only then are the
frozen weights read into their shards and the prompt made from the real embedding table."""

from __future__ import annotations

import dataclasses
import json
from typing import Callable, Optional, Sequence

import jax

from softprompt_jax import config_checks as cc
from softprompt_jax import optim, partitioning, prompts
from softprompt_jax.checkpoints import loading
from softprompt_jax.checkpoints.checkpoint_reader import CheckpointError
from softprompt_jax.checkpoints.integrity import same_model
from softprompt_jax.data import get_task
from softprompt_jax.data.mixtures import mixture_of
from softprompt_jax.errors import ConfigError
from softprompt_jax.model_spec import ModelSpec, load_frozen
from softprompt_jax.methods import Method, PromptTuning
from softprompt_jax.prompted_t5 import prompt_shape
from softprompt_jax.run_dir import read_meta
from softprompt_jax.t5 import T5
from softprompt_jax.t5_config import FAMILIES
from softprompt_jax.tokenizers import get_vocabulary


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


def prompt_initializer(factory: Callable, task, vocabulary) -> prompts.PromptInit:
  """The `PromptInit` of a gin-bound initializer factory: a registered one (prompts.INITIALIZERS)
  gets the task's labels and the vocabulary if its entry says it needs them; any other factory
  is called with no arguments."""
  entry = prompts.INITIALIZERS.get(getattr(factory, "__name__", ""))
  kwargs = {}
  if entry is not None and entry.needs_labels:
    if not task.choices:
      raise ConfigError(f"prompt init {factory.__name__} needs class labels, but task "
                        f"{task.name} has no fixed label set; use sampled_vocab or "
                        "random_uniform")
    kwargs["labels"] = list(task.choices)
  if entry is not None and entry.needs_vocabulary:
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
    raise ConfigError("no vocabulary: set VOCABULARY (a sentencepiece .model path, a model "
                      "directory holding spiece.model, or 'byte')")
  try:
    return get_vocabulary(spec)
  except ValueError as e:  # an unknown name, or a file that is no SentencePiece model
    raise ConfigError(str(e)) from None


def check_vocabulary_fits(vocabulary, config):
  if vocabulary.vocab_size > config.vocab_size:
    raise ConfigError(f"the vocabulary has {vocabulary.vocab_size} ids but the model's embedding "
                      f"has {config.vocab_size} rows; use the vocabulary the model was trained "
                      "with")


def model_config(spec: ModelSpec, overrides: dict):
  """The frozen model's configuration: the spec's, or the checkpoint's read from its metadata
  (no weights). Bad overrides, sizes or families are ConfigErrors; a checkpoint that cannot be
  read raises its own (FileNotFoundError, CheckpointError)."""
  try:
    spec.check()
    merged = loading.checked_overrides({**dict(spec.overrides), **overrides}, who="overrides")
    if not spec.checkpoint:
      if spec.family not in FAMILIES:
        raise ValueError(f"unknown T5 family {spec.family!r}; use one of {list(FAMILIES)}")
      return dataclasses.replace(spec.config(), **overrides)
    with loading.open_checkpoint(spec.checkpoint) as reader:
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
              resume_identity: Optional[dict] = None, method: Optional[Method] = None,
              trained: Optional[dict] = None) -> Setup:
  """Checks everything that can be checked from configuration and metadata (task, vocabulary,
  mesh and batch, resumed run, model config, prompt shape), then loads the frozen weights.

  `prompt_source`: where `prompt_values` came from, for messages. `batch_size`: checked against
  the mesh's data axis and, with the lengths, against a device's memory. `resume_dir`: a run
  directory whose saved settings (task, prompt length, trainable, and `resume_identity`: seed,
  data) must match. `method` (default: prompt tuning) builds the module and its new params;
  `trained`, a trained subtree (a run's best), replaces those params' initial values.
  """
  method = method if method is not None else PromptTuning()
  task = run_task(task, method, trained)
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
    try:
      meta = read_meta(resume_dir)
    except Exception:  # an unreadable step: the resume itself reports and sets it aside
      meta = None
    if meta is not None:  # the fingerprint is checked on restore, after hashing the model
      check_same_run(meta, {"task": task.name, "prompt_length": prompt_length,
                            "trainable": list(trainable), **(resume_identity or {})},
                     resume_dir)
  overrides = {} if dropout_rate is None else {"dropout_rate": dropout_rate}
  config = model_config(model, overrides)  # reads metadata only
  check_vocabulary_fits(vocabulary, config)
  if batch_size is not None and input_length is not None and target_length is not None:
    cc.check_activations_fit(config, who=f"batch_size {batch_size}",
                             examples_per_device=max(1, batch_size // data_axis),
                             prompt_length=prompt_length, input_length=input_length,
                             target_length=target_length, device=partitioner.mesh.devices.flat[0])
  init = prompt_initializer(prompt_init, task, vocabulary) if prompt_length else None
  if prompt_length:
    shape = prompt_shape(prompt_length, config.emb_dim, num_prompts)
    # Traced on shapes only: a prompt that does not fit fails before the weights are read.
    fixed = None if prompt_values is None else prompts.from_array(prompt_values, prompt_source)
    prompts.check_fits(fixed or init, shape, config.vocab_size, config.emb_dim)
  if prompt_length or not method.has_prompt:
    net = method.model(config, prompt_length=prompt_length, prompt_init=init,
                       num_prompts=len(task) if method.mixes_tasks else num_prompts,
                       placement=placement)
  else:
    net = T5(config)
  config, frozen_params = load_frozen(model, partitioner, **overrides)
  if prompt_length or not method.has_prompt:
    params = method.init_params(net, frozen_params, jax.random.PRNGKey(seed), prompt_values)
  else:
    params = frozen_params
  if trained is not None:
    params = optim.merge(trained, params)
  try:
    labels = optim.param_labels(params, tuple(trainable))
  except ValueError as e:  # no path matches: nothing would train
    raise ConfigError(f"trainable: {e}") from None
  return Setup(task, vocabulary, partitioner, config, net, params, labels)


def _is_task(value, mixture_ok: bool = True) -> bool:
  """A task (a name or a Task), or a list of distinct ones: a mixture (methods.multi_task)."""
  if mixture_ok and isinstance(value, (list, tuple)):
    names = [getattr(v, "name", v) for v in value]
    return bool(value) and all(_is_task(v, False) for v in value) and len(set(names)) == len(value)
  return (isinstance(value, str) and bool(value)) or hasattr(value, "evaluate")


# train.task's rule (training_loop.TRAIN_RULES).
TASK_RULE = cc.Rule("a task name, or a list of distinct task names (a mixture)", _is_task)


def run_task(task, method: Method, trained: Optional[dict] = None):
  """The run's task (a name or a Task) or, for a method that trains a prompt per task, its
  mixture (a list of them: a `TaskMixture`); the other pairings are ConfigErrors."""
  mixture = mixture_of(task)
  if mixture is not None and not method.mixes_tasks:
    raise ConfigError(f"train.task lists {len(mixture)} tasks (a mixture); a prompt per task "
                      f"needs train.method = @methods.multi_task_prompt() (method {method.name} "
                      "trains one prompt); or give one task")
  if mixture is None and method.mixes_tasks:
    if trained is not None:  # eval of such a run: its prompts are per task, exported
      raise ConfigError(f"this run trained a prompt per task ({method.name}): export them "
                        "(softprompt-jax export --model_dir RUN --out DIR writes DIR/<task>.npy) "
                        "and evaluate one with PROMPT_FILE=DIR/<task>.npy")
    raise ConfigError(f"method {method.name} trains a prompt per task of a mixture: set "
                      "train.task to a list of task names (TASKS = ['task_a', 'task_b'])")
  return mixture if mixture is not None else get_task(task)


RUN_IDENTITY = ("task", "prompt_length", "trainable", "model_fingerprint", "seed",
                "data_source")


def data_identity(seed: int, data_source) -> dict:
  """The settings that fix which examples each step sees (JSON-comparable)."""
  return {"seed": seed, "data_source": json.loads(json.dumps(data_source, default=str))}


def check_same_run(saved: dict, current: dict, model_dir) -> None:
  """Resuming with a different model, task, prompt shape, seed or data would silently mix two
  runs. Compares the identity keys that `current` holds (and, for the seed and data, that the
  saved run recorded: older runs did not)."""
  for key in (k for k in RUN_IDENTITY if k in current):
    if key in ("seed", "data_source") and key not in saved:
      continue
    if key == "model_fingerprint":
      if not same_model(saved.get(key), current.get(key)):
        raise ConfigError(f"{model_dir}: this run directory was trained with another frozen "
                          f"model (model_fingerprint {saved.get(key)!r}, now "
                          f"{current.get(key)!r}; a checkpoint's is its files' names, sizes and "
                          "modification times); use a new --model_dir or the original "
                          "checkpoint (copies must keep the times: cp -p, rsync -t)")
      continue
    if saved.get(key) != current.get(key):
      raise ConfigError(f"{model_dir}: this run directory was trained with {key}="
                        f"{saved.get(key)!r}, now {current.get(key)!r}; use a new --model_dir "
                        "or restore the original setting")


