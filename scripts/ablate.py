"""The shape of the paper's Figure 3 on the shipped tiny T5: prompt length x initialization.

  python scripts/ablate.py [--lengths 1,5,20,100] [--seeds 0,1,2] [--steps 300]
                           [--task sentiment] [--out ablation]

For every prompt length in {1, 5, 20, 100} and init in {random uniform, sampled vocabulary,
class label}, and several seeds, a soft prompt is trained on the taskless task (the instruction
removed) and scored by held-out exact-match accuracy (greedy decoding). All the runs are one
sweep (`train(members=...)`, softprompt_jax/sweep.py): the model is loaded once and the members
of each prompt length train together, one compiled step for them all; each run is
<out>/sweep/members/p<length>_<init>_s<seed>/. Writes results.jsonl, a table (table.md) with mean
and standard deviation over seeds, and plot.png. The last line is JSON. Class-label init needs a
slot per label, so prompts shorter than the label set are n/a there. An interrupted ablation
continues where it stopped (the sweep resumes its members; scored cells are kept).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import time

import numpy as np

INITS = {"random_uniform": "random uniform", "sampled_vocab": "sampled vocab",
         "class_labels": "class label"}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--lengths", default="1,5,20,100")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--task", default="sentiment")
  p.add_argument("--eval_examples", type=int, default=200)
  p.add_argument("--out", default="ablation")
  args = p.parse_args(argv)

  from softprompt_jax import prompts
  from softprompt_jax.data import get_task, synthetic
  from softprompt_jax.demo import INPUT_LENGTH, TARGET_LENGTH, _accuracy
  from softprompt_jax.model_spec import frozen_model, load_frozen
  from softprompt_jax.pretrained import TINY_MODEL_DIR, verify_checksums
  from softprompt_jax.prompted_t5 import PromptedT5
  from softprompt_jax.run_layout import CHECKPOINT_SUBDIR, PROMPT_FILE
  from softprompt_jax.tokenizers import ByteVocabulary
  from softprompt_jax.training_loop import train

  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  verify_checksums(TINY_MODEL_DIR)
  spec = frozen_model(checkpoint=str(TINY_MODEL_DIR))
  config, frozen = load_frozen(spec, None, dropout_rate=0.0)
  vocab = ByteVocabulary()
  task = get_task(f"taskless_synthetic_{args.task}")
  lengths = [int(x) for x in args.lengths.split(",")]
  seeds = [int(x) for x in args.seeds.split(",")]
  results_file = out / "results.jsonl"
  # Rows already measured (an interrupted ablation continues where it stopped).
  results = ([json.loads(line) for line in results_file.read_text().splitlines()
              if line.strip()]
             if results_file.exists() else [])
  done = {(r["prompt_length"], r["init"], r["seed"]) for r in results}
  start = time.time()
  grid = [(length, init_name, seed) for length in lengths for init_name in INITS
          for seed in seeds
          # the labels do not fit the prompt: the cell is reported as n/a
          if not (init_name == "class_labels" and length < len(task.choices))]
  todo = {f"p{length}_{init_name}_s{seed}": (length, init_name, seed)
          for length, init_name, seed in grid if (length, init_name, seed) not in done}
  members = {name: {"train.prompt_length": length, "train.prompt_init": getattr(prompts, init),
                    "train.seed": seed} for name, (length, init, seed) in todo.items()}
  sweep_dir = out / "sweep"
  if members:
    train(model_dir=str(sweep_dir), model=spec, task=task.name, vocabulary="byte",
          members=members, num_steps=args.steps, batch_size=32, input_length=INPUT_LENGTH,
          target_length=TARGET_LENGTH, dropout_rate=0.0, eval_every=args.steps,
          eval_max_examples=args.eval_examples, keep_checkpoints=1, log_every=args.steps)
  for name, (length, init_name, seed) in todo.items():
    run = sweep_dir / "members" / name
    prompt = prompts.load_npy(run / PROMPT_FILE)
    test = synthetic.make_records(args.task, "test", args.eval_examples, seed=seed)
    model = PromptedT5(config, prompt_length=length)
    accuracy = _accuracy(model, {**frozen, "prompt": {"prompt": prompt}}, task, test, vocab)
    row = {"prompt_length": length, "init": init_name, "seed": seed, "accuracy": accuracy}
    results.append(row)
    with open(results_file, "a") as f:
      f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
    shutil.rmtree(run / CHECKPOINT_SUBDIR, ignore_errors=True)  # keep the folder small

  table = ["| init \\ prompt length | " + " | ".join(str(n) for n in lengths) + " |",
           "| --- |" + " --- |" * len(lengths)]
  summary = {}
  for init_name, label in INITS.items():
    cells = []
    for length in lengths:
      accs = [r["accuracy"] for r in results
              if r["init"] == init_name and r["prompt_length"] == length]
      if not accs:
        cells.append("n/a")
        continue
      summary[f"{init_name}/{length}"] = (float(np.mean(accs)), float(np.std(accs)))
      cells.append(f"{np.mean(accs):.3f} ± {np.std(accs):.3f}")
    table.append(f"| {label} | " + " | ".join(cells) + " |")
  (out / "table.md").write_text("\n".join(table) + "\n")
  print("\n".join(table))
  _plot(out / "plot.png", lengths, summary)
  final = {"task": task.name, "steps": args.steps, "seeds": seeds,
           "wall_time_s": round(time.time() - start, 1),
           "mean_accuracy": {k: v[0] for k, v in summary.items()}}
  print(json.dumps(final))
  return final


def _plot(path, lengths, summary):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(5.5, 3.8))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for init_name, label in INITS.items():
    xs = [n for n in lengths if f"{init_name}/{n}" in summary]
    means = [summary[f"{init_name}/{n}"][0] for n in xs]
    stds = [summary[f"{init_name}/{n}"][1] for n in xs]
    ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=label)
  ax.set_xscale("log")
  ax.set_xticks(lengths, [str(n) for n in lengths])
  ax.set_xlabel("prompt length")
  ax.set_ylabel("held-out accuracy")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == "__main__":
  main(sys.argv[1:])
