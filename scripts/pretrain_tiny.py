"""Pretrains the tiny byte-level T5 that ships in softprompt_jax/pretrained/tiny_byt5.

A ByT5-style model (byte vocabulary, 384 embedding rows, gated GELU, separate logits layer) is
trained from scratch, all weights, on the mixture of every `synthetic_<name>` task: each input
starts with its written instruction ("reverse the words: cat dog apple"). The same word lists
serve every task (in training, half the lists of the other tasks also hold sentiment words), so
without the instruction the input does not say which task is meant; the model learns tasks only
through their instruction, which leaves the taskless versions as headroom for a soft prompt.

Everything (data, data order, init) follows from --seed. The output directory gets the
checkpoint as save_hf_t5 writes it (config.json + model.safetensors, which load_t5 reads) and
manifest.json: config, seed, command, training time, per-task validation accuracies with and
without the instruction, and the sha256 of every file. Progress (a bar on a terminal, plain lines
elsewhere), the loss every --log_every steps and the evaluations during training go to stderr;
the setup, the final evaluation and what was written, to stdout.

  nice python scripts/pretrain_tiny.py --seed 0   # the defaults made the shipped checkpoint
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shlex
import sys
import time

import jax
import numpy as np
import optax
from flax.traverse_util import flatten_dict, unflatten_dict

from softprompt_jax import optim, progress, train_step
from softprompt_jax.checkpoints.hf_writer import save_hf_t5
from softprompt_jax.checkpoints.integrity import sha256
from softprompt_jax.data import pipeline, synthetic
from softprompt_jax.decoding import greedy_decode, rank_classify
from softprompt_jax.t5 import T5, init_params
from softprompt_jax.t5_config import t5_config
from softprompt_jax.tokenizers import ByteVocabulary, pad_batch

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "softprompt_jax" / "pretrained" / "tiny_byt5"
TASKS = tuple(synthetic.SYNTHETIC_TASKS)
VOCAB = ByteVocabulary()
# Targets of at most this many bytes (EOS included) go in batches of their own (count, first
# and last word, sentiment): their decoder runs over 16 positions rather than 64.
SHORT_TARGET = 16


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--steps", type=int, default=4000)
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--learning_rate", type=float, default=1e-3, help="Adam's peak learning rate")
  p.add_argument("--relpos_lr_scale", type=float, default=50.0,
                 help="learning rate multiplier of the relative position biases")
  p.add_argument("--warmup_steps", type=int, default=200)
  p.add_argument("--train_examples", type=int, default=20000,
                 help="training records per task (the first 2000 are the task's train split)")
  p.add_argument("--out", default=str(DEFAULT_OUT))
  p.add_argument("--emb_dim", type=int, default=128)
  p.add_argument("--num_heads", type=int, default=4)
  p.add_argument("--head_dim", type=int, default=32)
  p.add_argument("--mlp_dim", type=int, default=256)
  p.add_argument("--num_encoder_layers", type=int, default=3)
  p.add_argument("--num_decoder_layers", type=int, default=2)
  p.add_argument("--eval_every", type=int, default=1000, help="0: evaluate only at the end")
  p.add_argument("--eval_examples", type=int, default=50,
                 help="validation examples per task in the evaluations during training")
  p.add_argument("--log_every", type=int, default=100)
  p.add_argument("--no_save", action="store_true", help="train and evaluate only (calibration)")
  return p.parse_args(argv)


# --- Data ---------------------------------------------------------------------------------------


def mixed_word_lists(num_examples: int, seed: int) -> list[list[str]]:
  """Word lists that hold sentiment words, for the other tasks too: a sentiment word in the
  input must not give the task away, only the instruction may."""
  records = synthetic.make_records("sentiment", "train", num_examples, seed=seed + 1)
  return [r["text"].split() for r in records]


def train_records(name: str, num_examples: int, seed: int) -> list[dict]:
  """The task's train split extended to `num_examples`; for tasks other than sentiment, half the
  records have word lists drawn as sentiment's (with a sentiment word or two)."""
  records = synthetic.make_records(name, "train", num_examples, seed=seed)
  if name == "sentiment":
    return records
  instruction, target_of = synthetic.SYNTHETIC_TASKS[name]
  # Each task gets its own draw of mixed lists, from a seed stream apart from make_records'.
  lists = mixed_word_lists(num_examples // 2, seed * 1000 + TASKS.index(name))
  # Keep the first 2000 (the registered train split) as they are; replace every other later one.
  keep = min(len(records), synthetic.DEFAULT_SIZES["train"])
  for k, words in enumerate(lists):
    i = keep + 2 * k
    if i >= len(records):
      break
    records[i] = {"instruction": instruction, "text": " ".join(words),
                  "target": target_of(words), "idx": i}
  return records


def lengths(records_by_task: dict[str, list[dict]]) -> tuple[int, int]:
  """(input_length, target_length) that fit every example with its EOS, rounded up to 8."""
  longest_input = longest_target = 0
  for records in records_by_task.values():
    for r in records:
      longest_input = max(longest_input, len(VOCAB.encode(f"{r['instruction']} {r['text']}")))
      longest_target = max(longest_target, len(VOCAB.encode(r["target"])))
  return -(-(longest_input + 1) // 8) * 8, -(-(longest_target + 1) // 8) * 8


def grouped_streams(records: dict[str, list[dict]], held_out: dict[str, list[dict]], *,
                    input_length: int, target_length: int, batch_size: int, seed: int):
  """(streams, weights): endless shuffled batches of the mixture, the tasks whose targets all
  fit SHORT_TARGET batched apart from the others, so their batches skip the padding; each step
  draws a stream with probability `weights`, proportional to its examples, which keeps the
  mixture proportional."""
  def fits(name):
    mine = [records[name]] + [r for key, r in held_out.items() if key.startswith(name + "_")]
    return all(lengths({"": r})[1] <= SHORT_TARGET for r in mine)

  groups = [([n for n in TASKS if fits(n)], SHORT_TARGET),
            ([n for n in TASKS if not fits(n)], target_length)]
  streams = [pipeline.train_batches(
      [f"synthetic_{n}" for n in names], "train", VOCAB, batch_size=batch_size,
      input_length=input_length, target_length=length, seed=seed,
      source=[{"train": records[n]} for n in names] if len(names) > 1
      else {"train": records[names[0]]})
      for names, length in groups if names]
  sizes = [stream.num_examples for stream in streams]
  return streams, [n / sum(sizes) for n in sizes]


# --- Evaluation ---------------------------------------------------------------------------------


def evaluate(model, params, *, input_length: int, target_length: int,
             max_examples: int | None, batch_size: int = 100) -> dict[str, dict[str, float]]:
  """Greedy-decoded exact match (%) on the validation split of every task, with and without
  the instruction; sentiment also by rank classification between its two labels."""
  results: dict[str, dict[str, float]] = {}
  labels, _ = pad_batch([VOCAB.encode(t) for t in synthetic.SENTIMENT_LABELS],
                        target_length, eos_id=VOCAB.eos_id)
  for prefix, key in (("", "with_instruction"), ("taskless_", "without_instruction")):
    scores = {}
    for name in TASKS:
      batches = pipeline.eval_batches(f"{prefix}synthetic_{name}", "validation", VOCAB,
                                      batch_size=batch_size, input_length=input_length,
                                      target_length=target_length, max_examples=max_examples)
      correct = ranked = total = 0
      for batch in batches:
        tokens = batch.arrays["encoder_input_tokens"]
        decoded = VOCAB.decode_batch(np.asarray(
            greedy_decode(model, params, tokens, max_decode_length=target_length)))
        real = [(ex, d) for ex, d in zip(batch.examples, decoded) if ex is not None]
        correct += sum(ex["targets"] == d for ex, d in real)
        total += len(real)
        if name == "sentiment":
          chosen = np.asarray(rank_classify(model, params, tokens, labels))
          ranked += sum(synthetic.SENTIMENT_LABELS[c] == ex["targets"]
                        for ex, c in zip(batch.examples, chosen) if ex is not None)
      scores[name] = round(100 * correct / total, 2)
      if name == "sentiment":
        scores["sentiment_rank_classification"] = round(100 * ranked / total, 2)
    results[key] = scores
  return results


def format_scores(results: dict[str, dict[str, float]]) -> str:
  return "\n".join(f"  {key:20s} " + "  ".join(f"{n}={v:.1f}" for n, v in scores.items())
                   for key, scores in results.items())


# --- Training -----------------------------------------------------------------------------------


def make_optimizer(params, args) -> optax.GradientTransformation:
  """Adam over every weight (model tuning), linear warmup then cosine decay to 0, clipped.

  The relative position biases take `relpos_lr_scale` times larger steps: a head that looks at
  its neighbour needs a bias of several units, which Adam's ~lr-sized steps would take thousands
  of steps to reach (t5x's Adafactor moves them faster too), and reading bytes as words waits
  on such heads.
  """
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, args.learning_rate, args.warmup_steps, max(args.steps, args.warmup_steps + 1))
  relpos = unflatten_dict({k: "relpos_bias" in k for k in flatten_dict(params)})
  base = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule),
                     optax.masked(optax.scale(args.relpos_lr_scale), relpos))
  return optim.masked_optimizer(base, optim.param_labels(params, optim.MODEL_TUNING))


