"""`softprompt-jax demo`: prompt tuning working offline, in minutes, on the shipped tiny T5.

The tiny byte-level model (softprompt_jax/pretrained) learned its tasks only through a written
instruction at the start of the input. The demo presents a task without it ("taskless", as in
the paper) and compares held-out accuracy (greedy decoding, exact match of the answer) of:
  no_prompt      the frozen model on the bare input;
  instruction    the frozen model with the written instruction in front;
  prompt_tuning  the frozen model with a soft prompt trained on the bare inputs (P = 20,
                 class-label init, the paper's Adafactor);
  model_tuning   every weight trained on the bare inputs (Adam), no prompt.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import time

import jax

from softprompt_jax import nearest_tokens, optim, output_files, prompts
from softprompt_jax import train_step as ts
from softprompt_jax.data import get_task, pipeline, synthetic
from softprompt_jax.model_spec import frozen_model, load_frozen
from softprompt_jax.pretrained import TINY_MODEL_DIR, verify_checksums
from softprompt_jax.evaluation import decode_in_batches
from softprompt_jax.prompted_t5 import PromptedT5, with_prompt
from softprompt_jax.run_layout import (CURVES_FILE, INTERPRETATION_FILE, PROMPT_FILE,
                                       SUMMARY_FILE)
from softprompt_jax.t5 import T5
from softprompt_jax.tokenizers import ByteVocabulary
from softprompt_jax.training_loop import train

INPUT_LENGTH = 96
TARGET_LENGTH = 16


def _accuracy(model, params, task, records, vocab, batch_size=50) -> float:
  """Exact-match accuracy of greedy answers on `records` (a fraction in [0, 1])."""
  examples = [task.format(r) for r in records]
  tokens = vocab.encode_batch([e["inputs"] for e in examples], max_length=INPUT_LENGTH)
  out = decode_in_batches(model, params, tokens, batch_size=batch_size,
                          target_length=TARGET_LENGTH)
  return sum(vocab.decode(row).strip() == e["targets"] for row, e in zip(out, examples)) / len(
      examples)


def _model_tuning(config, frozen, task, vocab, steps, batch_size, seed):
  """All weights trained on the taskless inputs, with the same train step (regex '.*')."""
  model = T5(config)
  labels = optim.param_labels(frozen, optim.MODEL_TUNING)
  optimizer = optim.masked_optimizer(optim.adam(1e-3), labels)
  state, rest = ts.init_train_state(frozen, labels, optimizer)
  train, _ = ts.jit_steps(model, optimizer)
  batches = pipeline.train_batches(task, "train", vocab, batch_size=batch_size,
                                   input_length=INPUT_LENGTH, target_length=TARGET_LENGTH,
                                   seed=seed)
  for _ in range(steps):
    state, _ = train(state, rest, next(batches).arrays, jax.random.PRNGKey(seed))
  return model, optim.merge(state.trainable, rest)


def run_demo(run_dir, *, task_name: str = "sentiment", prompt_length: int = 20,
             steps: int = 300, model_tuning_steps: int = 300, batch_size: int = 32,
             eval_examples: int = 200, seed: int = 0) -> dict:
  start = time.time()
  run_dir = pathlib.Path(run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  verify_checksums(TINY_MODEL_DIR)
  vocab = ByteVocabulary()
  spec = frozen_model(checkpoint=str(TINY_MODEL_DIR))
  config, frozen = load_frozen(spec, None, dropout_rate=0.0)
  t5 = T5(config)
  with_instruction = get_task(f"synthetic_{task_name}")
  taskless = get_task(f"taskless_synthetic_{task_name}")
  test = synthetic.make_records(task_name, "test", eval_examples, seed=seed)

  results = {"no_prompt": _accuracy(t5, frozen, taskless, test, vocab),
             "instruction": _accuracy(t5, frozen, with_instruction, test, vocab)}

  tuned_dir = run_dir / "prompt_tuning"
  shutil.rmtree(tuned_dir, ignore_errors=True)
  train(model_dir=str(tuned_dir), model=spec, task=taskless.name, vocabulary="byte",
        prompt_length=prompt_length, prompt_init=prompts.class_labels, num_steps=steps,
        batch_size=batch_size, input_length=INPUT_LENGTH, target_length=TARGET_LENGTH,
        dropout_rate=0.0, eval_every=max(steps // 3, 1), eval_max_examples=eval_examples,
        keep_checkpoints=1, seed=seed, log_every=max(steps // 20, 1))
  prompt = prompts.load_npy(tuned_dir / PROMPT_FILE)
  prompted = PromptedT5(config, prompt_length=prompt_length)
  results["prompt_tuning"] = _accuracy(prompted, with_prompt(frozen, prompt),
                                       taskless, test, vocab)
  tuned_model, tuned_params = _model_tuning(config, frozen, taskless, vocab, model_tuning_steps,
                                            batch_size, seed)
  results["model_tuning"] = _accuracy(tuned_model, tuned_params, taskless, test, vocab)

  n_model = int(sum(x.size for x in jax.tree_util.tree_leaves(frozen)))
  trainable = {"no_prompt": 0, "instruction": 0, "prompt_tuning": int(prompt.size),
               "model_tuning": n_model}
  prompts.save_npy(run_dir / PROMPT_FILE, prompt)
  shutil.copy(tuned_dir / CURVES_FILE, run_dir / CURVES_FILE)
  reading = nearest_tokens.describe(prompt, frozen["token_embedder"]["embedding"], vocab, k=5)
  output_files.write_text(run_dir / INTERPRETATION_FILE, json.dumps(  # as `interpret` writes it
      {"prompt": str(run_dir), "nearest_by": "cosine", "nearest_tokens": reading}, indent=1,
      ensure_ascii=False))
  summary = {**results, "trainable_parameters": trainable, "task": taskless.name,
             "prompt_length": prompt_length, "steps": steps, "seed": seed,
             "eval_examples": eval_examples, "wall_time_s": round(time.time() - start, 1)}
  output_files.write_text(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
  print(f"\nheld-out accuracy on {taskless.name} ({eval_examples} test examples, seed {seed}):")
  print(f"  {'setting':<15}{'accuracy':>10}{'trainable params':>20}")
  for name in ("no_prompt", "instruction", "prompt_tuning", "model_tuning"):
    print(f"  {name:<15}{results[name]:>10.3f}{trainable[name]:>20,}")
  print(f"written to {run_dir} in {summary['wall_time_s']:.0f}s")
  return summary
