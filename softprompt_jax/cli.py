"""The `softprompt-jax` command (also `python -m softprompt_jax`)."""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time


def _generate(args, extra=()) -> int:
  if extra:
    raise SystemExit(f"softprompt-jax generate: unknown arguments {extra}")
  import jax
  import numpy as np

  from softprompt_jax import decoding
  from softprompt_jax.loading import load_t5
  from softprompt_jax.tokenizers import get_vocabulary

  vocab = get_vocabulary(args.vocab)
  checkpoint = args.checkpoint
  if checkpoint is None:
    checkpoint = _write_tiny_random_checkpoint(pathlib.Path(tempfile.mkdtemp()) / "tiny_t5",
                                               args.seed)
    print(f"no --checkpoint given: wrote a tiny randomly initialised ByT5-style model to "
          f"{checkpoint} (its output is arbitrary bytes; it shows the load-and-decode path)")
  start = time.perf_counter()
  model, params = load_t5(checkpoint, dropout_rate=0.0)
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  print(f"loaded {checkpoint}: {n_params:,} parameters in {time.perf_counter() - start:.1f}s; "
        f"{model.config.num_encoder_layers}+{model.config.num_decoder_layers} layers, "
        f"d_model {model.config.emb_dim}")
  tokens = vocab.encode_batch(args.input, max_length=args.max_input_length)
  start = time.perf_counter()
  if args.method == "beam":
    out = decoding.beam_search(model, params, tokens, args.max_length, num_beams=args.num_beams)
  elif args.method == "sample":
    out = decoding.sample_decode(model, params, tokens, args.max_length,
                                 rng=jax.random.PRNGKey(args.seed), temperature=args.temperature,
                                 top_k=args.top_k, top_p=args.top_p)
  else:
    out = decoding.greedy_decode(model, params, tokens, args.max_length)
  out = np.asarray(out)
  print(f"{args.method} decoding of {len(args.input)} inputs took "
        f"{time.perf_counter() - start:.1f}s (compilation included)")
  for text, ids in zip(args.input, out):
    print(f"  {text!r} -> {vocab.decode(ids)!r}  ids={ids.tolist()}")
  return 0


def _write_tiny_random_checkpoint(directory: pathlib.Path, seed: int) -> pathlib.Path:
  import jax

  from softprompt_jax.checkpoints.hf_writer import save_hf_t5
  from softprompt_jax.t5 import T5, init_params
  from softprompt_jax.t5_config import tiny_config
  config = tiny_config("byt5", vocab_size=384, emb_dim=32, mlp_dim=64, num_decoder_layers=1)
  params, _ = init_params(T5(config), jax.random.PRNGKey(seed))
  return save_hf_t5(directory, params, config)