def train_steps(step_fn, state, *, steps: int, log_every: int, eval_every: int, evaluate_fn,
                stream=None, clock=time.perf_counter):
  """(state, loss history) after `steps` calls of `step_fn(state, step) -> (state, metrics)`,
  with a progress bar: the mean loss every `log_every` steps, and the text `evaluate_fn(state,
  step)` returns every `eval_every` steps (0: never) before the last."""
  history, losses = [], []
  start = window_start = clock()
  note = ""
  with progress.Progress("pretrain", steps, unit="steps", stream=stream, clock=clock) as shown:
    for step in range(1, steps + 1):
      state, metrics = step_fn(state, step)
      losses.append(metrics["loss"])
      if step % log_every == 0 or step == steps:
        loss = float(np.mean(jax.device_get(losses)))
        seconds = (clock() - window_start) / len(losses)
        shown.message(f"step {step}: loss {loss:.4f}  {seconds:.3f} s/step  "
                      f"elapsed {clock() - start:.0f} s")
        history.append({"step": step, "loss": round(loss, 5)})
        window_start, losses, note = clock(), [], f"loss {loss:.4f}"
      shown.update(step, note)
      if eval_every and step % eval_every == 0 and step < steps:
        shown.message(evaluate_fn(state, step))
        window_start = clock()
  return state, history


