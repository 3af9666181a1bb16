"""Prompt tuning's speed and memory against model tuning, PEFT and this machine's matmul peak.

  python scripts/benchmark.py --quick        # under 10 minutes on 2 CPU cores
  python scripts/benchmark.py                # full: more repetitions, small and base speed
  python scripts/benchmark.py --dtype bfloat16 --speed_sizes base,large,xl --memory_size xl
                                             # on a GPU (see BENCHMARKS.md, section GPU)

One run, one machine, the same T5 1.1 shapes (random weights), batch, lengths and threads for
every contender. Times are medians of repeated calls after a warm-up call; the warm-up (which
includes XLA compilation for our steps) is reported apart. Peak memory is each configuration's
own peak, measured in a fresh subprocess: the process's (VmHWM) on a CPU, the device's allocator
peak on a GPU. PyTorch, transformers and PEFT come with the test extras
(`pip install -e ".[test]"`). The last line printed is a JSON object.

Devices: JAX runs on its default backend (a GPU when jax is installed with CUDA); the PyTorch side
runs on `cuda` when `torch.cuda.is_available()` (or `--torch_device`).

`--dtype bfloat16`: ours computes with bfloat16 activations (`T5Config.dtype`) and stores the
frozen weights in bfloat16 (as `frozen_model.frozen_dtype='bfloat16'`); the prompt and its
optimizer state stay float32. PEFT's side is transformers' T5 cast to bfloat16 before PEFT wraps
it, so PEFT keeps its prompt embedding float32 and casts it to bfloat16 where it joins the input
embeddings, as ours does. Model tuning keeps float32 master weights (bfloat16 activations).

The parts beside this file: benchmark_harness.py (devices, timing, the matmul peak, what both
sides are given), benchmark_ours.py (our steps, prompt banks, our memory) and benchmark_peft.py
(PEFT's side and the same-function checks). This file holds the command line and the report.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

# The parts beside this file are found when it runs as a script; an import by path (the tests)
# needs their folder on the path.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from benchmark_harness import (datasheet_peak, gib, machine, matmul_precision,  # noqa: E402
                               matmul_throughput, model_config, setup_torch, timed, torch_device)
from benchmark_ours import (build, memory_child, mixed_batches, our_train_steps,  # noqa: E402
                            random_batch, storage, stored_frozen)
from benchmark_peft import (greedy_against_generate, hf_models, hf_t5_random,  # noqa: E402
                            peft_memory_child, peft_train_step, same_function)

# Both modes time the same shapes (the paper's prompt length); full adds the base size's speed
# and more repetitions.
SHAPE = dict(batch=8, input_len=128, target_len=32, prompt_len=100)

MODES = {
    "quick": dict(SHAPE, speed_sizes=("small",), memory_size="base", reps=5),
    "full": dict(SHAPE, speed_sizes=("small", "base", "embedded"), memory_size="base", reps=10),
}

# "embedded": the shipped tiny byte-level model at `softprompt-jax demo`'s shapes, the workload
# of the one-command try-out (a speed row only).
EMBEDDED_SHAPE = dict(batch=32, input_len=96, target_len=16, prompt_len=20)

DTYPES = ("float32", "bfloat16")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="fewer sizes and repetitions (<10 min)")
  for name in SHAPE:
    p.add_argument(f"--{name}", type=int, help=f"override {name} ({SHAPE[name]})")
  p.add_argument("--reps", type=int, help="override the mode's timed repetitions")
  p.add_argument("--speed_sizes", help="comma-separated T5 1.1 sizes for the speed tables")
  p.add_argument("--memory_size", help="T5 1.1 size for the peak-memory table")
  p.add_argument("--skip_memory", action="store_true", help="leave out the memory subprocesses")
  p.add_argument("--dtype", choices=DTYPES, default="float32",
                 help="float32 (default) or bfloat16: activations and frozen weights on our "
                      "side, the whole model on PEFT's; prompts stay float32 on both")
  p.add_argument("--torch_device", help="the PyTorch side's device (default: cuda if available)")
  p.add_argument("--trace_only", action="store_true",
                 help="build every speed size abstractly (no weights, no steps run): shapes, "
                      "parameter and byte counts, FLOPs; checks that a size builds")
  p.add_argument("--json_out", help="also write the final JSON object to this file")
  # Internal: one peak-memory measurement in a fresh process.
  p.add_argument("--memory_child", nargs=2, metavar=("SIZE", "TRAINABLE"), help=argparse.SUPPRESS)
  p.add_argument("--shape", help=argparse.SUPPRESS)
  return p.parse_args(argv)


def settings(args) -> dict:
  s = dict(MODES["quick" if args.quick else "full"])
  for name in SHAPE:
    if getattr(args, name):
      s[name] = getattr(args, name)
  if args.reps:
    s["reps"] = args.reps
  if args.speed_sizes:
    s["speed_sizes"] = tuple(args.speed_sizes.split(","))
  if args.memory_size:
    s["memory_size"] = args.memory_size
  s["dtype"] = args.dtype
  return s


# ---------------------------------------------------------------------------------------------
# Trace only: every size built abstractly (no weights), so a size too big for this machine is
# checked to build before a GPU run


def trace(size: str, s: dict) -> dict:
  import jax
  import jax.numpy as jnp
  import torch

  from softprompt_jax import flops, optim
  from softprompt_jax import train_step as ts
  from softprompt_jax.prompted_t5 import PromptedT5
  from softprompt_jax.t5 import init_params
  config = model_config(size, s["dtype"])
  model = PromptedT5(config, prompt_length=s["prompt_len"])
  shapes = jax.eval_shape(lambda: stored_frozen(
      init_params(model, jax.random.PRNGKey(0), 1, 8, 4)[0], s["dtype"]))
  labels = optim.param_labels(shapes, optim.PROMPT_ONLY)
  optimizer = optim.masked_optimizer(optim.adafactor(), labels)
  state, frozen = jax.eval_shape(lambda p: ts.init_train_state(p, labels, optimizer), shapes)
  batch = {k: jax.ShapeDtypeStruct((s["batch"], s["input_len" if k.startswith("enc") else
                                                 "target_len"]), jnp.int32)
           for k in ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens")}
  step, _ = ts.jit_steps(model, optimizer)
  _, metrics = jax.eval_shape(step, state, frozen, batch, jax.random.PRNGKey(0))
  with torch.device("meta"):  # PEFT's side: transformers builds the same T5, without memory
    hf_params = sum(p.numel() for p in hf_t5_random(config, s["dtype"]).parameters())
  counted = flops.forward_flops(config, s["batch"], s["input_len"] + s["prompt_len"],
                                s["target_len"])
  stored = storage(state, frozen)
  return {**stored, "hf_params": int(hf_params),
          "same_param_count": int(hf_params) == stored["frozen_params"],
          "loss_shape": list(metrics["loss"].shape),
          "flops": {"prompt_tuning": counted.prompt_tuning, "model_tuning": counted.model_tuning}}


# ---------------------------------------------------------------------------------------------
# Peak memory: each configuration in a fresh process of its own


def peak_memory(size: str, s: dict, at_once: bool) -> dict:
  """Each configuration's peak in a process of its own. `at_once` (a CPU run): the three run
  side by side, as each reads only its own process's peak (VmHWM); on a GPU they share one
  device's memory, so one after another."""
  commands = {name: [sys.executable, os.path.abspath(__file__), "--memory_child", size, trainable,
                     "--shape", json.dumps(s)]
              for name, trainable in (("prompt_tuning", ".*prompt.*"), ("model_tuning", ".*"),
                                      ("peft_prompt_tuning", "peft"))}
  start = lambda cmd: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
  results = {}

  def finish(name, process):
    stdout, stderr = process.communicate()
    if process.returncode != 0:
      raise SystemExit(f"memory measurement {name} ({size}) failed:\n{stderr[-3000:]}")
    results[name] = json.loads(stdout.strip().splitlines()[-1])
  if at_once:
    running = {name: start(cmd) for name, cmd in commands.items()}
    for name, process in running.items():
      finish(name, process)
  else:
    for name, cmd in commands.items():
      finish(name, start(cmd))
  return results


