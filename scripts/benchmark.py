"""Prompt tuning's speed and memory against model tuning, PEFT and this machine's matmul peak.

  python scripts/benchmark.py --quick        # under 10 minutes on 2 CPU cores
  python scripts/benchmark.py                # full: more repetitions, small and base speed

One run, one machine, the same T5 1.1 shapes (random weights), batch, lengths and threads for
every contender. Times are medians of repeated calls after a warm-up call; the warm-up (which
includes XLA compilation for our steps) is reported apart. Peak memory is each configuration's
own process peak (VmHWM), measured in a fresh subprocess. PyTorch, transformers and PEFT come
with the test extras (`pip install -e ".[test]"`). The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

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
NUM_BANK_PROMPTS = 4


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="fewer sizes and repetitions (<10 min)")
  for name in SHAPE:
    p.add_argument(f"--{name}", type=int, help=f"override {name} ({SHAPE[name]})")
  p.add_argument("--reps", type=int, help="override the mode's timed repetitions")
  p.add_argument("--speed_sizes", help="comma-separated T5 1.1 sizes for the speed tables")
  p.add_argument("--memory_size", help="T5 1.1 size for the peak-memory table")
  p.add_argument("--skip_memory", action="store_true", help="leave out the memory subprocesses")
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
  return s


# ---------------------------------------------------------------------------------------------
# Timing


def timed(calls: dict, reps: int) -> dict:
  """Times the contenders of one comparison: each called once to warm up (its compilation, for
  jitted code, is in `first_s`), then `reps` rounds that call each in turn, so a drift of the
  machine's speed (heat, other load) hits every contender alike. {name: {first_s, median_s,
  times}}."""
  results = {}
  for name, call in calls.items():
    start = time.perf_counter()
    call()
    results[name] = {"first_s": time.perf_counter() - start, "times": []}
  for _ in range(reps):
    for name, call in calls.items():
      start = time.perf_counter()
      call()
      results[name]["times"].append(time.perf_counter() - start)
  for r in results.values():
    r["median_s"] = statistics.median(r["times"])
  return results


def machine() -> dict:
  import importlib.metadata as md
  cpu = platform.processor()
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  versions = {}
  for package in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers", "peft"):
    try:
      versions[package] = md.version(package)
    except md.PackageNotFoundError:
      versions[package] = None
  import torch
  return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
          "python": platform.python_version(), "versions": versions}


def matmul_throughput(reps: int, n: int = 2048) -> dict:
  """float32 FLOP/s of an n x n matmul in JAX (XLA) and PyTorch: this machine's practical peak."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  a = np.random.RandomState(0).standard_normal((n, n)).astype(np.float32)
  ja = jnp.asarray(a)
  matmul = jax.jit(lambda x, y: x @ y)
  ta = torch.from_numpy(a.copy())
  t = timed({"jax": lambda: matmul(ja, ja).block_until_ready(), "torch": lambda: ta @ ta}, reps)
  flop = 2.0 * n ** 3
  return {"n": n, "jax_flops": flop / t["jax"]["median_s"],
          "torch_flops": flop / t["torch"]["median_s"]}


# ---------------------------------------------------------------------------------------------
# Our steps and PEFT's, on the same weights and batch


def build(size: str, s: dict):
  import jax

  from softprompt_jax import pretrained
  from softprompt_jax.prompted import PromptedT5, make_prompted_params
  from softprompt_jax.t5 import init_params
  from softprompt_jax.t5_config import t5_config, tiny_config
  # Dropout off on both sides, so ours and PEFT's compute the same function (checked below).
  if size == "embedded":  # the real shipped weights
    t5, t5_params = pretrained.load_tiny(dropout_rate=0.0)
    model = PromptedT5(t5.config, prompt_length=s["prompt_len"])
    return t5.config, model, make_prompted_params(model, t5_params, jax.random.PRNGKey(0))
  # "tiny" (the test suite's model) only checks that the script runs end to end.
  config = (tiny_config(dropout_rate=0.0) if size == "tiny"
            else t5_config(size, "t5_1_1", dropout_rate=0.0))
  model = PromptedT5(config, prompt_length=s["prompt_len"])
  params, _ = init_params(model, jax.random.PRNGKey(0), 1, 8, 4)
  return config, model, params


