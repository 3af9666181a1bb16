"""t5x and prompt-tuning gin names: each honoured (translated to the setting here that does the
same) or refused in one line naming it. None is silently ignored.

Macros (`--gin.TRAIN_STEPS=...`, or `TRAIN_STEPS = ...` in a gin file) are read after the files
and bindings are parsed, before the config is finalised, and rebound under this project's names.
t5x configurables a user binds (`partitioning.PjitPartitioner.num_partitions`,
`utils.SaveCheckpointConfig.keep`, ...) exist here as stand-ins whose parameters are exactly the
ones that have a meaning here: gin itself refuses any other parameter by name, and the bound
values are translated the same way. A t5x name whose value is what this project does anyway
(`USE_CACHED_TASKS = False`, `pack = False`) is accepted; another value of it is refused.
"""

from __future__ import annotations

import math
import pathlib
import re
from typing import Any, Callable, Iterable, Optional

import gin

from softprompt_jax.checkpoints.t5x import find_t5x_checkpoint
from softprompt_jax.data import get_task
from softprompt_jax.errors import ConfigError

_STEP_DIR = re.compile(r"checkpoint_(\d+)")
# prompt-tuning's and t5's task modules: their tasks are built in here, so importing is moot.
KNOWN_TASK_MODULES = (None, "prompt_tuning.data.glue", "prompt_tuning.data.super_glue",
                      "prompt_tuning.data.tasks", "t5.data.mixtures", "t5.data.tasks")


# ----------------------------------------------------------------------------------------------
# Stand-ins for t5x configurables. Their bindings are translated (below); only the vocabulary
# is ever called, as `VOCABULARY = @seqio.SentencePieceVocabulary()` in a t5x models file.

def _not_called(name: str) -> Callable:
  def stand_in(**_):
    raise ConfigError(f"@{name}() builds a t5x object, which does not exist here; bind its "
                      "parameters instead (see the README's t5x names table)")
  return stand_in


def save_checkpoint_config(period=None, keep=None, dtype="float32"):
  _not_called("utils.SaveCheckpointConfig")()


def pjit_partitioner(num_partitions=None, model_parallel_submesh=None, logical_axis_rules=None):
  _not_called("partitioning.PjitPartitioner")()


def standard_logical_axis_rules(activation_partitioning_dims=1, parameter_partitioning_dims=1,
                                additional_rules=None):
  _not_called("partitioning.standard_logical_axis_rules")()


def create_learning_rate_scheduler(factors="constant", base_learning_rate=0.3,
                                   warmup_steps=None):
  _not_called("utils.create_learning_rate_scheduler")()


def t5x_adafactor(decay_rate=0.8, step_offset=0, multiply_by_parameter_scale=False,
                  weight_decay_rate=1e-5, clipping_threshold=1.0):
  _not_called("adafactor.Adafactor")()


def prompt_module(length=100):
  _not_called("prompts.Prompt")()


def dataset_config(split=None, batch_size=None, pack=False, use_cached=False,
                   mixture_or_task_name=None, task_feature_lengths=None):
  _not_called("utils.DatasetConfig")()


def sentencepiece_vocabulary(sentencepiece_model_file: str, extra_ids: int = 100) -> str:
  """seqio's vocabulary as a path: VOCABULARY here is the .model file (T5's 100 sentinels are
  part of it)."""
  if extra_ids != 100:
    raise ConfigError(f"seqio.SentencePieceVocabulary.extra_ids={extra_ids}: only T5's 100 "
                      "extra ids are supported")
  return sentencepiece_model_file


STAND_INS = {  # gin selector -> function
    "utils.SaveCheckpointConfig": save_checkpoint_config,
    "partitioning.PjitPartitioner": pjit_partitioner,
    "partitioning.standard_logical_axis_rules": standard_logical_axis_rules,
    "utils.create_learning_rate_scheduler": create_learning_rate_scheduler,
    "adafactor.Adafactor": t5x_adafactor,
    "prompts.Prompt": prompt_module,
    "utils.DatasetConfig": dataset_config,
    "seqio.SentencePieceVocabulary": sentencepiece_vocabulary,
}


