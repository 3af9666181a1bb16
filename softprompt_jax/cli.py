"""The `softprompt-jax` command (also `python -m softprompt_jax`): prompt tuning of a frozen T5.

`softprompt-jax COMMAND --help` shows a command's options, their defaults and an example.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib.util
import inspect
import os
import pathlib
import signal
import sys
import traceback

import gin
import jax

from softprompt_jax import __version__, generate, gin_setup, multihost, output_files, prompt_reports
from softprompt_jax.checkpoints.convert import convert_checkpoint
from softprompt_jax.demo import run_demo
from softprompt_jax.errors import ConfigError, UsageError, is_user_error, one_line
from softprompt_jax.inference import export_prompt
from softprompt_jax.partitioning import is_primary_process
from softprompt_jax.paths import local_path
from softprompt_jax.preemption import Interrupted, Preempted, SignalsAsExceptions
from softprompt_jax.run_layout import CHECKPOINT_SUBDIR, CONFIG_FILE, OPERATIVE_CONFIG_FILE
from softprompt_jax.run_lock import RunDirectoryBusy, RunLock
from softprompt_jax.serving import serve
from softprompt_jax.training_loop import ALREADY_COMPLETE

TRACEBACK_ENV = "SOFTPROMPT_JAX_TRACEBACK"
# Exit status of a run stopped by a configuration or input error (argparse's usage status).
USAGE_STATUS = 2
# The commands that join the other processes of a multi-host run.
MULTI_HOST_COMMANDS = ("train", "eval", "infer")
_LOCAL_RUN_DIR = "give a local directory; copy the run to the bucket afterwards"


def _generate(args, extra) -> int:
  if extra:
    raise UsageError(f"unknown arguments {extra}")
  return generate.run_generate(args)


def _gin_run(args, extra) -> int:
  """train / eval / infer / interpret: parse gin as t5x does, then call the bound function."""
  bindings = list(args.gin_bindings)
  for item in extra:
    if not item.startswith("--gin."):
      raise UsageError(f"unknown argument {item!r} (gin bindings are written --gin.PARAM=VALUE)")
    bindings.append(item[len("--gin."):])
  if not args.gin_file and args.command != "interpret":
    raise UsageError("give at least one --gin_file (e.g. runs/smoke.gin)")
  if args.command == "interpret" and not args.model_dir:
    raise UsageError("give --model_dir (the run to read)")
  if args.model_dir:  # before gin's MODEL_DIR gets it: `~` expanded, a URL refused
    args.model_dir = os.fspath(local_path(args.model_dir, "--model_dir", advice=_LOCAL_RUN_DIR))
  search_paths = [os.fspath(local_path(p, "--gin_search_paths"))
                  for p in (args.gin_search_paths or "").split(",") if p.strip()]
  gin_setup.parse(args.gin_file, bindings, args.model_dir, search_paths)
  configurables = gin_setup.register()
  name = {"train": "train", "eval": "evaluate", "infer": "infer",
          "interpret": "interpret", "serve": "serve"}[args.command]
  passed = {"model_dir": args.model_dir} if args.command == "interpret" else {}
  if args.command == "serve":  # the flags win over the gin files
    passed = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
  _check_required_bound(name, configurables[name], passed)
  watch = _initialize_distributed(args) if args.command in MULTI_HOST_COMMANDS else None
  try:
    status = _run_configurable(args, configurables[name], passed)
  except BaseException as error:
    if watch is not None and isinstance(error, Preempted):
      watch.done()  # every process stops alike at a preemption: nothing to tell the others
    elif watch is not None:
      watch.failed(one_line(error))
      if isinstance(error, Exception):
        # JAX's exit would wait for the other processes (or abort once process 0 has gone),
        # and they are stopping: report the error as `main` does and end here.
        sys.stderr.flush()
        os._exit(_report(args, error))
    raise
  if watch is not None:
    watch.done()
  return status


def _run_configurable(args, configurable, passed: dict) -> int:
  if args.command == "interpret":
    configurable(**passed)
    print(f"wrote {pathlib.Path(args.model_dir) / 'interpretation.json'}")
    return 0
  if args.command == "train":
    run_dir = args.model_dir or _bound_value("train.model_dir")
    if not run_dir:
      raise UsageError("give --model_dir (the run directory, where checkpoints and logs go)")
    return _train(run_dir, configurable)
  result = configurable(**passed)
  if args.command == "infer" and is_primary_process():
    print(f"wrote {result} predictions", file=_message_stream(_bound_value("infer.output_file")))
  return 0


def _message_stream(output):
  """Where to say what was written: stderr when the output itself is stdout (`-`,
  /dev/stdout), which a message would corrupt; else stdout."""
  return sys.stderr if output_files.is_stdout(output) else sys.stdout


def _initialize_distributed(args):
  """`multihost.join` with this command's flags (the environment fills what they leave out)."""
  return multihost.join(
      f"softprompt-jax {args.command}", coordinator_address=args.coordinator_address,
      num_processes=args.num_processes, process_id=args.process_id,
      peer_timeout_s=args.peer_timeout_s, initialization_timeout_s=args.initialization_timeout_s)