def random_batch(config, s: dict, seed: int = 0):
  import numpy as np

  from softprompt_jax import train_step as ts
  rng = np.random.RandomState(seed)
  enc = rng.randint(2, config.vocab_size, (s["batch"], s["input_len"])).astype(np.int32)
  enc[1::2, s["input_len"] * 3 // 4:] = 0  # every other row padded, as real batches are
  targets = rng.randint(2, config.vocab_size, (s["batch"], s["target_len"])).astype(np.int32)
  return enc, targets, ts.make_batch(enc, targets)


def our_train_steps(model, params, batch) -> dict:
  """Calls running one step each: prompt tuning, model tuning (trainable regex '.*') with the
  same code and optimizer, and the prompt-tuning step sharded by the Partitioner over all local
  devices (one on this CPU: what the sharding machinery costs)."""
  import jax

  from softprompt_jax import optim, partitioning
  from softprompt_jax import train_step as ts
  rng = jax.random.PRNGKey(0)

  def stepper(step, state, frozen, batch):
    box = [state]

    def call():
      box[0], metrics = step(box[0], frozen, batch, rng)
      metrics["loss"].block_until_ready()
    return call

  calls = {}
  for name, patterns in (("prompt_tuning", optim.PROMPT_ONLY),
                         ("model_tuning", optim.MODEL_TUNING)):
    labels = optim.param_labels(params, patterns)
    optimizer = optim.masked_optimizer(optim.adafactor(), labels)
    step, _ = ts.jit_steps(model, optimizer)
    calls[name] = stepper(step, *ts.init_train_state(params, labels, optimizer), batch)
  labels = optim.param_labels(params, optim.PROMPT_ONLY)
  optimizer = optim.masked_optimizer(optim.adafactor(), labels)
  partitioner = partitioning.Partitioner.create()
  state, frozen = ts.init_train_state(params, labels, optimizer)
  train, _, shardings = partitioning.sharded_steps(
      model, optimizer, partitioner, *jax.eval_shape(lambda: (state, frozen)))
  calls["prompt_tuning_sharded"] = stepper(
      train, partitioner.put(state, shardings["state"]),
      partitioner.put(frozen, shardings["frozen"]),
      partitioner.put(batch, {k: shardings["batch"] for k in batch}))
  return calls


def hf_models(config, params, prompt, tmp):
  """transformers' T5 holding exactly `params` (written and read as safetensors), wrapped by
  PEFT prompt tuning whose prompt is set to `prompt`."""
  import peft
  import torch
  import transformers

  from softprompt_jax.checkpoints.hf_writer import save_hf_t5
  t5_params = {k: v for k, v in params.items() if k != "prompt"}
  save_hf_t5(tmp, t5_params, config)
  hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp).eval()
  peft_config = peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM",
                                        num_virtual_tokens=prompt.shape[0],
                                        num_transformer_submodules=1)
  model = peft.get_peft_model(hf, peft_config)
  with torch.no_grad():
    model.prompt_encoder["default"].embedding.weight.copy_(torch.from_numpy(prompt.copy()))
  return model


def peft_train_step(peft_model, enc, targets):
  """PEFT prompt tuning with transformers' Adafactor at the paper's settings."""
  import numpy as np
  import torch
  from transformers.optimization import Adafactor
  trainable = [p for p in peft_model.parameters() if p.requires_grad]
  optimizer = Adafactor(trainable, lr=0.3, decay_rate=-0.8, weight_decay=1e-5,
                        clip_threshold=1.0, scale_parameter=False, relative_step=False)
  input_ids = torch.from_numpy(enc.astype(np.int64))
  attention_mask = torch.from_numpy((enc > 0).astype(np.int64))
  labels = torch.from_numpy(np.where(targets > 0, targets, -100).astype(np.int64))

  def call():
    optimizer.zero_grad()
    loss = peft_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    loss.backward()
    optimizer.step()

  peft_model.train()
  return call