def register() -> None:
  for selector, fn in STAND_INS.items():
    module, name = selector.rsplit(".", 1)
    gin.external_configurable(fn, name=name, module=module)


# ----------------------------------------------------------------------------------------------
# Translation

class _Plan:
  """The settings the t5x names ask for: {target: (value, the t5x name asking)}; two names
  asking one target for different values are refused."""

  def __init__(self, parameters: dict[str, set]):
    self.parameters = parameters  # {our configurable: its parameter names}
    self.targets: dict[str, tuple[Any, str]] = {}
    self.honoured: set[str] = set()

  def set(self, target: str, value, source: str) -> None:
    if target in self.targets and self.targets[target][0] != value:
      other, by = self.targets[target]
      raise ConfigError(f"{source} = {value!r} and {by} = {other!r} both set {target}; "
                        "give one of them")
    self.targets[target] = (value, source)

  def set_everywhere(self, parameter: str, value, source: str) -> None:
    """`parameter` of every configurable that has it (train, evaluate, infer)."""
    for name in ("train", "evaluate", "infer"):
      if parameter in self.parameters.get(name, ()):
        self.set(f"{name}.{parameter}", value, source)


def _macro(name: str, default=None):
  value = gin.config._CONFIG.get((name, "gin.macro"), {}).get("value", default)
  for _ in range(10):  # a macro set to another macro (MODEL_PARALLEL = %N)
    if (isinstance(value, gin.config.ConfigurableReference)
        and value.selector == "gin.macro"):
      value = gin.config._CONFIG.get((value.scoped_selector.split("/")[0], "gin.macro"),
                                     {}).get("value", default)
  return value


def _bound(selector: str, parameter: str, default=None):
  value = gin.config._CONFIG.get(("", selector), {}).get(parameter, default)
  if isinstance(value, gin.config.ConfigurableReference) and value.selector == "gin.macro":
    return _macro(value.scoped_selector.split("/")[0], default)
  return value


def _refuse(name: str, value, why: str) -> ConfigError:
  return ConfigError(f"{name} = {value!r}: {why}")


def checkpoint_step(path: Optional[str]) -> int:
  """The step of a t5x checkpoint (its `checkpoint_N` directory); 0 for none or a Hugging Face
  directory."""
  if path is None:
    return 0
  found = find_t5x_checkpoint(pathlib.Path(path).expanduser())
  if found is None:
    return 0
  for part in (found[1], *found[1].parents):
    match = _STEP_DIR.fullmatch(part.name)
    if match:
      return int(match.group(1))
  return 0


def _feature_lengths(plan: _Plan, value, name: str) -> None:
  if not isinstance(value, dict) or set(value) - {"inputs", "targets"}:
    raise _refuse(name, value, "give {'inputs': N, 'targets': M} (an encoder-decoder's two "
                  "features)")
  for feature, parameter in (("inputs", "input_length"), ("targets", "target_length")):
    if feature in value:
      plan.set_everywhere(parameter, value[feature], name)


def _only(accepted: Iterable, why: str) -> Callable:
  """A t5x name whose accepted values are what this project does anyway."""
  accepted = tuple(accepted)

  def translate(plan: _Plan, value, name: str) -> None:
    if value not in accepted:
      raise _refuse(name, value, why)
  return translate


def _to(*targets: str, convert: Callable = lambda v: v) -> Callable:
  def translate(plan: _Plan, value, name: str) -> None:
    for target in targets:
      if "." in target or target.startswith("%"):
        plan.set(target, convert(value), name)
      else:
        plan.set_everywhere(target, convert(value), name)
  return translate


def _seed(plan: _Plan, value, name: str) -> None:
  if not isinstance(value, int):
    raise _refuse(name, value, "runs here are seeded (resuming needs it): give an integer")
  plan.set("train.seed", value, name)