# ---------------------------------------------------------------------------------------------
# Report


def tokens_per_step(s: dict, size: str) -> int:
  """Real tokens of one training batch: inputs and targets (prompt positions not counted)."""
  shape = {**s, **EMBEDDED_SHAPE} if size == "embedded" else s
  return shape["batch"] * (shape["input_len"] + shape["target_len"])


def report(s, info, peak, speed, inference, memory) -> dict:
  print(f"\nmachine: {info['cpu']}, {info['cores']} cores; torch threads {info['torch_threads']}; "
        f"JAX on {info['jax_backend']} ({info['jax_device']}), PyTorch on {info['torch_device']}"
        + (f" ({info['torch_gpu']})" if info["torch_gpu"] else ""))
  print("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v))
  print(f"shapes: batch {s['batch']}, input {s['input_len']} + prompt {s['prompt_len']}, "
        f"target {s['target_len']}; {s['dtype']}; dropout 0")
  sheet = peak["datasheet"]
  print(f"matmul peak ({peak['n']}^3 {peak['dtype']} as {peak['precision']}, measured in this "
        "run): JAX "
        f"{peak['jax_flops'] / 1e9:.1f} GFLOP/s, PyTorch {peak['torch_flops'] / 1e9:.1f} GFLOP/s"
        + (f"; datasheet ({sheet['matched']}, {sheet['precision']}) {sheet['flops'] / 1e12:.0f} "
           "TFLOP/s" if sheet else ""))
  print("\n| size | step | median s | warm-up s | tokens/s | GFLOP | GFLOP/s | MFU (measured) | "
        "MFU (datasheet) | × PEFT step |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for size, r in speed.items():
    label = size if size != "embedded" else (
        "embedded (batch {batch}, input {input_len} + prompt {prompt_len}, target {target_len})"
        .format(**EMBEDDED_SHAPE))
    for name in ("prompt_tuning", "prompt_tuning_sharded", "model_tuning", "peft_prompt_tuning"):
      t = r[name]
      flop = r["flops"]["model_tuning" if name == "model_tuning" else "prompt_tuning"]
      rate = flop / t["median_s"]
      mfu_sheet = f"{rate / sheet['flops']:.3f}" if sheet else "n/a"
      print(f"| {label} | {name} | {t['median_s']:.3f} | {t['first_s']:.1f} | "
            f"{tokens_per_step(s, size) / t['median_s']:.0f} | {flop / 1e9:.1f} | "
            f"{rate / 1e9:.1f} | {rate / peak['jax_flops']:.3f} | {mfu_sheet} | "
            f"{t['median_s'] / r['peft_prompt_tuning']['median_s']:.2f} |")
    loss = r["loss"]
    print(f"| {label} | loss ours / PEFT (same weights, same batch) | {loss['ours']:.5f} / "
          f"{loss['peft']:.5f} | logits rel. diff {loss['logits_relative_difference']:.1e} | "
          f"wrong prompt {loss['wrong_prompt_logits_relative_difference']:.2f} | "
          f"tolerance {loss['tolerance']['logits']:g} | | | | |")
    st = r["storage"]
    print(f"| {label} | frozen weights stored | {', '.join(st['frozen_dtypes'])}, "
          f"{gib(st['frozen_bytes']):.3f} GiB | prompt and optimizer state "
          f"{', '.join(sorted(set(st['trainable_dtypes'] + st['opt_state_dtypes'])))} | "
          "| | | | | |")
  first = speed[s["speed_sizes"][0]]
  size0 = s["speed_sizes"][0]
  print(f"\n| inference ({size0}) | single-task batch s | mixed-task batch s | task by task s | "
        "mixed / single |")
  print("|---|---|---|---|---|")
  for kind in ("forward", "greedy"):
    r = inference[kind]
    print(f"| {kind} | {r['single']['median_s']:.3f} | {r['mixed']['median_s']:.3f} | "
          f"{r['task_by_task']['median_s']:.3f} | "
          f"{r['mixed']['median_s'] / r['single']['median_s']:.3f} |")
  g = first["greedy"]
  print(f"\n| greedy decoding ({size0}) | tokens/s | median s | warm-up s |")
  print("|---|---|---|---|")
  for side in ("ours", "generate"):
    print(f"| {side} | {g[side]['tokens_per_s']:.1f} | {g[side]['median_s']:.3f} | "
          f"{g[side]['first_s']:.1f} |")
  print(f"token agreement: {g['token_agreement']}")
  mfu = lambda r, name, flops: r["flops"][flops] / r[name]["median_s"] / peak["jax_flops"]
  summary = {
      "dtype": s["dtype"], "jax_device": info["jax_device"], "torch_device": info["torch_device"],
      "gpu": info["gpu"],
      "prompt_over_model_tuning_step":
          first["prompt_tuning"]["median_s"] / first["model_tuning"]["median_s"],
      "ours_over_peft_step":
          first["prompt_tuning"]["median_s"] / first["peft_prompt_tuning"]["median_s"],
      "mfu": mfu(first, "prompt_tuning", "prompt_tuning"),
      "mfu_model_tuning": mfu(first, "model_tuning", "model_tuning"),
      "mfu_datasheet": (first["flops"]["prompt_tuning"] / first["prompt_tuning"]["median_s"]
                        / sheet["flops"]) if sheet else None,
      "mixed_over_single_batch":
          inference["forward"]["mixed"]["median_s"] / inference["forward"]["single"]["median_s"],
      "mixed_over_single_greedy":
          inference["greedy"]["mixed"]["median_s"] / inference["greedy"]["single"]["median_s"],
      "ours_over_generate_tokens_per_s": g["ours"]["tokens_per_s"] / g["generate"]["tokens_per_s"],
      "same_function": all(r["loss"]["passed"] for r in speed.values()),
      "frozen_dtypes": first["storage"]["frozen_dtypes"],
      "frozen_bytes": first["storage"]["frozen_bytes"],
  }
  if memory is not None:
    source = memory["prompt_tuning"]["peak_source"]
    print(f"\n| peak memory ({s['memory_size']}, Adam, {s['dtype']}) | peak GiB ({source}) | "
          "frozen weights GiB | XLA arguments GiB | XLA temporaries GiB |")
    print("|---|---|---|---|---|")
    for name, m in memory.items():
      xla = (f"{gib(m['xla_argument_bytes']):.2f} | {gib(m['xla_temp_bytes']):.2f}"
             if "xla_argument_bytes" in m else "n/a | n/a")
      print(f"| {name} | {gib(m['peak_bytes']):.2f} | {gib(m['frozen_bytes']):.2f} | {xla} |")
    summary["peak_memory_source"] = source
    summary["prompt_over_model_tuning_peak_mem"] = (
        memory["prompt_tuning"]["peak_bytes"] / memory["model_tuning"]["peak_bytes"])
    summary["prompt_over_peft_peak_mem"] = (
        memory["prompt_tuning"]["peak_bytes"] / memory["peft_prompt_tuning"]["peak_bytes"])
  else:
    summary["prompt_over_model_tuning_peak_mem"] = None
  for size, r in speed.items():
    summary[f"{size}_prompt_tuning_step_s"] = r["prompt_tuning"]["median_s"]
    summary[f"{size}_model_tuning_step_s"] = r["model_tuning"]["median_s"]
    summary[f"{size}_peft_step_s"] = r["peft_prompt_tuning"]["median_s"]
    summary[f"{size}_ours_over_peft_step"] = (r["prompt_tuning"]["median_s"]
                                              / r["peft_prompt_tuning"]["median_s"])
    summary[f"{size}_prompt_tuning_tokens_per_s"] = (tokens_per_step(s, size)
                                                     / r["prompt_tuning"]["median_s"])
  summary["matmul_gflops"] = peak["jax_flops"] / 1e9
  return summary


def main(argv=None) -> dict:
  args = parse_args(argv)
  # JAX would take 75% of a GPU's memory at start; PyTorch shares the device in this process.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  if args.memory_child:
    size, trainable = args.memory_child  # trainable "peft": PEFT prompt tuning instead
    shape = json.loads(args.shape)
    result = (peft_memory_child(size, shape) if trainable == "peft"
              else memory_child(size, trainable, shape))
    print(json.dumps(result))
    return result
  import gc

  import numpy as np
  import torch

  from softprompt_jax import flops
  from softprompt_jax.prompted_t5 import get_prompt
  s = settings(args)
  device = torch_device(args.torch_device)
  s["torch_device"] = str(device)
  setup_torch(device, s["dtype"])
  started = time.perf_counter()
  info = machine(device)
  if device.type == "cuda" and not info["gpu"]:
    raise SystemExit(f"PyTorch runs on {device} but JAX on {info['jax_backend']}: install JAX with "
                     "CUDA (pip install -U \"jax[cuda12]\") or pass --torch_device cpu")
  if args.trace_only:
    result = {"machine": info, "settings": s,
              "trace": {size: trace(size, s) for size in s["speed_sizes"]}}
    for size, t in result["trace"].items():
      print(f"{size}: {t['frozen_params'] / 1e6:.1f}M frozen params in {t['frozen_dtypes']} "
            f"({gib(t['frozen_bytes']):.2f} GiB; transformers' T5: {t['hf_params'] / 1e6:.1f}M), "
            f"prompt {t['trainable_dtypes']}, prompt-tuning step "
            f"{t['flops']['prompt_tuning'] / 1e12:.2f} TFLOP")
    if args.json_out:
      with open(args.json_out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(json.dumps(result, default=str))
    return result
  peak = matmul_throughput(s["reps"], s["dtype"], device, info["gpu"])
  peak["datasheet"] = datasheet_peak(info["jax_device"], s["dtype"]) if info["gpu"] else None
  speed, inference = {}, None
  for size in s["speed_sizes"]:
    shape = {**s, **EMBEDDED_SHAPE} if size == "embedded" else s
    config, model, params = build(size, shape)
    enc, targets, batch = random_batch(config, shape)
    counted = flops.forward_flops(config, shape["batch"],
                                  shape["input_len"] + shape["prompt_len"], shape["target_len"])
    r = {}
    r["flops"] = {"prompt_tuning": counted.prompt_tuning, "model_tuning": counted.model_tuning}
    with tempfile.TemporaryDirectory() as tmp:
      peft_model = hf_models(config, params, np.asarray(get_prompt(params)), tmp, device,
                             s["dtype"])
      r["loss"] = same_function(model, params, batch, peft_model, enc, targets, device,
                                matmul_precision(s["dtype"], info["gpu"]))
      if not r["loss"]["passed"]:
        raise SystemExit(f"{size}: ours and PEFT do not compute the same function "
                         f"({json.dumps(r['loss'])}); nothing timed")
      if size == s["speed_sizes"][0]:  # before PEFT's steps change its prompt
        r["greedy"] = greedy_against_generate(model, params, peft_model, enc, shape, device)
      calls, r["storage"] = our_train_steps(model, params, batch)
      calls["peft_prompt_tuning"] = peft_train_step(peft_model, enc, targets, device)
      r.update(timed(calls, s["reps"]))
      del calls
    speed[size] = r
    if inference is None:
      inference = mixed_batches(model, params, shape, enc)
    del model, params, peft_model
    gc.collect()
    if device.type == "cuda":
      torch.cuda.empty_cache()
  memory = (None if args.skip_memory
            else peak_memory(s["memory_size"], s, at_once=device.type == "cpu"))
  summary = report(s, info, peak, speed, inference, memory)
  summary["wall_s"] = time.perf_counter() - started
  summary["mode"] = "quick" if args.quick else "full"
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump({"summary": summary, "machine": info, "settings": s, "speed": speed,
                 "inference": inference, "memory": memory, "matmul": peak}, f, indent=1,
                default=str)
  print(json.dumps(summary))
  return summary


if __name__ == "__main__":
  main()