def _gin_run(args, extra) -> int:
  """train / eval / infer / interpret: parse gin as t5x does, then call the bound function."""
  import gin

  from softprompt_jax import gin_setup
  bindings = list(args.gin_bindings)
  for item in extra:
    if not item.startswith("--gin."):
      raise SystemExit(f"softprompt-jax {args.command}: unknown argument {item!r} (gin bindings "
                       "are written --gin.PARAM=VALUE)")
    bindings.append(item[len("--gin."):])
  if not args.gin_file and args.command != "interpret":
    raise SystemExit(f"softprompt-jax {args.command}: give at least one --gin_file (e.g. "
                     "runs/smoke.gin)")
  gin_setup.parse(args.gin_file, bindings, args.model_dir)
  configurables = gin_setup.register()
  name = {"train": "train", "eval": "evaluate", "infer": "infer",
          "interpret": "interpret"}[args.command]
  if args.model_dir and args.command == "train":
    run_dir = pathlib.Path(args.model_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.gin").write_text(gin.config_str())
  if args.command == "interpret":
    if not args.model_dir:
      raise SystemExit("softprompt-jax interpret: give --model_dir (the run to read)")
    result = configurables[name](model_dir=args.model_dir)
    print(f"wrote {pathlib.Path(args.model_dir) / 'interpretation.json'}")
    return 0
  result = configurables[name]()
  if args.model_dir and args.command == "train":
    (pathlib.Path(args.model_dir) / "operative_config.gin").write_text(gin.operative_config_str())
  if args.command == "infer":
    print(f"wrote {result} predictions")
  return 0


def _export(args, extra) -> int:
  from softprompt_jax.inference import export_prompt
  if extra:
    raise SystemExit(f"softprompt-jax export: unknown arguments {extra}")
  out = export_prompt(args.model_dir, args.out)
  print(f"wrote {out}")
  return 0


def _demo(args, extra) -> int:
  if extra:
    raise SystemExit(f"softprompt-jax demo: unknown arguments {extra}")
  from softprompt_jax.demo import run_demo
  run_demo(args.run_dir, task_name=args.task, prompt_length=args.prompt_length, steps=args.steps,
           model_tuning_steps=args.model_tuning_steps, eval_examples=args.eval_examples,
           seed=args.seed)
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="softprompt-jax", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  for command, text in [("train", "prompt-tune (resumes when run again)"),
                        ("eval", "evaluate a trained prompt on a split"),
                        ("infer", "predict a JSONL file with a bank of prompts"),
                        ("interpret", "nearest vocabulary tokens of a run's prompt")]:
    p = sub.add_parser(command, help=text)
    p.add_argument("--gin_file", action="append", default=[],
                   help="gin file (repeatable, applied in order; looked up in ./ and configs/)")
    p.add_argument("--gin_bindings", action="append", default=[],
                   help="a gin binding, e.g. 'train.num_steps = 100' (also --gin.PARAM=VALUE)")
    p.add_argument("--model_dir", help="the run directory; sets the gin macro MODEL_DIR")
    p.set_defaults(run=_gin_run)
  exp = sub.add_parser("export", help="write a run's best (else latest) prompt")
  exp.add_argument("--model_dir", required=True)
  exp.add_argument("--out", required=True, help="FILE.npy, or a directory for a PEFT adapter")
  exp.set_defaults(run=_export)
  demo = sub.add_parser("demo", help="prompt tuning on the shipped tiny T5, offline, in minutes")
  demo.add_argument("--run_dir", default="demo_run")
  demo.add_argument("--task", default="sentiment", help="a synthetic task, shown without its "
                    "written instruction")
  demo.add_argument("--prompt_length", type=int, default=20)
  demo.add_argument("--steps", type=int, default=300)
  demo.add_argument("--model_tuning_steps", type=int, default=300)
  demo.add_argument("--eval_examples", type=int, default=200)
  demo.add_argument("--seed", type=int, default=0)
  demo.set_defaults(run=_demo)
  gen = sub.add_parser("generate", help="load a T5 checkpoint and decode some inputs")
  gen.add_argument("--checkpoint", help="t5x or Hugging Face checkpoint (default: a tiny random "
                   "model written on the fly)")
  gen.add_argument("--vocab", default="byte", help="'byte' (ByT5) or a SentencePiece .model file")
  gen.add_argument("--input", nargs="+", default=["reverse: hello world", "sort: c a b"])
  gen.add_argument("--method", choices=["greedy", "beam", "sample"], default="greedy")
  gen.add_argument("--max_length", type=int, default=16)
  gen.add_argument("--max_input_length", type=int, default=64)
  gen.add_argument("--num_beams", type=int, default=4)
  gen.add_argument("--temperature", type=float, default=1.0)
  gen.add_argument("--top_k", type=int, default=0)
  gen.add_argument("--top_p", type=float, default=1.0)
  gen.add_argument("--seed", type=int, default=0)
  gen.set_defaults(run=_generate)
  return parser


def main(argv=None) -> int:
  args, extra = build_parser().parse_known_args(argv)
  return args.run(args, extra)


if __name__ == "__main__":
  sys.exit(main())
