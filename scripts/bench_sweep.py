"""A sweep of M members (`train(members=...)`) against the same M runs trained one by one.

  python scripts/bench_sweep.py [--members 8] [--steps 100] [--repeats 3] [--model tiny]
                                [--prompt_length 20] [--batch_size 8] [--out bench_sweep.json]

The members differ in seed and learning rate (seeds 0.., learning rates 0.3 and 0.1), on the
tiny model (--model tiny: configs/models/tiny.gin's random byte-level T5; --model pretrained:
the shipped tiny ByT5) and a synthetic task; every run evaluates once, at its last step, and
checkpoints there. Two measurements, on the same machine in one process:

- end to end: the wall time of the M `train` calls one by one, and of the one sweep `train`
  call (each including its loading, compilation, evaluation and checkpoints: what a user waits
  for); a warm-up pass of both first (imports, data), then --repeats passes, alternating, and
  the medians;
- the step alone: the compiled train step of one run and the sweep's step of M members,
  compile time (the first call less a step) apart from the median step time after warm-up,
  the two timed in turn.

The machine (CPU, cores, load average before and after, versions) is recorded beside the
numbers. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import statistics
import tempfile
import sys
import time

import jax
import jaxlib
import numpy as np

from softprompt_jax import optim, prompts, sweep_step
from softprompt_jax import train_step as ts
from softprompt_jax.data import pipeline
from softprompt_jax.model_spec import frozen_model
from softprompt_jax.pretrained import TINY_MODEL_DIR
from softprompt_jax.run_setup import setup_run
from softprompt_jax.training_loop import train

# The harness beside this file is found when it runs as a script; an import by path (the tests)
# needs its folder on the path.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from benchmark_harness import cpu_model  # noqa: E402

TASK = "taskless_synthetic_sentiment"
TINY_OVERRIDES = {"vocab_size": 384, "emb_dim": 32, "mlp_dim": 64, "num_heads": 4,
                  "head_dim": 8}  # configs/models/tiny.gin


def _spec(model: str):
  if model == "pretrained":
    return frozen_model(checkpoint=str(TINY_MODEL_DIR))
  return frozen_model(family="byt5", size="tiny", checkpoint=None, overrides=TINY_OVERRIDES)


def _members(count: int) -> dict:
  """{name: (seed, learning rate)}: seeds 0.., the learning rate alternating 0.3 / 0.1."""
  return {f"s{i // 2}_lr{lr}": (i // 2, lr)
          for i, lr in ((i, (0.3, 0.1)[i % 2]) for i in range(count))}


def _settings(args) -> dict:
  return dict(model=_spec(args.model), task=TASK, vocabulary="byte",
              prompt_length=args.prompt_length, prompt_init=prompts.random_uniform,
              num_steps=args.steps, batch_size=args.batch_size, input_length=args.input_length,
              target_length=args.target_length, eval_every=args.steps,
              eval_max_examples=args.eval_examples, keep_checkpoints=1, log_every=args.steps)


def one_by_one(args, members: dict, root: pathlib.Path) -> float:
  start = time.perf_counter()
  for name, (seed, lr) in members.items():
    train(model_dir=str(root / name), seed=seed, optimizer=optim.adafactor(learning_rate=lr),
          **_settings(args))
  return time.perf_counter() - start


def as_sweep(args, members: dict, root: pathlib.Path) -> float:
  bindings = {name: {"train.seed": seed, "optim.adafactor.learning_rate": lr}
              for name, (seed, lr) in members.items()}
  start = time.perf_counter()
  train(model_dir=str(root), members=bindings, optimizer=optim.adafactor(), **_settings(args))
  return time.perf_counter() - start


def _timed_steps(calls: dict, reps: int) -> dict:
  """{name: (seconds of its first call, median seconds of the next `reps`)}; `calls` are
  {name: (step of a state, initial state)}, timed in turn so a change of load falls on all."""
  states, firsts, times = {}, {}, {name: [] for name in calls}
  for name, (call, state) in calls.items():
    start = time.perf_counter()
    states[name] = jax.block_until_ready(call(state))
    firsts[name] = time.perf_counter() - start
  for _ in range(reps):
    for name, (call, _) in calls.items():
      start = time.perf_counter()
      states[name] = jax.block_until_ready(call(states[name]))
      times[name].append(time.perf_counter() - start)
  return {name: (firsts[name], statistics.median(times[name])) for name in calls}


def steps_alone(args, members: dict, reps: int) -> dict:
  """Compile time and median step time of one run's step and of the sweep's step."""
  setup = setup_run(model=_spec(args.model), task=TASK, vocabulary="byte",
                    prompt_length=args.prompt_length, prompt_init=prompts.random_uniform,
                    placement="prepend", trainable=optim.PROMPT_ONLY, num_partitions=1,
                    mesh_shape=None, parameter_partitioning_dims=1,
                    activation_partitioning_dims=1, dropout_rate=None, seed=0,
                    batch_size=args.batch_size, input_length=args.input_length,
                    target_length=args.target_length)
  stream = pipeline.train_batches(setup.task, "train", setup.vocabulary, source=None,
                                  batch_size=args.batch_size, input_length=args.input_length,
                                  target_length=args.target_length, seed=0)
  local = next(stream).arrays
  optimizer = optim.masked_optimizer(optim.adafactor(), setup.labels)
  state, frozen = ts.init_train_state(setup.params, setup.labels, optimizer)
  step, _, single = ts.sharded_steps(setup.model, optimizer, setup.partitioner,
                                     *jax.eval_shape(lambda: (state, frozen)), ts.LossConfig())
  frozen = jax.device_put(frozen, single["frozen"])
  batch = setup.partitioner.shard_batch(local, args.batch_size)
  rng = jax.random.PRNGKey(0)
  name, settings = optim.settings_of(optim.adafactor())
  members_step, shardings = sweep_step.sharded_members_step(
      setup.model, lambda h: optim.masked_optimizer(
          optim.transformation(name, {**settings, **h}), setup.labels),
      setup.partitioner, single, ts.LossConfig())
  count = len(members)
  states = sweep_step.stack([ts.init_train_state(setup.params, setup.labels, optimizer)[0]
                             for _ in range(count)])
  hyper = {"learning_rate": np.asarray([lr for _, lr in members.values()], np.float32)}
  rngs = np.stack([np.asarray(jax.random.PRNGKey(seed)) for seed, _ in members.values()])
  batches = sweep_step.shard_batches(setup.partitioner, [local] * count, args.batch_size,
                                     shardings["batch"])
  timed = _timed_steps({
      "single": (lambda s: step(s, frozen, batch, rng)[0], jax.device_put(state, single["state"])),
      "sweep": (lambda s: members_step(s, frozen, batches, rngs, hyper)[0],
                jax.device_put(states, shardings["state"]))}, reps)
  result = {name: {"compile_s": first - median, "step_s": median}
            for name, (first, median) in timed.items()}
  result["step_ratio"] = result["sweep"]["step_s"] / (count * result["single"]["step_s"])
  return result

def machine() -> dict:
  return {"cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
          "devices": [str(d) for d in jax.devices()], "python": platform.python_version(),
          "jax": jax.__version__, "jaxlib": jaxlib.__version__}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--members", type=int, default=8)
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--model", choices=["tiny", "pretrained"], default="tiny")
  p.add_argument("--prompt_length", type=int, default=20)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--input_length", type=int, default=64)
  p.add_argument("--target_length", type=int, default=10)
  p.add_argument("--eval_examples", type=int, default=16)
  p.add_argument("--step_reps", type=int, default=20, help="timed steps in the step benchmark")
  p.add_argument("--steps_only", action="store_true", help="only the step benchmark")
  p.add_argument("--out", default="bench_sweep.json")
  args = p.parse_args(argv)
  members = _members(args.members)
  info = {**machine(), "load_before": os.getloadavg()}
  root = pathlib.Path(tempfile.mkdtemp(prefix="bench_sweep_"))
  passes = {"one_by_one_s": [], "sweep_s": []}
  try:
    for rep in range(0 if args.steps_only else args.repeats + 1):  # pass 0 warms up
      order = [("one_by_one_s", one_by_one), ("sweep_s", as_sweep)]
      for key, fn in order if rep % 2 == 0 else order[::-1]:  # alternating: a load drift

        where = root / f"{key}_{rep}"  # (of other processes) falls on both alike
        seconds = fn(args, members, where)
        shutil.rmtree(where, ignore_errors=True)
        if rep:
          passes[key].append(seconds)
        print(f"pass {rep}{' (warm-up)' if not rep else ''}: {key} {seconds:.1f}", flush=True)
    alone = steps_alone(args, members, args.step_reps)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  info["load_after"] = os.getloadavg()
  medians = {k: statistics.median(v) if v else float("nan") for k, v in passes.items()}
  result = {"members": args.members, "steps": args.steps, "model": args.model,
            "prompt_length": args.prompt_length, "batch_size": args.batch_size,
            "input_length": args.input_length, "target_length": args.target_length,
            "passes": passes, "median": medians,
            "wall_ratio": medians["sweep_s"] / medians["one_by_one_s"], "step": alone,
            "machine": info}
  print(f"\n{args.members} members x {args.steps} steps ({args.model} model, P "
        f"{args.prompt_length}, batch {args.batch_size}); medians of {args.repeats}:")
  print("| | one by one | sweep | sweep / one by one |\n| --- | --- | --- | --- |")
  print(f"| wall time, end to end | {medians['one_by_one_s']:.1f} s | {medians['sweep_s']:.1f} s "
        f"| {result['wall_ratio']:.2f} |")
  single, swept = alone["single"], alone["sweep"]
  print(f"| one step (median) | {args.members} x {single['step_s'] * 1e3:.1f} ms | "
        f"{swept['step_s'] * 1e3:.1f} ms | {alone['step_ratio']:.2f} |")
  print(f"| compile | {args.members} x {single['compile_s']:.2f} s | {swept['compile_s']:.2f} s "
        f"| {swept['compile_s'] / (args.members * single['compile_s']):.2f} |")
  print(f"machine: {info['cpu']}, {info['usable_cores']} of {info['cores']} cores usable, "
        f"load average {info['load_before'][0]:.1f} before / {info['load_after'][0]:.1f} after, "
        f"jax {info['jax']}")
  pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
