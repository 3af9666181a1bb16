"""Using trained prompts: evaluate one on a split, predict with a bank of them in mixed batches,
read one as nearest tokens, export one. Plain functions, bound by gin like `train`."""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Mapping, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from softprompt_jax import config_checks as cc
from softprompt_jax import output_files, prompts
from softprompt_jax.checkpoints.checkpoint_reader import CheckpointError
from softprompt_jax.checkpoints.hf import (SAFE_ALTERNATIVE,
                                           is_pickle_file)
from softprompt_jax.data import get_task, pipeline
from softprompt_jax.data.readers import located_records
from softprompt_jax.data.request_rows import request_row
from softprompt_jax.errors import ConfigError, UsageError
from softprompt_jax.evaluation import decode_in_batches, run_eval
from softprompt_jax.methods import Method, PromptTuning, from_description, is_prompt_only
from softprompt_jax.model_spec import ModelSpec, load_frozen
from softprompt_jax.paths import local_path
from softprompt_jax.peft_interop import (ADAPTER_CONFIG, adapter_base_model, load_peft_adapter,
                                         save_peft_adapter)
from softprompt_jax.progress import Progress
from softprompt_jax.prompted_t5 import PromptedT5, make_prompted_params
from softprompt_jax.prompts import PromptShapeError
from softprompt_jax.run_dir import best_prompt, best_trainable, read_meta, required_meta
from softprompt_jax.run_layout import CHECKPOINT_SUBDIR, PROMPT_FILE, eval_file
from softprompt_jax.run_setup import (check_vocabulary_fits, load_vocabulary, model_config,
                                      setup_run)

_PROMPT_SOURCES = "a .npy file, a PEFT adapter directory or a run directory"

_MODEL = cc.instance(ModelSpec, "@frozen_model()")
_SHAPES = {"batch_size": cc.POSITIVE, "input_length": cc.POSITIVE,
           "target_length": cc.POSITIVE}
# What each configurable here accepts (checked first thing, before anything is read).
EVALUATE_RULES = {
    "model": _MODEL, "task": cc.text(), "vocabulary": cc.text(optional=True),
    "model_dir": cc.path(optional=True), "prompt_file": cc.path(optional=True),
    "data_source": cc.data_source(), "split": cc.text(), **_SHAPES,
    "max_examples": cc.integer(1, optional=True), "num_partitions": cc.POSITIVE,
    "bad_records": cc.one_of("error", "skip"),
}
INFER_RULES = {
    "model": _MODEL, "prompts": cc.string_mapping(), "input_file": cc.path(),
    "output_file": cc.path(), "vocabulary": cc.text(optional=True), **_SHAPES,
}


def _prompt_values(source, *, part_of_run: bool = False) -> np.ndarray:
  """A prompt from a `.npy` file, a PEFT adapter directory, or a run directory; pickles are
  refused by name, and any other file must be a plain .npy array. A run whose method learned
  more than a prompt (per-layer prompts, a mask, IA3) is refused: its prompt alone would
  silently be another model; `part_of_run` (reading the prompt, not running it) allows it."""
  path = local_path(source, "the prompt")
  method = run_method(path) if path.is_dir() else PromptTuning()
  if not method.has_prompt:
    raise ConfigError(f"{path} was trained with method {method.name}, which has no prompt; "
                      "evaluate it with --model_dir, or export it")
  if not (part_of_run or is_prompt_only(method)):
    raise ConfigError(f"{path} was trained with method {method.name}, which learned more than "
                      "a prompt; evaluate it with --model_dir (not as a prompt), or export it")
  if not path.exists():
    raise FileNotFoundError(f"prompt {path} does not exist; give {_PROMPT_SOURCES}")
  if path.is_file():
    if is_pickle_file(path):
      raise CheckpointError(f"prompt {path} is a pickle; refusing to load it. {SAFE_ALTERNATIVE}")
    return prompts.load_npy(path)
  if (path / "adapter_config.json").is_file():
    return load_peft_adapter(path)
  if (path / PROMPT_FILE).is_file() or (path / CHECKPOINT_SUBDIR).is_dir():
    return best_prompt(path)
  raise FileNotFoundError(f"prompt {path}: a directory with no adapter_config.json, "
                          f"{PROMPT_FILE} or {CHECKPOINT_SUBDIR}/; give {_PROMPT_SOURCES}")


