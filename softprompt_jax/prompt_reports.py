"""What trained prompts say: `interpret` (a run's prompt read as its nearest vocabulary tokens
and, given a task, the accuracy of the prompt and of its projection onto those tokens) and
`similarity` (SPoT's measures between prompts, `prompt_similarity`)."""

from __future__ import annotations

import json
import pathlib
import re
import sys
from typing import Optional

import jax

from softprompt_jax import config_checks as cc
from softprompt_jax import model_spec, nearest_tokens, output_files, prompt_similarity
from softprompt_jax.data import get_task, pipeline
from softprompt_jax.errors import UsageError
from softprompt_jax.evaluation import run_eval
from softprompt_jax.inference import (check_prompt_fits, eval_settings, load_prompt, run_method,
                                      trained_setup)
from softprompt_jax.model_spec import ModelSpec
from softprompt_jax.prompted_t5 import get_prompt, with_prompt
from softprompt_jax.run_dir import required_meta
from softprompt_jax.run_layout import CONFIG_FILE, INTERPRETATION_FILE, OPERATIVE_CONFIG_FILE
from softprompt_jax.run_setup import check_vocabulary_fits, load_vocabulary, model_config

_LENGTH = cc.integer(1, optional=True)
INTERPRET_RULES = {
    "model_dir": cc.path(), "model": cc.instance(ModelSpec, "@frozen_model()", optional=True),
    "vocabulary": cc.text(optional=True), "k": cc.POSITIVE,
    "nearest_by": cc.one_of(*nearest_tokens.NEAREST_BY), "task": cc.text(optional=True),
    "data_source": cc.data_source(), "split": cc.text(), "max_examples": _LENGTH,
    "batch_size": _LENGTH, "input_length": _LENGTH, "target_length": _LENGTH,
}
# evaluate's defaults, where the run's recorded config does not say.
_EVAL_DEFAULTS = {"batch_size": 32, "input_length": 512, "target_length": 8}


def interpret_prompt(*, model_dir: str, model: Optional[ModelSpec] = None, vocabulary=None,
                     k: int = 5, nearest_by: str = "cosine", task: Optional[str] = None,
                     data_source=None, split: str = "validation",
                     max_examples: Optional[int] = None, batch_size: Optional[int] = None,
                     input_length: Optional[int] = None,
                     target_length: Optional[int] = None) -> dict:
  """The k vocabulary tokens nearest to each position of the run's prompt (`nearest_by` cosine
  similarity or Euclidean distance) and, with a `task`, the task's metrics on `split` of the
  prompt as trained ("continuous", what `eval` reports) and of its projection (each vector
  replaced by its nearest token's embedding: "projected"), printed as one JSON line.

  Writes MODEL_DIR/interpretation.json: {"prompt", "nearest_by", "nearest_tokens": one row per
  position} plus, with a task, {"task", "split", "continuous", "projected"}. The frozen model,
  the vocabulary, the data (for the run's own task) and the batch size and lengths (train's)
  default to the run's."""
  cc.check("interpret", locals(), INTERPRET_RULES)
  task = get_task(task) if task is not None else None  # an unknown name fails first
  values = load_prompt(model_dir)
  meta = (required_meta(model_dir) if (model is None or vocabulary is None or task is not None)
          else {})
  if model is None:
    spec = dict(meta["model"])
    spec["overrides"] = tuple(sorted(spec["overrides"].items()))
    model = ModelSpec(**spec)
  vocabulary = vocabulary or meta.get("vocabulary")
  vocab = load_vocabulary(vocabulary) if vocabulary else None
  config = model_config(model, {})  # metadata only
  if vocab is not None:
    check_vocabulary_fits(vocab, config)
  check_prompt_fits(values, config, str(model_dir))
  reading = {"prompt": str(model_dir), "nearest_by": nearest_by}
  if task is None:
    _, frozen = model_spec.load_frozen(model, None)
    reading["nearest_tokens"] = nearest_tokens.describe(
        values, frozen["token_embedder"]["embedding"], vocab, k=k, by=nearest_by)
  else:
    if data_source is None and task.name == meta.get("task"):
      data_source = meta.get("data_source")  # the run's own data
    pipeline.check_splits(task, data_source, train=None, evals=(split,))
    given = {"batch_size": batch_size, "input_length": input_length,
             "target_length": target_length}
    sizes = {name: value or _run_setting(model_dir, name) or _EVAL_DEFAULTS[name]
             for name, value in given.items()}
    reading.update(_accuracies(model_dir, eval_settings(model, task, vocabulary), k, nearest_by,
                               split, data_source=data_source, max_examples=max_examples,
                               **sizes))
    if jax.process_index() == 0:
      print(json.dumps({key: reading[key] for key in ("task", "split", "continuous",
                                                      "projected")}), flush=True)
  output_files.write_text(pathlib.Path(model_dir) / INTERPRETATION_FILE,
                          json.dumps(reading, indent=1, ensure_ascii=False))
  return reading