def same_loss(model, params, batch, peft_model, enc, targets) -> dict:
  """Both sides' mean token cross-entropy on the benchmark batch before any step."""
  import numpy as np
  import torch

  from softprompt_jax import losses
  logits = model.apply({"params": params}, batch["encoder_input_tokens"],
                       batch["decoder_input_tokens"], batch["decoder_target_tokens"])
  ours, _ = losses.t5x_loss(logits, batch["decoder_target_tokens"], z_loss=0.0)
  peft_model.eval()
  with torch.no_grad():
    theirs = peft_model(input_ids=torch.from_numpy(enc.astype(np.int64)),
                        attention_mask=torch.from_numpy((enc > 0).astype(np.int64)),
                        labels=torch.from_numpy(np.where(targets > 0, targets, -100)
                                                .astype(np.int64))).loss.item()
  return {"ours": float(ours), "peft": theirs,
          "relative_difference": abs(float(ours) - theirs) / abs(theirs)}


# ---------------------------------------------------------------------------------------------
# Inference: prompt banks and greedy decoding


def mixed_batches(model, params, s: dict, enc) -> dict:
  """Forward (scoring) and greedy decoding of one batch: a single-task prompt, a bank with
  mixed task ids, and the same examples grouped task by task (one call per task)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from softprompt_jax import decoding
  from softprompt_jax.prompted import PromptedT5
  single, config = model, model.config
  bank = PromptedT5(config, prompt_length=s["prompt_len"], num_prompts=NUM_BANK_PROMPTS)
  bank_params = {**params, "prompt": {"prompt": jax.random.uniform(
      jax.random.PRNGKey(1), (NUM_BANK_PROMPTS,) + params["prompt"]["prompt"].shape, minval=-0.5,
      maxval=0.5)}}
  b = enc.shape[0]
  ids = np.arange(b, dtype=np.int32) % NUM_BANK_PROMPTS
  dec_in = jnp.zeros((b, s["target_len"]), jnp.int32)
  enc = jnp.asarray(enc)
  forward = jax.jit(lambda m, p, e, d, **kw: m.apply({"params": p}, e, d, **kw),
                    static_argnums=0)
  steps = s["target_len"]
  decode = lambda m, p, e, **kw: decoding.greedy_decode(m, p, e, steps, eos_id=-1, **kw)
  by_task = [np.flatnonzero(ids == t) for t in range(NUM_BANK_PROMPTS)]

  def run(fn):
    return timed({
        "single": lambda: fn(single, params, enc).block_until_ready(),
        "mixed": lambda: fn(bank, bank_params, enc, prompt_ids=jnp.asarray(ids))
                         .block_until_ready(),
        "task_by_task": lambda: [
            fn(bank, bank_params, enc[rows], prompt_ids=jnp.full((len(rows),), t, jnp.int32))
            .block_until_ready() for t, rows in enumerate(by_task)],
    }, s["reps"])

  return {"forward": run(lambda m, p, e, **kw: forward(m, p, e, dec_in[:e.shape[0]], **kw)),
          "greedy": run(decode)}


def greedy_against_generate(model, params, peft_model, enc, s: dict) -> dict:
  """Tokens/s of our cached greedy decoding and of PEFT/transformers `generate` (greedy, cache
  on); EOS never stops either side, so both produce exactly `target_len` tokens per row."""
  import numpy as np
  import torch

  from softprompt_jax import decoding
  steps = s["target_len"]
  ours_tokens = []

  def ours():
    ours_tokens[:] = [np.asarray(decoding.greedy_decode(model, params, enc, steps, eos_id=-1))]

  input_ids = torch.from_numpy(enc.astype(np.int64))
  attention_mask = torch.from_numpy((enc > 0).astype(np.int64))
  theirs_tokens = []

  def theirs():
    with torch.no_grad():
      out = peft_model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                max_new_tokens=steps, do_sample=False,
                                num_beams=1, eos_token_id=None, use_cache=True)
    theirs_tokens[:] = [out.numpy()[:, 1:]]  # drop the decoder start token

  peft_model.eval()
  result = timed({"ours": ours, "generate": theirs}, s["reps"])
  tokens = enc.shape[0] * steps
  for side in ("ours", "generate"):
    result[side]["tokens_per_s"] = tokens / result[side]["median_s"]
  a, b = ours_tokens[0], theirs_tokens[0]
  result["token_agreement"] = float(np.mean(a[:, :b.shape[1]] == b)) if a.shape == b.shape else None
  return result


# ---------------------------------------------------------------------------------------------
# Peak memory: each configuration alone in a fresh process


def peak_rss_bytes() -> int:
  """This process's peak resident memory. /proc's VmHWM belongs to the current program image;
  getrusage's ru_maxrss would also count the parent's memory at fork, which survives exec."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def memory_child(size: str, trainable: str, s: dict) -> dict:
  """Loads random weights, builds Adam's state for `trainable`, runs three steps; reports the
  process's peak resident memory and XLA's own accounting of the compiled step."""
  import gc

  import jax

  from softprompt_jax import optim
  from softprompt_jax import train_step as ts
  baseline = peak_rss_bytes()
  config, model, params = build(size, s)
  _, _, batch = random_batch(config, s)
  labels = optim.param_labels(params, (trainable,))
  optimizer = optim.masked_optimizer(optim.adam(1e-3), labels)
  state, frozen = ts.init_train_state(params, labels, optimizer)
  del params  # the state holds its own copy of what trains; the rest lives in `frozen`
  gc.collect()
  step, _ = ts.jit_steps(model, optimizer)
  rng = jax.random.PRNGKey(0)
  compiled = step.lower(state, frozen, batch, rng).compile()
  analysis = compiled.memory_analysis()
  for _ in range(3):
    state, metrics = step(state, frozen, batch, rng)
    metrics["loss"].block_until_ready()
  peak = peak_rss_bytes()
  return {"peak_rss_bytes": peak, "baseline_rss_bytes": baseline,
          "xla_argument_bytes": analysis.argument_size_in_bytes,
          "xla_output_bytes": analysis.output_size_in_bytes,
          "xla_alias_bytes": analysis.alias_size_in_bytes,
          "xla_temp_bytes": analysis.temp_size_in_bytes}