def load_prompt(source) -> np.ndarray:
  """A prompt to read (interpret, similarity): a .npy file, a PEFT adapter directory, or a run
  directory's best (else latest) input prompt, whatever else its method learned."""
  return _prompt_values(source, part_of_run=True)


def run_method(source) -> Method:
  """The method a run directory was trained with (prompt tuning for anything else: a .npy, an
  adapter, a run from before methods existed)."""
  path = pathlib.Path(source)
  meta = read_meta(path) if path.is_dir() and (path / CHECKPOINT_SUBDIR).is_dir() else None
  try:
    return from_description((meta or {}).get("method"))
  except ValueError as e:
    raise ConfigError(f"{path}: {e}") from None


def check_prompt_fits(values: np.ndarray, config, source: str) -> None:
  """A prompt made for another model (another d_model) fails here, before weights are read."""
  shape = tuple(values.shape[:-1]) + (config.emb_dim,)
  prompts.check_fits(prompts.from_array(values, source=source), shape, config.vocab_size,
                     config.emb_dim)


def evaluate(*, model: ModelSpec, task: str, vocabulary=None, model_dir: Optional[str] = None,
             prompt_file: Optional[str] = None, data_source=None, split: str = "validation",
             batch_size: int = 32, input_length: int = 512, target_length: int = 8,
             max_examples: Optional[int] = None, num_partitions: int = 1,
             bad_records: str = "error") -> dict:
  """Metrics of a trained prompt (`prompt_file`, else the run in `model_dir`) on `split`;
  printed to stdout, then written to MODEL_DIR/eval_<split>.json when a run directory is given
  (in that order: a disk that refuses the file loses no metrics). With bad_records='skip', bad
  records are left out and counted in `num_skipped_records`."""
  cc.check("evaluate", locals(), EVALUATE_RULES)
  source = prompt_file or model_dir
  if source is None:
    raise ConfigError("evaluate needs a prompt: set PROMPT_FILE or --model_dir")
  task = get_task(task)  # before reading anything
  pipeline.check_splits(task, data_source, train=None, evals=(split,), bad_records=bad_records)
  common = eval_settings(model, task, vocabulary, num_partitions)
  setup = trained_setup(source, run_method(source) if prompt_file is None else PromptTuning(),
                         common)
  metrics = run_eval(setup, setup.params, split, data_source=data_source, batch_size=batch_size,
                     input_length=input_length, target_length=target_length,
                     max_examples=max_examples, bad_records=bad_records)
  if jax.process_index() == 0:  # every process evaluated alike; one reports
    print(json.dumps(metrics), flush=True)  # first: the metrics outlive a failed write below
    if model_dir is not None:
      output_files.write_text(
          pathlib.Path(model_dir) / eval_file(split),
          json.dumps({"task": setup.task.name, "split": split, "prompt": str(source),
                      "metrics": metrics}, indent=2))
  return metrics


def eval_settings(model: ModelSpec, task, vocabulary, num_partitions: int = 1) -> dict:
  """setup_run's settings for evaluating trained values: no dropout, nothing initialized that
  the trained values do not replace."""
  return dict(model=model, task=task, vocabulary=vocabulary, prompt_init=prompts.random_uniform,
              placement="prepend", trainable=(".*",), num_partitions=num_partitions,
              mesh_shape=None, parameter_partitioning_dims=1, activation_partitioning_dims=1,
              dropout_rate=0.0, seed=0)