def _accuracies(model_dir, settings: dict, k: int, nearest_by: str, split: str,
                **eval_args) -> dict:
  """The nearest tokens and the metrics of the run's prompt as trained and projected onto
  them, evaluated alike (one frozen model, one compiled decoder)."""
  setup = trained_setup(model_dir, run_method(model_dir), settings)
  params = setup.params
  prompt_PxH = get_prompt(params)
  embedding_VxH = params["token_embedder"]["embedding"]
  rows = nearest_tokens.describe(prompt_PxH, embedding_VxH, setup.vocabulary, k=k,
                                 by=nearest_by)
  _, projected_PxH = nearest_tokens.project(prompt_PxH, embedding_VxH, by=nearest_by)
  projected_PxH = projected_PxH.astype(prompt_PxH.dtype)  # numpy: jit places it as the prompt
  continuous = run_eval(setup, params, split, **eval_args)
  projected = run_eval(setup, with_prompt(params, projected_PxH), split, **eval_args)
  return {"nearest_tokens": rows, "task": setup.task.name, "split": split,
          "continuous": continuous, "projected": projected}


def _run_setting(model_dir, name: str) -> Optional[int]:
  """train.<name> as the run's recorded gin config sets it (an integer, or a macro bound to
  one), else None."""
  for file_name in (OPERATIVE_CONFIG_FILE, CONFIG_FILE):
    path = pathlib.Path(model_dir) / file_name
    if not path.is_file():
      continue
    text = path.read_text(errors="replace")
    found = re.search(rf"^train\.{name}\s*=\s*(\S+)\s*$", text, re.MULTILINE)
    value = found.group(1) if found else None
    if value and value.startswith("%"):  # one macro, as the shipped run configs write it
      found = re.search(rf"^{re.escape(value[1:])}\s*=\s*(\S+)\s*$", text, re.MULTILINE)
      value = found.group(1) if found else None
    if value and value.isdigit() and int(value) > 0:
      return int(value)
  return None


def compare_prompts(sources: list[str], out: Optional[str]) -> str:
  """SPoT's similarity matrices (`prompt_similarity`) of the prompts at `sources` (run
  directories, .npy files, PEFT adapters), written as JSON to `out` (unless None; `-` is
  stdout); returns the matrices as text."""
  named = {}
  for source in sources:
    if source in named:
      raise UsageError(f"{source} is given twice")
    named[source] = load_prompt(source)
  report = prompt_similarity.similarity_report(named)
  if out is not None:
    output_files.write_text(out, prompt_similarity.report_json(report))
  return prompt_similarity.format_report(report)


def run_similarity(args, extra) -> int:
  """The `similarity` command (see add_similarity_command)."""
  if extra:
    raise UsageError(f"unknown arguments {extra}")
  text = compare_prompts(args.prompts, args.out)
  # Beside JSON on stdout (--out -), the matrices go to stderr.
  print(text, file=sys.stderr if output_files.is_stdout(args.out) else sys.stdout, flush=True)
  if not output_files.is_stdout(args.out):
    print(f"wrote {args.out}")
  return 0


def add_similarity_command(command) -> None:
  """The `similarity` subcommand, made by the command line's `command(name, summary,
  description, examples)` (kept here: the command line's module is at its size limit)."""
  parser = command(
      "similarity", "how alike prompts are (SPoT's prompt similarity)",
      "Compare soft prompts as SPoT (Vu et al. 2022) compares task prompts to find the source "
      "task whose prompt transfers best: for every pair, the cosine similarity of the average "
      "prompt vectors ('average'), the mean cosine similarity over all pairs of prompt vectors "
      "('per_token'), and the mean cosine similarity position by position ('per_position', "
      "prompts of one length). Prints the matrices and writes them as JSON.",
      ["/tmp/run_a /tmp/run_b released_prompt.npy", "/tmp/run_a /tmp/run_b --out sim.json"])
  parser.add_argument("prompts", nargs="+", metavar="RUN_OR_NPY",
                      help="a run directory (its best prompt), a .npy prompt or a PEFT adapter")
  parser.add_argument("--out", default="prompt_similarity.json",
                      help="the JSON report (- for stdout)")
  parser.set_defaults(run=run_similarity)