def main(argv=None) -> None:
  args = parse_args(argv)
  start = time.time()
  # Dropout 0: the data is endless and clean, and the frozen model is better left undisturbed.
  config = t5_config(
      "small", "byt5", emb_dim=args.emb_dim, num_heads=args.num_heads, head_dim=args.head_dim,
      mlp_dim=args.mlp_dim, num_encoder_layers=args.num_encoder_layers,
      num_decoder_layers=args.num_decoder_layers, dropout_rate=0.0)
  model = T5(config)
  params, _ = init_params(model, jax.random.PRNGKey(args.seed))
  num_params = sum(x.size for x in jax.tree_util.tree_leaves(params))

  records = {name: train_records(name, args.train_examples, args.seed) for name in TASKS}
  # Lengths that also fit the registered validation and test splits, for the evaluations here
  # and those of a frozen-model user.
  held_out = {f"{name}_{split}": synthetic.make_records(name, split, synthetic.DEFAULT_SIZES[split])
              for name in TASKS for split in ("validation", "test")}
  input_length, target_length = map(max, zip(lengths(records), lengths(held_out)))
  streams, weights = grouped_streams(records, held_out, input_length=input_length,
                                     target_length=target_length, batch_size=args.batch_size,
                                     seed=args.seed)
  groups = [([t.name for t in s.tasks], s.target_length, round(w, 3))
            for s, w in zip(streams, weights)]
  print(f"{num_params:,} params; {sum(len(r) for r in records.values()):,} training examples; "
        f"input length {input_length}; (tasks, target length, weight): {groups}\n{config}",
        flush=True)
  choose = np.random.default_rng([args.seed, 1234])

  optimizer = make_optimizer(params, args)
  state, frozen = train_step.init_train_state(
      params, optim.param_labels(params, optim.MODEL_TUNING), optimizer)
  train, _ = train_step.jit_steps(model, optimizer)
  rng = jax.random.PRNGKey(args.seed + 1)
  eval_kwargs = dict(input_length=input_length, target_length=target_length)

  def step_fn(state, step):
    batch = next(streams[choose.choice(len(streams), p=weights)]).arrays
    batch.pop("prompt_ids", None)  # a mixture's per-task prompt ids: a plain T5 takes none
    return train(state, frozen, batch, rng)

  def report(state, step):
    results = evaluate(model, optim.merge(state.trainable, frozen),
                       max_examples=args.eval_examples, **eval_kwargs)
    return f"eval at step {step} (first {args.eval_examples} per task):\n{format_scores(results)}"

  state, history = train_steps(step_fn, state, steps=args.steps, log_every=args.log_every,
                               eval_every=args.eval_every, evaluate_fn=report)
  train_seconds = time.time() - start
  for stream in streams:
    if stream.stats.num_truncated_inputs or stream.stats.num_truncated_targets:
      raise RuntimeError(f"examples were truncated: {stream.stats}")

  params = jax.device_get(optim.merge(state.trainable, frozen))
  eval_start = time.time()
  results = evaluate(model, params, max_examples=None, **eval_kwargs)
  eval_seconds = time.time() - eval_start
  print(f"final eval (validation, {synthetic.DEFAULT_SIZES['validation']} per task, "
        f"{eval_seconds:.0f} s):\n{format_scores(results)}", flush=True)
  if args.no_save:
    return

  out = pathlib.Path(args.out)
  save_hf_t5(out, params, config)
  files = sorted(p for p in out.iterdir() if p.is_file() and p.name != "manifest.json")
  manifest = {
      "description": "tiny byte-level T5 pretrained on the synthetic_<name> tasks with their "
                     "written instructions (scripts/pretrain_tiny.py)",
      "config": config.to_dict(),
      "num_params": int(num_params),
      "seed": args.seed,
      "command": " ".join(["python", "scripts/pretrain_tiny.py"]
                          + [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)]),
      "args": {k: v for k, v in vars(args).items() if k != "out"},
      "data": {"tasks": [f"synthetic_{n}" for n in TASKS], "train_examples_per_task":
               args.train_examples, "input_length": input_length,
               "target_length": target_length, "mixing": "proportional"},
      "optimizer": f"adam, clip 1.0, warmup {args.warmup_steps} then cosine decay to 0, "
                   f"peak lr {args.learning_rate} ({args.relpos_lr_scale}x for the relative "
                   "position biases)",
      "training_seconds": round(train_seconds, 1),
      "eval_seconds": round(eval_seconds, 1),
      "final_loss": history[-1]["loss"] if history else None,
      "loss_history": history,
      "validation_exact_match": results,
      "machine": {"platform": platform.platform(), "processor": platform.processor(),
                  "cpu_count": os.cpu_count(), "jax": jax.__version__,
                  "device": str(jax.devices()[0])},
      "sha256": {p.name: sha256(p) for p in files},
  }
  (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
  size = sum(p.stat().st_size for p in files)
  print(f"wrote {out} ({size / 1e6:.2f} MB): {[p.name for p in files]} + manifest.json")


if __name__ == "__main__":
  main()