def _check_required_bound(name: str, fn, passed: dict) -> None:
  """A required parameter left unbound is a configuration error, not a TypeError mid-call."""
  for param in inspect.signature(fn).parameters.values():
    if param.default is not inspect.Parameter.empty or param.name in passed:
      continue
    try:
      gin.query_parameter(f"{name}.{param.name}")
    except ValueError:
      hint = " (or give --model_dir)" if param.name == "model_dir" else ""
      raise ConfigError(f"{name}.{param.name} is not set: bind it in a gin file or with "
                        f"--gin.{name}.{param.name}=...{hint}") from None


def _bound_value(selector: str):
  """The value gin binds to `selector`, through one macro (`train.model_dir = %MODEL_DIR`)."""
  value = gin.query_parameter(selector)
  if isinstance(value, gin.config.ConfigurableReference) and value.selector == "gin.macro":
    value = gin.query_parameter(str(value))  # "%NAME" queries the macro
  return value


def _train(run_dir: str | os.PathLike, train) -> int:
  """Records the configuration in the run directory; a run that fails before its first
  checkpoint (a configuration error) leaves the directory as it found it."""
  # A URL bound in gin (train.model_dir = 'gs://...') would become a local folder 'gs:'.
  run_dir = local_path(run_dir, "train.model_dir", advice=_LOCAL_RUN_DIR)
  primary = is_primary_process()  # only process 0 writes the record
  if run_dir.exists() and not run_dir.is_dir():
    raise UsageError(f"--model_dir {run_dir} is a file; give a directory (new or a run's)")
  created = not run_dir.exists()
  lock = RunLock(run_dir)
  if primary:  # before anything is written: a second train here must not touch the record
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
      lock.acquire()
    except RunDirectoryBusy:
      if created:
        run_dir.rmdir()
      raise
  config_file = run_dir / CONFIG_FILE
  previous = config_file.read_text() if config_file.is_file() else None
  steps_before = _checkpoint_names(run_dir)
  try:
    # Atomic (as every record): a full disk leaves the old file or none, never a part.
    if primary and previous != gin.config_str():  # a rerun leaves the record as it is
      output_files.write_text(config_file, gin.config_str())
    result = train()
  except BaseException:  # a preemption has saved a checkpoint: the record stays
    lock.release()
    if primary and _checkpoint_names(run_dir) == steps_before:  # nothing trained: undo
      # As far as the disk lets it (full or read-only): the error that stopped the run is
      # the one to report.
      with contextlib.suppress(OSError):
        if previous is None:
          config_file.unlink(missing_ok=True)
        elif config_file.read_text() != previous:
          output_files.write_text(config_file, previous)
        if created and not any(run_dir.iterdir()):
          run_dir.rmdir()
    raise
  lock.release()
  operative = run_dir / OPERATIVE_CONFIG_FILE
  if primary and not (result.get(ALREADY_COMPLETE) and operative.is_file()):
    output_files.write_text(operative, gin.operative_config_str())  # written once it is whole
  return 0


def _checkpoint_names(run_dir: pathlib.Path) -> list[str]:
  directory = run_dir / CHECKPOINT_SUBDIR
  return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def _export(args, extra) -> int:
  if extra:
    raise UsageError(f"unknown arguments {extra}")
  model_dir = local_path(args.model_dir, "--model_dir", advice=_LOCAL_RUN_DIR)
  out = export_prompt(str(model_dir), args.out, base_model=args.base_model)
  print(f"wrote {out}", file=_message_stream(args.out))
  return 0


def _convert(args, extra) -> int:
  if extra:
    raise UsageError(f"unknown arguments {extra}")
  out, notes = convert_checkpoint(args.input, args.output, to=args.to,
                                  source_format=args.source_format, step=args.step)
  for note in notes:
    print(f"softprompt-jax convert: note: {note}", file=sys.stderr, flush=True)
  print(f"wrote {out}")
  return 0