def trained_setup(source, method: Method, common: dict):
  """The run's setup (run_setup.setup_run, `common` its settings) with the trained values of
  `source`, a prompt or a run directory trained with `method`."""
  if is_prompt_only(method):  # the prompt alone: prompt.npy, an adapter, a checkpoint
    values = _prompt_values(source)
    return setup_run(**common, prompt_length=values.shape[0], prompt_values=values,
                     prompt_source=str(source))
  # another method: its whole trained subtree, into the module it builds
  meta = required_meta(source)
  return setup_run(**{**common, "placement": meta.get("placement", "prepend")},
                   prompt_length=meta["prompt_length"], method=method,
                   trained=best_trainable(source))


def infer(*, model: ModelSpec, prompts: Mapping[str, str], input_file: str, output_file: str,
          vocabulary=None, batch_size: int = 32, input_length: int = 512,
          target_length: int = 8) -> int:
  """Predictions for a JSONL file whose lines are {"task": name, "inputs": text} or
  {"task": name, "record": {...raw task record...}}; examples of all tasks share batches, each
  with its own prompt from the bank. Every line is checked before the model is loaded. Writes
  {"task", "inputs", "prediction"} lines to `output_file` (`-`: stdout; a pipe or device is
  streamed to, a file replaced atomically: see output_files); returns the number written.
  Several processes share the batches out; process 0 writes the output."""
  cc.check("infer", locals(), INFER_RULES)
  names = sorted(prompts)
  if not names:
    raise ConfigError("infer needs PROMPTS: a mapping task name -> prompt (.npy / run dir)")
  vocab = load_vocabulary(vocabulary)
  config = model_config(model, {"dropout_rate": 0.0})  # metadata only
  check_vocabulary_fits(vocab, config)
  values = bank_prompts(prompts, config)
  bank = np.stack([values[name] for name in names])
  rows = _read_requests(pathlib.Path(input_file), names, get_task)  # a bad line fails fast
  output_files.check_output_path(output_file)  # so does an output that is a directory
  config, frozen = load_frozen(model, None, dropout_rate=0.0)
  net = PromptedT5(config, prompt_length=bank.shape[1], num_prompts=len(names))
  params = make_prompted_params(net, frozen, jax.random.PRNGKey(0), bank)
  decoded = _decode_requests(net, params, rows, names, vocab, batch_size, input_length,
                             target_length)
  if jax.process_index() == 0:  # every process holds every prediction; one writes them
    with output_files.open_output(output_file) as out:
      for row, text in zip(rows, decoded):
        out.write(json.dumps({"task": row["task"], "inputs": row["inputs"],
                              "prediction": text}) + "\n")
  return len(rows)


def bank_prompts(prompts: Mapping[str, str], config, shape=None) -> dict[str, np.ndarray]:
  """The prompt of each task of a bank (PROMPTS: task name -> a .npy, a PEFT adapter or a run
  directory), each checked to fit the model `config` and all of one shape (`shape`, when the
  bank already has one)."""
  values = {}
  for name, source in sorted(prompts.items()):
    values[name] = _prompt_values(source)
    check_prompt_fits(values[name], config, f"PROMPTS[{name!r}] {source}")
  shapes = {name: tuple(v.shape) for name, v in values.items()}
  if shape is not None and any(s != tuple(shape) for s in shapes.values()):
    raise PromptShapeError(f"the bank's prompts are {tuple(shape)}; PROMPTS has {shapes}")
  if len(set(shapes.values())) > 1:
    raise PromptShapeError(f"the prompts of a bank must share one shape; PROMPTS has {shapes}")
  return values


