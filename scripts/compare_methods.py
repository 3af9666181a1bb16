"""Each method beyond the paper against plain prompt tuning and model tuning, on the shipped tiny
T5's own tasks (the README's methods table).

  python scripts/compare_methods.py [--tasks sentiment,sort] [--seeds 0,1,2] [--steps 200]
                                    [--eval_examples 100] [--out compare_methods]

Every cell is a real `softprompt-jax train` of the method's shipped runs file
(configs/runs/<method>.gin) on the embedded model (softprompt_jax/pretrained), taskless inputs,
held-out accuracy (exact match of the greedy answer; accuracy for the classification task) on
the validation split after the last step; prompts start from sampled vocabulary (wayward
prompts from their text). Multi-task trains one run on all the tasks together and
is scored on each. Wayward prompts also report the accuracy of their nearest-token projection
(`interpret`). Writes results.jsonl and table.md (mean ± std over seeds, trainable parameters);
the last line printed is JSON. A cell already in results.jsonl is not run again.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import jax
import numpy as np

from softprompt_jax.cli import main as cli
from softprompt_jax.pretrained import TINY_MODEL_DIR
from softprompt_jax.run_dir import best_trainable

PROMPT_LENGTH = 20
WAYWARD_TEXT = "say positive or negative"  # a discrete prompt: one byte per slot
METHODS = {  # name: (runs file, extra bindings)
    "prompt tuning": ("runs/prompt_finetune.gin", []),
    "per-layer prompts": ("runs/per_layer_prompt.gin", []),
    "multi-task prompts": ("runs/multi_task_prompt.gin", []),
    "IA3": ("runs/ia3.gin", ["train.prompt_length=0"]),
    "wayward prompts": ("runs/wayward.gin", [f"TASK_STRING='{WAYWARD_TEXT}'",
                                             f"train.prompt_length={len(WAYWARD_TEXT)}"]),
    "model tuning": ("runs/model_finetune.gin", ["train.prompt_length=0"]),
}


def _bindings(task_macro: str, seed: int, args) -> list[str]:
  return [f"frozen_model.checkpoint='{TINY_MODEL_DIR}'", "frozen_model.family='byt5'",
          "VOCABULARY='byte'", task_macro, f"train.num_steps={args.steps}",
          f"train.seed={seed}", "BATCH_SIZE=32", "train.input_length=96",
          "train.target_length=48", f"train.eval_every={args.steps}",
          f"train.eval_max_examples={args.eval_examples}", "train.dropout_rate=0.0",
          f"train.prompt_length={PROMPT_LENGTH}", f"train.log_every={args.steps}",
          "train.keep_checkpoints=1"]


def _train(run_dir: pathlib.Path, gin_file: str, bindings: list[str]) -> dict:
  argv = ["train", "--gin_file", gin_file, "--model_dir", str(run_dir),
          *[f"--gin.{b}" for b in bindings]]
  if cli(argv) != 0:
    raise SystemExit(f"failed: softprompt-jax {' '.join(argv)}")
  summary = json.loads((run_dir / "summary.json").read_text())
  operative = (run_dir / "operative_config.gin").read_text()
  return {"summary": summary, "operative": operative}


def _score(summary: dict) -> dict[str, float]:
  """{task: held-out score} from a run's last evaluation (per task for a mixture)."""
  final = summary["final_eval"]
  per_task: dict[str, dict] = {}
  for key, value in final.items():  # a mixture logs each task's metrics as <task>/<metric>
    if "/" in key:
      task, metric = key.split("/", 1)
      per_task.setdefault(task, {})[metric] = value
  if per_task:
    return {task: _primary(metrics) for task, metrics in per_task.items()}
  return {"": _primary(final)}


def _primary(metrics: dict) -> float:
  for key in ("accuracy", "exact_match"):
    if key in metrics:
      return float(metrics[key]) / 100.0  # the metrics are percentages
  raise KeyError(f"no accuracy or exact_match in {sorted(metrics)}")


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tasks", default="sentiment,sort")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--eval_examples", type=int, default=100)
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--out", default="compare_methods")
  args = p.parse_args(argv)
  tasks = [f"taskless_synthetic_{t}" for t in args.tasks.split(",")]
  seeds = [int(s) for s in args.seeds.split(",")]
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  results_file = out / "results.jsonl"
  done = {}
  if results_file.exists():
    for line in results_file.read_text().splitlines():
      row = json.loads(line)
      done[(row["method"], row["task"], row["seed"])] = row
  start = time.time()
  for method in args.methods.split(","):
    gin_file, extra = METHODS[method]
    for seed in seeds:
      # Multi-task: one run over every task; each other method: one run per task.
      groups = ([tasks] if method == "multi-task prompts" else [[t] for t in tasks])
      for group in groups:
        if all((method, t, seed) in done for t in group):
          continue
        macro = (f"TASKS={group}" if method == "multi-task prompts" else f"TASK='{group[0]}'")
        run_dir = out / "runs" / method.replace(" ", "_") / "+".join(group) / f"seed{seed}"
        init = [] if method == "wayward prompts" else ["train.prompt_init=@prompts.sampled_vocab"]
        trained = _train(run_dir, gin_file, _bindings(macro, seed, args) + init + extra)
        scores = _score(trained["summary"])
        projected = None
        if method == "wayward prompts":
          if cli(["interpret", "--model_dir", str(run_dir), f"--gin.interpret.task='{group[0]}'",
                  f"--gin.interpret.max_examples={args.eval_examples}"]) == 0:
            reading = json.loads((run_dir / "interpretation.json").read_text())
            projected = _primary(reading["projected"])
        params = int(sum(np.size(x) for x in
                         jax.tree_util.tree_leaves(best_trainable(run_dir))))
        with open(results_file, "a") as f:
          for task in group:
            score = scores[task] if task in scores else scores[""]
            row = {"method": method, "task": task, "seed": seed, "accuracy": score,
                   "trainable_parameters": params, "projected_accuracy": projected}
            done[(method, task, seed)] = row
            f.write(json.dumps(row) + "\n")
  table = _table(done, tasks, seeds)
  (out / "table.md").write_text(table)
  print(table)
  result = {"cells": len(done), "wall_time_s": round(time.time() - start, 1)}
  print(json.dumps(result))
  return result


def _table(done: dict, tasks: list[str], seeds: list[int]) -> str:
  head = "| method | trainable params | " + " | ".join(tasks) + " |"
  lines = [head, "|" + " --- |" * (len(tasks) + 2)]
  for method in METHODS:
    rows = [done.get((method, t, s)) for t in tasks for s in seeds]
    if not any(rows):
      continue
    params = next((r["trainable_parameters"] for r in rows if r), None)
    cells = []
    for task in tasks:
      values = [done[(method, task, s)]["accuracy"] for s in seeds if (method, task, s) in done]
      cell = (f"{statistics.mean(values):.3f} ± {statistics.pstdev(values):.3f}"
              if values else "–")
      projected = [done[(method, task, s)]["projected_accuracy"] for s in seeds
                   if (method, task, s) in done
                   and done[(method, task, s)]["projected_accuracy"] is not None]
      if projected:
        cell += f" (projected: {statistics.mean(projected):.3f})"
      cells.append(cell)
    lines.append(f"| {method} | {params if params is not None else '?'} | "
                 + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