def _demo(args, extra) -> int:
  if extra:
    raise UsageError(f"unknown arguments {extra}")
  run_demo(args.run_dir, task_name=args.task, prompt_length=args.prompt_length, steps=args.steps,
           model_tuning_steps=args.model_tuning_steps, eval_examples=args.eval_examples,
           seed=args.seed)
  return 0


def build_parser() -> argparse.ArgumentParser:
  class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Paragraphs are wrapped, indented example lines kept whole; a default is shown where it
    says something (not None, an unset flag or an empty list)."""

    def _fill_text(self, text, width, indent):
      return "\n".join(indent + line if line.startswith("  ") or not line.strip()
                       else super(Help, self)._fill_text(line, width, indent)
                       for line in text.splitlines())

    def _get_help_string(self, action):
      default = action.default
      if default is None or default is False or (isinstance(default, list) and not default):
        return action.help
      return super()._get_help_string(action)

  def command(name, summary, description, examples):
    epilog = "example:\n" + "\n".join(f"  softprompt-jax {name} {e}".rstrip() for e in examples)
    return sub.add_parser(name, help=summary, description=description, epilog=epilog,
                          formatter_class=Help, parents=[common])

  parser = argparse.ArgumentParser(
      prog="softprompt-jax", description=__doc__, formatter_class=Help,
      epilog="example:\n  softprompt-jax demo\n  softprompt-jax train --help")
  parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
  traceback_help = (f"on a configuration or input error, show the full traceback rather than "
                    f"one line (also {TRACEBACK_ENV}=1)")
  parser.add_argument("--traceback", action="store_true", help=traceback_help)
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  # Accepted after the command too; SUPPRESS keeps a subcommand from resetting the flag.
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS,
                      help=traceback_help)
  gin_note = (" Gin files are looked up in the working directory, then in the shipped configs/; "
              "--gin.PARAM=VALUE binds one parameter after them.")
  gin_commands = [
      ("train", "prompt-tune (resumes when run again)",
       "Prompt-tune a frozen T5 as the gin files configure it. The run directory gets the "
       "checkpoints, metrics, the best prompt (prompt.npy) and summary.json; the same command "
       "run again resumes from the last checkpoint." + gin_note,
       ["--gin_file runs/smoke.gin --model_dir /tmp/smoke"]),
      ("eval", "evaluate a trained prompt on a split",
       "Evaluate a run's best (else latest) prompt, or a .npy given as PROMPT_FILE, on one split "
       "of a task; prints the metrics and writes eval_<split>.json into the run directory."
       + gin_note,
       ["--gin_file models/tiny.gin --gin_file runs/prompt_eval.gin "
        "--gin.TASK=\"'taskless_synthetic_sentiment'\" --gin.evaluate.input_length=64 "
        "--gin.evaluate.target_length=10 --model_dir /tmp/smoke"]),
      ("infer", "predict a JSONL file with a bank of prompts",
       "Decode a JSONL file of {\"task\": ..., \"inputs\": ...} lines with one prompt per task "
       "(a run directory or a .npy), tasks mixed in one batch; writes one prediction per line."
       + gin_note,
       ["--gin_file models/tiny.gin --gin_file runs/prompt_infer.gin "
        "--gin.PROMPTS=\"{'taskless_synthetic_sentiment': '/tmp/smoke'}\" "
        "--gin.INPUT_FILE=\"'in.jsonl'\" --gin.OUTPUT_FILE=\"'out.jsonl'\""]),
      ("interpret", "nearest vocabulary tokens of a run's prompt (and their accuracy)",
       "Read a run's prompt as the vocabulary tokens nearest to each prompt vector; with "
       "interpret.task, also evaluate the prompt and its projection onto those tokens (each "
       "vector replaced by its nearest token's embedding) on interpret.split (default "
       "validation; data, batch size and lengths default to the run's). Writes "
       "interpretation.json in the run directory." + gin_note,
       ["--model_dir /tmp/smoke",
        "--model_dir /tmp/smoke --gin.interpret.task=\"'taskless_synthetic_sentiment'\""]),
      serve.COMMAND,
  ]
  for name, summary, description, examples in gin_commands:
    p = command(name, summary, description, examples)
    p.add_argument("--gin_file", action="append", default=[],
                   help="gin file (repeatable, applied in order; looked up in ./ and configs/)")
    p.add_argument("--gin_bindings", action="append", default=[],
                   help="a gin binding, e.g. 'train.num_steps = 100' (also --gin.PARAM=VALUE)")
    p.add_argument("--model_dir", help="the run directory; sets the gin macro MODEL_DIR")
    p.add_argument("--gin_search_paths",
                   help="comma-separated directories where --gin_file names are looked up "
                   "first (as t5x's flag)")
    if name in MULTI_HOST_COMMANDS:
      multihost.add_flags(p)
    if name == "serve":
      p.add_argument("--host", help="the address to listen on (serve.host; default 127.0.0.1)")
      p.add_argument("--port", type=int, help="the port (serve.port; 0 picks a free one)")
    p.set_defaults(run=_gin_run)
  prompt_reports.add_similarity_command(command)
  exp = command("export", "write a run's best (else latest) prompt",
                "Write a run's best (else latest) prompt as a .npy file ([P, d_model], float32, "
                "the released prompts' format) or, when --out is not a .npy, as a PEFT adapter "
                "directory that PyTorch users load with PEFT. The adapter names its base model "
                "(base_model_name_or_path, what AutoPeftModelForSeq2SeqLM loads): --base_model, "
                "else the run's frozen checkpoint when that is a Hugging Face directory.",
                ["--model_dir /tmp/smoke --out prompt.npy",
                 "--model_dir /tmp/smoke --out /tmp/smoke_adapter",
                 "--model_dir /tmp/run --out /tmp/adapter --base_model google/t5-v1_1-base"])
  exp.add_argument("--model_dir", required=True, help="the run directory to read")
  exp.add_argument("--out", required=True, help="FILE.npy (or - for stdout), or a directory for "
                   "a PEFT adapter")
  exp.add_argument("--base_model", help="the adapter's base model: a Hugging Face hub id, or a "
                   "local Hugging Face T5 directory (written as an absolute path)")
  exp.set_defaults(run=_export)
  conv = command("convert", "convert a T5 checkpoint between t5x and Hugging Face",
                 "Convert a frozen T5 between a t5x checkpoint (read: legacy or orbax; written: "
                 "t5x's legacy layout, no optimizer state, so restore it with "
                 "fallback_to_scratch) and a Hugging Face directory (config.json + "
                 "model.safetensors). Weights are checked as training loads them and written as "
                 "float32; OUT must be new or empty.",
                 ["--from t5x --to hf /ckpt/t5_1_1_base/checkpoint_1000000 /tmp/t5_base_hf",
                  "--from hf --to t5x /tmp/t5_base_hf /tmp/t5x/checkpoint_1000000 --step 1000000"])
  conv.add_argument("input", metavar="IN", help="the checkpoint to read (t5x checkpoint_N/, "
                    "or a Hugging Face directory)")
  conv.add_argument("output", metavar="OUT", help="the directory to write (new or empty)")
  conv.add_argument("--from", dest="source_format", choices=["t5x", "hf"],
                    help="IN's format, checked (default: found from IN)")
  conv.add_argument("--to", required=True, choices=["t5x", "hf"], help="OUT's format")
  conv.add_argument("--step", type=int, default=0, help="with --to t5x: the training step "
                    "recorded in the checkpoint (t5x counts TRAIN_STEPS on from it)")
  conv.set_defaults(run=_convert)
  demo = command("demo", "prompt tuning on the shipped tiny T5, offline, in minutes",
                 "Prompt-tune the tiny T5 shipped inside the package on a synthetic task shown "
                 "without its written instruction, and compare held-out accuracy with no prompt, "
                 "the instruction and model tuning. Offline; a few minutes on a laptop CPU.",
                 ["", "--run_dir /tmp/demo --steps 100"])
  demo.add_argument("--run_dir", default="demo_run", help="where the runs, prompt.npy, "
                    "curves.png and summary.json go")
  demo.add_argument("--task", default="sentiment", help="a synthetic task, shown without its "
                    "written instruction")
  demo.add_argument("--prompt_length", type=int, default=20, help="prompt vectors (P)")
  demo.add_argument("--steps", type=int, default=300, help="prompt-tuning steps")
  demo.add_argument("--model_tuning_steps", type=int, default=300,
                    help="steps of the model-tuning baseline (all weights trained)")
  demo.add_argument("--eval_examples", type=int, default=200, help="held-out test examples")
  demo.add_argument("--seed", type=int, default=0, help="seed of the data and the runs")
  demo.set_defaults(run=_demo)
  gen = command("generate", "load a T5 checkpoint and decode some inputs",
                "Load a t5x or Hugging Face T5 checkpoint (no prompt) and decode the inputs, "
                "printing the texts and timings. Without --checkpoint a tiny random model is "
                "written on the fly: its output is arbitrary, it shows the load-and-decode path.",
                ["", "--checkpoint /ckpt/checkpoint_1100000 --vocab /vocab/sentencepiece.model "
                 "--input 'translate English to German: Hello.' --method beam"])
  gen.add_argument("--checkpoint", help="t5x or Hugging Face checkpoint (default: a tiny random "
                   "model written on the fly)")
  gen.add_argument("--vocab", default="byte", help="'byte' (ByT5), a SentencePiece .model "
                   "file, or a model directory holding spiece.model")
  gen.add_argument("--input", nargs="+", default=["reverse: hello world", "sort: c a b"],
                   help="texts to decode")
  gen.add_argument("--method", choices=["greedy", "beam", "sample"], default="greedy",
                   help="decoding method")
  gen.add_argument("--max_length", type=int, default=16, help="most tokens decoded per input")
  gen.add_argument("--max_input_length", type=int, default=64,
                   help="input tokens kept; longer inputs are cut")
  gen.add_argument("--num_beams", type=int, default=4, help="beams, for --method beam")
  gen.add_argument("--temperature", type=float, default=1.0,
                   help="for --method sample; 0 is greedy")
  gen.add_argument("--top_k", type=int, default=0, help="for --method sample; 0 turns it off")
  gen.add_argument("--top_p", type=float, default=1.0, help="for --method sample; 1 turns it off")
  gen.add_argument("--seed", type=int, default=0, help="seed of sampling and of the random model")
  gen.set_defaults(run=_generate)
  return parser


def _no_tpu_lookup_without_a_tpu() -> None:
  """With libtpu installed (the [tpu] and [test] extras) JAX looks for a TPU, and on a machine
  without one libtpu prints a page of warnings: skip the TPU where none can be (no /dev/accel*,
  no /dev/vfio) and no GPU plugin is installed either. JAX_PLATFORMS, when set, decides."""
  if os.environ.get("JAX_PLATFORMS") or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/*"):
    return
  if importlib.util.find_spec("libtpu") is None:
    return
  if any(importlib.util.find_spec(f"jax_{kind}_plugin") for kind in
         ("cuda12", "cuda13", "rocm6", "rocm7")):
    return
  jax.config.update("jax_platforms", "cpu")


def main(argv=None) -> int:
  """Runs a command; returns its exit status. A configuration or input error (see
  `is_user_error`) prints one line, `softprompt-jax COMMAND: error: MESSAGE`, and returns 2;
  anything else (a bug) propagates with its traceback. `train` stopped by SIGTERM / SIGINT after
  saving a checkpoint returns 143 / 130 (128 + the signal, as a shell reports a process the
  signal ended: not 0, so no supervisor takes the run for complete); a multi-host process that
  lost another exits with PEER_LOST_STATUS (75). Rerunning the same command resumes both."""
  args, extra = build_parser().parse_known_args(argv)
  _no_tpu_lookup_without_a_tpu()
  try:
    with SignalsAsExceptions():
      return args.run(args, extra)
  except Preempted as stopped:
    print(f"softprompt-jax {args.command}: {one_line(stopped)}", file=sys.stderr, flush=True)
    return stopped.exit_status
  except (Interrupted, KeyboardInterrupt) as stopped:  # where no checkpoint could be made
    if _show_traceback(args):
      raise
    stopped = stopped if isinstance(stopped, Interrupted) else Interrupted(signal.SIGINT)
    after = ("run the same command again: it resumes from the last checkpoint, if any"
             if args.command == "train" else "nothing was written")
    print(f"softprompt-jax {args.command}: {stopped}; {after}", file=sys.stderr, flush=True)
    return stopped.exit_status
  except Exception as error:
    if _show_traceback(args) or not is_user_error(error):
      raise
    return _report(args, error)


def _show_traceback(args) -> bool:
  return args.traceback or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def _report(args, error: Exception) -> int:
  """Prints `error` as `main` does (one line, or its traceback) and returns the exit status."""
  if _show_traceback(args) or not is_user_error(error):
    traceback.print_exception(error)
    return 1
  print(f"softprompt-jax {args.command}: error: {one_line(error)}", file=sys.stderr, flush=True)
  return USAGE_STATUS


if __name__ == "__main__":
  sys.exit(main())