def _class_labels(plan: _Plan, value, name: str) -> None:
  task_name = plan.targets.get("%TASK", (_macro("TASK"),))[0]
  try:
    choices = list(get_task(task_name).choices or ()) if task_name else None
  except Exception:  # an unknown task is reported, by name, where the run reads it
    return
  if choices is not None and sorted(value) != sorted(choices):
    raise _refuse(name, value, f"the class-label init here uses task {task_name}'s labels "
                  f"{choices}; drop CLASS_LABELS or give those (in any order)")
  plan.set("prompts.class_labels.label_order", list(value), name)


def _prompt_regex(value):
  # prompt-tuning's default names its flaxformer path (encoder/prompt/prompt/...); the prompt
  # here is at prompt/prompt.
  return [".*prompt.*"] if list(value) == [".*/prompt/.*"] else value


def _loss_normalizer(value):
  return "sum" if value is None else value  # t5x's None: the summed loss, not divided


def _submesh(value):
  if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) for v in value):
    raise _refuse("partitioning.PjitPartitioner.model_parallel_submesh", value,
                  "give a tuple of ints, e.g. (2, 2, 1, 2)")
  # The devices of one model-parallel group: here the mesh's "model" axis takes that many.
  return math.prod(value)


def _eval_steps(plan: _Plan, value, name: str) -> None:
  batch = _macro("BATCH_SIZE", None)
  if not isinstance(value, int) or not isinstance(batch, int):
    raise _refuse(name, value, "set train.eval_max_examples (examples, not batches) instead")
  plan.set("train.eval_max_examples", value * batch, name)  # t5x: EVAL_STEPS batches


def _standard_rules(plan: _Plan, value, name: str) -> None:
  if not (isinstance(value, gin.config.ConfigurableReference)
          and value.selector == "partitioning.standard_logical_axis_rules"):
    raise _refuse(name, value, "t5x's standard rules (plus the prompt's) are the ones used "
                  "here; choose 1-D or 2-D with partitioning.standard_logical_axis_rules")


def _keep(plan: _Plan, value, name: str) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise _refuse(name, value, "give how many checkpoints to keep (>= 1; the best one is kept "
                  "besides); keeping all is not offered")
  plan.set("train.keep_checkpoints", value, name)


def _vocabulary_file(plan: _Plan, value, name: str) -> None:
  plan.set("%VOCABULARY", value, name)


def _dims(key: str) -> Callable:
  """A model dimension macro (NUM_HEADS, ...) -> frozen_model.overrides[key]."""
  def translate(plan: _Plan, value, name: str) -> None:
    plan.set(f"overrides:{key}", value, name)
  return translate


_NO_CACHE = ("no seqio cache here: examples are read from DATA and their formatted form is "
             "cached by this project; drop it or set False")