def _decode_requests(net, params, rows, names, vocab, batch_size, input_length,
                     target_length) -> list[str]:
  """Predictions for all `rows`. With several processes each decodes every process_count-th
  batch on its own devices, and the token ids are gathered (one exchange per round)."""
  rank, world = jax.process_index(), jax.process_count()
  starts = list(range(0, len(rows), batch_size))
  texts = []
  shown = Progress("infer", len(rows))  # stderr, process 0: stdout may carry the predictions
  for first in range(0, len(starts), world):
    round_starts = starts[first:first + world]
    ids_BxL = np.zeros((batch_size, target_length), np.int32)  # a process with no batch
    if rank < len(round_starts):
      chunk = rows[round_starts[rank]:round_starts[rank] + batch_size]
      tokens = vocab.encode_batch([r["inputs"] for r in chunk], max_length=input_length)
      ids = np.array([names.index(r["task"]) for r in chunk], np.int32)
      # Padded to one compiled shape whatever the task mix.
      ids_BxL[:len(chunk)] = decode_in_batches(net, params, tokens, batch_size=batch_size,
                                               target_length=target_length, prompt_ids_N=ids)
    gathered = (ids_BxL[None] if world == 1 else
                np.asarray(multihost_utils.process_allgather(ids_BxL)))  # [world, B, L]
    for start, batch_ids in zip(round_starts, gathered):
      count = len(rows[start:start + batch_size])
      texts += [vocab.decode(row) for row in batch_ids[:count]]
    shown.update(len(texts))  # the final line comes when all are done
  return texts


def _read_requests(path: pathlib.Path, names, get_task) -> list[dict]:
  """The request lines, each checked against the bank; errors name file:line and field (a
  RecordError, reason as the data pipeline counts them)."""
  return [request_row(row, location, names, get_task)
          for location, row in located_records(path)]


def export_prompt(model_dir: str, out: str, peft_num_layers: Optional[int] = None,
                  peft_num_heads: Optional[int] = None,
                  base_model: Optional[str] = None) -> pathlib.Path:
  """The run's best (else latest) prompt as `.npy`, or as a PEFT adapter directory when `out`
  does not end in .npy (then the model's layer and head counts are needed).

  The .npy goes through output_files: a file (or a symlink's target) is replaced atomically; `-`
  writes the .npy bytes to stdout, and a pipe or device (/dev/null, a FIFO) is streamed to
  whatever its name, since an adapter directory cannot be streamed. An adapter directory's
  files are each written atomically (a symlinked directory keeps its link).

  The adapter's `base_model_name_or_path` (what AutoPeftModelForSeq2SeqLM loads) is
  `base_model` (a hub id, or a local Hugging Face directory, written absolute), else the run's
  frozen checkpoint when that is a Hugging Face directory; else it stays null, said on stderr."""
  if not pathlib.Path(model_dir).is_dir():
    raise FileNotFoundError(f"run directory {model_dir} does not exist")
  out_path = pathlib.Path(out)
  method = run_method(model_dir)
  # A method with an export of its own writes its format (per-layer prompts, IA3 adapters, ...);
  # one with a prompt and none (prompt tuning, wayward prompts) exports the prompt.
  if not is_prompt_only(method):
    return method.export(pathlib.Path(model_dir), best_trainable(model_dir),
                         required_meta(model_dir), out_path, base_model=base_model)
  to_npy = out_path.suffix == ".npy" or output_files.is_stream(out)
  if to_npy and base_model is not None:
    raise UsageError(f"--base_model goes into a PEFT adapter's config; --out {out} is a plain "
                     ".npy prompt (give a directory to write an adapter)")
  values = best_prompt(model_dir)
  if to_npy:
    prompts.save_npy(out, values)
    return out_path
  meta = required_meta(model_dir)
  meta_config = meta["config"]
  base = adapter_base_model(base_model, (meta.get("model") or {}).get("checkpoint"),
                            values.shape[-1])
  adapter = save_peft_adapter(out_path, values,
                              num_layers=peft_num_layers or meta_config["num_encoder_layers"],
                              num_heads=peft_num_heads or meta_config["num_heads"],
                              base_model_name_or_path=base)
  if base is None:
    print(f"note: {adapter / ADAPTER_CONFIG} has base_model_name_or_path null (the run's "
          "frozen model is not a Hugging Face directory here), so AutoPeftModelForSeq2SeqLM "
          "cannot load it alone; export again with --base_model NAME (a hub id such as "
          "google/t5-v1_1-base, or a local Hugging Face T5 directory), or load it with "
          "PeftModel.from_pretrained(model, adapter)", file=sys.stderr, flush=True)
  return adapter