def peak_memory(size: str, s: dict) -> dict:
  results = {}
  for name, trainable in (("prompt_tuning", ".*prompt.*"), ("model_tuning", ".*")):
    cmd = [sys.executable, os.path.abspath(__file__), "--memory_child", size, trainable,
           "--shape", json.dumps(s)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
      raise SystemExit(f"memory measurement {name} ({size}) failed:\n{out.stderr[-3000:]}")
    results[name] = json.loads(out.stdout.strip().splitlines()[-1])
  return results


# ---------------------------------------------------------------------------------------------
# Report


def gib(n):
  return n / 2 ** 30


def report(s, info, peak, speed, inference, memory) -> dict:
  print(f"\nmachine: {info['cpu']}, {info['cores']} cores; torch threads {info['torch_threads']}")
  print("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
  print(f"shapes: batch {s['batch']}, input {s['input_len']} + prompt {s['prompt_len']}, "
        f"target {s['target_len']}; float32; dropout 0")
  print(f"matmul peak (2048^3 float32): JAX {peak['jax_flops'] / 1e9:.1f} GFLOP/s, "
        f"PyTorch {peak['torch_flops'] / 1e9:.1f} GFLOP/s")
  print("\n| size | step | median s | warm-up s | GFLOP | GFLOP/s | MFU |")
  print("|---|---|---|---|---|---|---|")
  for size, r in speed.items():
    label = size if size != "embedded" else (
        "embedded (batch {batch}, input {input_len} + prompt {prompt_len}, target {target_len})"
        .format(**EMBEDDED_SHAPE))
    for name in ("prompt_tuning", "prompt_tuning_sharded", "model_tuning", "peft_prompt_tuning"):
      t = r[name]
      flop = r["flops"]["model_tuning" if name == "model_tuning" else "prompt_tuning"]
      print(f"| {label} | {name} | {t['median_s']:.3f} | {t['first_s']:.1f} | {flop / 1e9:.1f} | "
            f"{flop / t['median_s'] / 1e9:.1f} | {flop / t['median_s'] / peak['jax_flops']:.3f} |")
    print(f"| {label} | loss ours / PEFT (same weights, same batch) | {r['loss']['ours']:.5f} / "
          f"{r['loss']['peft']:.5f} | | | | |")
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
  summary = {
      "prompt_over_model_tuning_step":
          first["prompt_tuning"]["median_s"] / first["model_tuning"]["median_s"],
      "ours_over_peft_step":
          first["prompt_tuning"]["median_s"] / first["peft_prompt_tuning"]["median_s"],
      "mfu": first["flops"]["prompt_tuning"] / first["prompt_tuning"]["median_s"]
             / peak["jax_flops"],
      "mfu_model_tuning": first["flops"]["model_tuning"] / first["model_tuning"]["median_s"]
                          / peak["jax_flops"],
      "mixed_over_single_batch":
          inference["forward"]["mixed"]["median_s"] / inference["forward"]["single"]["median_s"],
      "mixed_over_single_greedy":
          inference["greedy"]["mixed"]["median_s"] / inference["greedy"]["single"]["median_s"],
      "ours_over_generate_tokens_per_s": g["ours"]["tokens_per_s"] / g["generate"]["tokens_per_s"],
  }
  if memory is not None:
    print(f"\n| peak memory ({s['memory_size']}, Adam) | process peak GiB | XLA arguments GiB | "
          "XLA temporaries GiB |")
    print("|---|---|---|---|")
    for name, m in memory.items():
      print(f"| {name} | {gib(m['peak_rss_bytes']):.2f} | {gib(m['xla_argument_bytes']):.2f} | "
            f"{gib(m['xla_temp_bytes']):.2f} |")
    summary["prompt_over_model_tuning_peak_mem"] = (
        memory["prompt_tuning"]["peak_rss_bytes"] / memory["model_tuning"]["peak_rss_bytes"])
  else:
    summary["prompt_over_model_tuning_peak_mem"] = None
  for size, r in speed.items():
    summary[f"{size}_prompt_tuning_step_s"] = r["prompt_tuning"]["median_s"]
    summary[f"{size}_model_tuning_step_s"] = r["model_tuning"]["median_s"]
    summary[f"{size}_peft_step_s"] = r["peft_prompt_tuning"]["median_s"]
  summary["matmul_gflops"] = peak["jax_flops"] / 1e9
  return summary


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.memory_child:
    result = memory_child(*args.memory_child, json.loads(args.shape))
    print(json.dumps(result))
    return result
  import numpy as np
  import torch

  from softprompt_jax import flops
  torch.set_num_threads(os.cpu_count())  # XLA's CPU backend also uses every core
  s = settings(args)
  started = time.perf_counter()
  info = machine()
  peak = matmul_throughput(s["reps"])
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
      peft_model = hf_models(config, params, np.asarray(params["prompt"]["prompt"]), tmp)
      r["loss"] = same_loss(model, params, batch, peft_model, enc, targets)
      if size == s["speed_sizes"][0]:  # before PEFT's steps change its prompt
        r["greedy"] = greedy_against_generate(model, params, peft_model, enc, shape)
      calls = our_train_steps(model, params, batch)
      calls["peft_prompt_tuning"] = peft_train_step(peft_model, enc, targets)
      r.update(timed(calls, s["reps"]))
      del calls
    speed[size] = r
    if inference is None:
      inference = mixed_batches(model, params, shape, enc)
    del model, params, peft_model
  memory = None if args.skip_memory else peak_memory(s["memory_size"], s)
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