MACROS: dict[str, Callable] = {
    "MIXTURE_OR_TASK_NAME": _to("%TASK"),
    "MIXTURE_OR_TASK_MODULE": _only(KNOWN_TASK_MODULES, "tasks here are built in (see "
                                    "`softprompt_jax.data.TASKS`); name one of them with "
                                    "MIXTURE_OR_TASK_NAME instead of a module"),
    "TASK_FEATURE_LENGTHS": _feature_lengths,
    "TRAIN_STEPS": None,  # needs the initial checkpoint: see translate()
    "TRAIN_STEPS_RELATIVE": None,
    "INITIAL_CHECKPOINT_PATH": _to("frozen_model.checkpoint"),
    "USE_CACHED_TASKS": _only([False], _NO_CACHE),
    "DROPOUT_RATE": _to("train.dropout_rate"),
    "RANDOM_SEED": _seed,
    "EVAL_PERIOD": _to("train.eval_every"),
    "EVAL_STEPS": _eval_steps,
    "EVALUATOR_NUM_EXAMPLES": _to("train.eval_max_examples"),
    "EVALUATOR_USE_MEMORY_CACHE": _only([True, False], ""),  # memory only: same results
    "USE_HARDWARE_RNG": _only([False], "the threefry RNG is the one used here"),
    "JSON_WRITE_N_RESULTS": _only([None], "evaluation writes metrics, not predictions; use "
                                  "`softprompt-jax infer` for predictions"),
    "EVAL_OUTPUT_DIR": _to("evaluate.model_dir"),
    "Z_LOSS": _to("train.z_loss"),
    "LABEL_SMOOTHING": _to("train.label_smoothing"),
    "LOSS_NORMALIZING_FACTOR": _to("train.loss_normalizer", convert=_loss_normalizer),
    "PROMPT_LENGTH": _to("train.prompt_length"),
    "CLASS_LABELS": _class_labels,
    "PROMPT_REGEX": _to("train.trainable", convert=_prompt_regex),
    "TRAINABLE_REGEX": _to("train.trainable"),
    "ACTIVATION_DTYPE": _dims("dtype"),
    "NUM_HEADS": _dims("num_heads"),
    "NUM_ENCODER_LAYERS": _dims("num_encoder_layers"),
    "NUM_DECODER_LAYERS": _dims("num_decoder_layers"),
    "HEAD_DIM": _dims("head_dim"),
    "EMBED_DIM": _dims("emb_dim"),
    "MLP_DIM": _dims("mlp_dim"),
    "NUM_EMBEDDINGS": _dims("vocab_size"),
    "ACTIVATION_PARTITIONING_DIMS": _to("activation_partitioning_dims"),
}

# (stand-in selector, parameter) -> translation; the stand-ins' other parameters are accepted
# only with the value their default gives (what this project does).
BINDINGS: dict[tuple[str, str], Callable] = {
    ("utils.SaveCheckpointConfig", "period"): _to("train.eval_every"),  # a save at each eval
    ("utils.SaveCheckpointConfig", "keep"): _keep,
    ("utils.SaveCheckpointConfig", "dtype"): _only(["float32"], "prompt checkpoints are float32"),
    ("partitioning.PjitPartitioner", "num_partitions"): _to("num_partitions"),
    ("partitioning.PjitPartitioner", "model_parallel_submesh"): _to("num_partitions",
                                                                    convert=_submesh),
    ("partitioning.PjitPartitioner", "logical_axis_rules"): _standard_rules,
    ("partitioning.standard_logical_axis_rules", "activation_partitioning_dims"):
        _to("activation_partitioning_dims"),
    ("partitioning.standard_logical_axis_rules", "parameter_partitioning_dims"):
        _to("parameter_partitioning_dims"),
    ("partitioning.standard_logical_axis_rules", "additional_rules"): _only(
        [None], "the prompt's replication rules are built in; add rules with "
        "partitioning.standard_logical_axis_rules here in Python"),
    ("utils.create_learning_rate_scheduler", "factors"): _only(
        ["constant"], "the paper's constant schedule is the one offered; set "
        "optim.adafactor.learning_rate"),
    ("utils.create_learning_rate_scheduler", "base_learning_rate"): _to(
        "optim.adafactor.learning_rate", "optim.adam.learning_rate"),
    ("utils.create_learning_rate_scheduler", "warmup_steps"): lambda plan, value, name: None,
    ("adafactor.Adafactor", "decay_rate"): _to("optim.adafactor.decay_rate"),
    ("adafactor.Adafactor", "step_offset"): _only([0], "set optim.adafactor's schedule instead"),
    ("adafactor.Adafactor", "multiply_by_parameter_scale"): _to(
        "optim.adafactor.multiply_by_parameter_scale"),
    ("adafactor.Adafactor", "weight_decay_rate"): _to("optim.adafactor.weight_decay_rate"),
    ("adafactor.Adafactor", "clipping_threshold"): _to("optim.adafactor.clipping_threshold"),
    ("prompts.Prompt", "length"): _to("train.prompt_length"),
    ("utils.DatasetConfig", "split"): _to("evaluate.split"),
    ("utils.DatasetConfig", "batch_size"): _to("batch_size"),
    ("utils.DatasetConfig", "pack"): _only([False], "examples are never packed here"),
    ("utils.DatasetConfig", "use_cached"): _only([False], _NO_CACHE),
    ("utils.DatasetConfig", "mixture_or_task_name"): _to("%TASK"),
    ("utils.DatasetConfig", "task_feature_lengths"): _feature_lengths,
    ("seqio.SentencePieceVocabulary", "sentencepiece_model_file"): _vocabulary_file,
    ("seqio.SentencePieceVocabulary", "extra_ids"): _only([100], "T5's 100 extra ids only"),
}


def translate(parameters: dict[str, set]) -> set[str]:
  """Rebinds every t5x name set (macros and stand-in parameters) under this project's names, or
  raises ConfigError naming it. `parameters`: {configurable: its parameter names}, for t5x
  names that set several (batch_size: train, evaluate and infer). Returns the t5x macro names
  honoured, which no setting here reads."""
  plan = _Plan(parameters)
  config = gin.config._CONFIG  # gin keeps no public list of its bindings
  macros = {scope for (scope, selector) in config if selector == "gin.macro"}
  for name in sorted(macros & set(MACROS)):
    value = _macro(name)
    if MACROS[name] is not None:
      MACROS[name](plan, value, name)
    plan.honoured.add(name)
  for (scope, selector), values in list(config.items()):
    if selector not in STAND_INS:
      continue
    for parameter, value in values.items():
      name = f"{scope + '/' if scope else ''}{selector}.{parameter}"
      if isinstance(value, gin.config.ConfigurableReference) and value.selector == "gin.macro":
        value = _macro(value.scoped_selector.split("/")[0])
      if selector == "utils.DatasetConfig" and scope == "train" and parameter == "split":
        _only(["train"], "training reads the train split")(plan, value, name)
        continue
      if selector == "utils.DatasetConfig" and scope == "train" and parameter == "batch_size":
        plan.set("train.batch_size", value, name)
        continue
      BINDINGS[(selector, parameter)](plan, value, name)
  _train_steps(plan, macros)
  _apply(plan)
  return plan.honoured


def _train_steps(plan: _Plan, macros: set) -> None:
  """t5x's TRAIN_STEPS counts the initial checkpoint's steps (1_100_000 for T5 1.1 LM-adapted):
  this run trains TRAIN_STEPS minus that step. TRAIN_STEPS_RELATIVE counts this run's only."""
  if "TRAIN_STEPS_RELATIVE" in macros and _macro("TRAIN_STEPS_RELATIVE") is not None:
    plan.set("train.num_steps", _macro("TRAIN_STEPS_RELATIVE"), "TRAIN_STEPS_RELATIVE")
  if "TRAIN_STEPS" not in macros:
    return
  total = _macro("TRAIN_STEPS")
  if not isinstance(total, int) or isinstance(total, bool):
    raise _refuse("TRAIN_STEPS", total, "give an integer (t5x counts the initial checkpoint's "
                  "steps too)")
  initial = plan.targets.get("frozen_model.checkpoint", (_bound("frozen_model", "checkpoint"),))
  start = checkpoint_step(initial[0])
  if total <= start:
    raise _refuse("TRAIN_STEPS", total, f"not past the initial checkpoint's step {start} (t5x "
                  f"counts it): give {start} + the steps to train, e.g. {start + 30000}")
  plan.set("train.num_steps", total - start, f"TRAIN_STEPS (minus the checkpoint's {start})")


def _apply(plan: _Plan) -> None:
  overrides = {}
  for target, (value, _) in plan.targets.items():
    if target.startswith("%"):
      gin.bind_parameter((target[1:], "gin.macro", "value"), value)
    elif target.startswith("overrides:"):
      overrides[target.split(":", 1)[1]] = value
    else:
      gin.bind_parameter(target, value)
  if overrides:  # merged into the models file's own overrides
    merged = dict(_bound("frozen_model", "overrides") or {})
    merged.update(overrides)
    gin.bind_parameter("frozen_model.overrides", merged)
