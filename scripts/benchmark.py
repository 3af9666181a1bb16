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
DTYPES = ("float32", "bfloat16")

# The check, before anything is timed, that both sides compute the same function on the same
# weights and batch: relative difference of the mean loss, and relative L2 difference of the
# logits at the real target positions (the logits are what tells a wrong model apart: with random
# weights every model's loss is near log(vocab)). float32: the two agree to float rounding
# (measured 3e-7 to 2e-6 on the logits at tiny, small, base, embedded). bfloat16: each side
# rounds activations at other points, and PyTorch's loss is itself a bfloat16 number (steps of
# 0.06 near 10.9); measured on a CPU, logits 0.9% (tiny), 1.6% (small), 1.8% (base), 1.0%
# (embedded), loss 0.2-0.4%. tf32 (float32 on a GPU, see setup_torch) is taken as loose as
# bfloat16. A wrong model is far outside: a prompt shifted by uniform[-0.5, 0.5] noise moves the
# logits by 0.40-0.53 (0.20 on the shipped embedded model, whose 20-token prompt is short), a
# zero prompt by 0.50-1.12, other weights ~1.4.
TOLERANCE = {"float32": {"loss": 1e-4, "logits": 1e-3},
             "bfloat16": {"loss": 2e-2, "logits": 1e-1},
             "tf32": {"loss": 2e-2, "logits": 1e-1}}

# Dense (no sparsity) tensor-core peaks from NVIDIA's datasheets, FLOP/s, matched on the device
# name in this order: bfloat16, and TF32 (what a float32 matmul runs as by default in JAX on
# these GPUs; the PyTorch side is set to match). NVL variants have other clocks: not listed.
DATASHEET_PEAKS = (
    ("NVL", None),
    ("H200", {"bfloat16": 989e12, "float32": 494.7e12}),
    ("H100 PCIe", {"bfloat16": 756e12, "float32": 378e12}),
    ("H100", {"bfloat16": 989e12, "float32": 494.7e12}),  # SXM (HBM3)
    ("A100", {"bfloat16": 312e12, "float32": 156e12}),
)


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
# Devices


def jax_on_gpu() -> bool:
  import jax
  return jax.default_backend() in ("gpu", "cuda", "rocm")


def torch_device(requested=None):
  import torch
  return torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))


def torch_sync(device):
  """What makes a timed PyTorch call wait for its device (CUDA kernels run asynchronously)."""
  import torch
  return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def torch_dtype(dtype: str):
  import torch
  return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def setup_torch(device, dtype: str) -> None:
  """Threads as XLA's CPU backend (every core); on a GPU, float32 matmuls as TF32 on both sides
  (JAX's default for float32 on recent NVIDIA GPUs; PyTorch's default is full float32)."""
  import torch
  torch.set_num_threads(os.cpu_count())
  if device.type == "cuda" and dtype == "float32":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


# ---------------------------------------------------------------------------------------------
# Timing


def timed(calls: dict, reps: int) -> dict:
  """Times the contenders of one comparison: each called once to warm up (its compilation, for
  jitted code, is in `first_s`), then `reps` rounds that call each in turn, so a drift of the
  machine's speed (heat, other load) hits every contender alike. Every call returns only when
  its device is done. {name: {first_s, median_s, times}}."""
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


def machine(device) -> dict:
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
  for package in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax", "optax",
                  "numpy", "torch", "transformers", "peft"):
    try:
      versions[package] = md.version(package)
    except md.PackageNotFoundError:
      versions[package] = None
  import jax
  import torch
  gpu = jax_on_gpu()
  return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
          "python": platform.python_version(), "versions": versions,
          "jax_backend": jax.default_backend(), "jax_device": jax.devices()[0].device_kind,
          "jax_device_count": jax.device_count(), "gpu": gpu,
          "torch_device": str(device),
          "torch_gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
          "torch_cuda": torch.version.cuda}


def matmul_precision(dtype: str, gpu: bool) -> str:
  """What the matmuls run as: float32 is TF32 on a GPU (setup_torch), else the dtype."""
  return "tf32" if gpu and dtype == "float32" else dtype


def datasheet_peak(device_name: str, dtype: str):
  """{name, flops, precision} of a known GPU's dense peak for `dtype`, or None."""
  for pattern, peaks in DATASHEET_PEAKS:
    if pattern in device_name:
      if peaks is None:
        return None
      precision = "bf16" if dtype == "bfloat16" else "tf32"
      return {"matched": pattern, "flops": peaks[dtype], "precision": f"{precision} dense"}
  return None


def matmul_throughput(reps: int, dtype: str, device, gpu: bool) -> dict:
  """FLOP/s of an n x n matmul in `dtype` in JAX (XLA) and PyTorch, on each side's device: the
  machine's practical peak. n = 8192 (10 matmuls per timed call) on a GPU, 2048 (one) on a CPU."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  n, per_call = (8192, 10) if gpu else (2048, 1)
  a = np.random.RandomState(0).standard_normal((n, n)).astype(np.float32)
  ja = jnp.asarray(a, jnp.dtype(dtype))
  matmul = jax.jit(lambda x, y: x @ y)
  ta = torch.from_numpy(a).to(device=device, dtype=torch_dtype(dtype))
  sync = torch_sync(device)

  def ours():
    for _ in range(per_call):
      out = matmul(ja, ja)
    out.block_until_ready()

  def theirs():
    for _ in range(per_call):
      ta @ ta
    sync()

  t = timed({"jax": ours, "torch": theirs}, reps)
  flop = 2.0 * n ** 3 * per_call
  return {"n": n, "dtype": dtype, "precision": matmul_precision(dtype, gpu),
          "jax_flops": flop / t["jax"]["median_s"],
          "torch_flops": flop / t["torch"]["median_s"]}


# ---------------------------------------------------------------------------------------------
# Our steps and PEFT's, on the same weights and batch


def stored_frozen(params: dict, dtype: str) -> dict:
  """`params` with every leaf but the prompt cast to `dtype` (frozen_model.frozen_dtype)."""
  import jax
  import jax.numpy as jnp
  cast = lambda x: x.astype(jnp.dtype(dtype))
  return {k: v if k == "prompt" else jax.tree_util.tree_map(cast, v) for k, v in params.items()}


def model_config(size: str, dtype: str = "float32"):
  from softprompt_jax.t5_config import t5_config, tiny_config
  if size == "embedded":
    from softprompt_jax import pretrained
    return pretrained.load_tiny(dropout_rate=0.0, dtype=dtype)[0].config
  # "tiny" (the test suite's model) only checks that the script runs end to end.
  if size == "tiny":
    return tiny_config(dropout_rate=0.0, dtype=dtype)
  return t5_config(size, "t5_1_1", dropout_rate=0.0, dtype=dtype)


def build(size: str, s: dict):
  """(config, PromptedT5, params): random weights (or the shipped ones for "embedded"), the
  frozen ones stored in s["dtype"] and the prompt float32."""
  import jax

  from softprompt_jax import pretrained
  from softprompt_jax.model_spec import frozen_model, load_frozen
  from softprompt_jax.prompted_t5 import PromptedT5, make_prompted_params
  dtype = s.get("dtype", "float32")
  # Dropout off on both sides, so ours and PEFT's compute the same function (checked below).
  if size == "embedded":  # the real shipped weights
    t5, t5_params = pretrained.load_tiny(dropout_rate=0.0, dtype=dtype)
    config, t5_params = t5.config, stored_frozen(t5_params, dtype)
  else:  # initialised straight into the stored dtype, as a run's frozen model is
    config, t5_params = load_frozen(frozen_model(size=size, frozen_dtype=dtype),
                                    dropout_rate=0.0, dtype=dtype)
  model = PromptedT5(config, prompt_length=s["prompt_len"])
  return config, model, make_prompted_params(model, t5_params, jax.random.PRNGKey(0))


def random_tokens(config, s: dict, seed: int = 0):
  """(encoder input ids, target ids) as numpy: every other row padded, as real batches are."""
  import numpy as np
  rng = np.random.RandomState(seed)
  enc = rng.randint(2, config.vocab_size, (s["batch"], s["input_len"])).astype(np.int32)
  enc[1::2, s["input_len"] * 3 // 4:] = 0
  targets = rng.randint(2, config.vocab_size, (s["batch"], s["target_len"])).astype(np.int32)
  return enc, targets


def random_batch(config, s: dict, seed: int = 0):
  from softprompt_jax import train_step as ts
  enc, targets = random_tokens(config, s, seed)
  return enc, targets, ts.make_batch(enc, targets)


def dtypes_of(tree) -> list:
  import jax
  import numpy as np
  return sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(tree)
                 if np.issubdtype(x.dtype, np.floating) or "bfloat16" in str(x.dtype)})


def storage(state, frozen) -> dict:
  """What a prompt-tuning step really holds: the frozen weights' dtypes and bytes, and the
  dtypes of the trainable prompt and its optimizer slots."""
  import jax
  import numpy as np
  leaves = jax.tree_util.tree_leaves(frozen)  # arrays, or their shapes when traced
  return {"frozen_dtypes": dtypes_of(frozen),
          "frozen_bytes": int(sum(x.size * np.dtype(x.dtype).itemsize for x in leaves)),
          "frozen_params": int(sum(x.size for x in leaves)),
          "trainable_dtypes": dtypes_of(state.trainable),
          "opt_state_dtypes": dtypes_of(state.opt_state)}


def our_train_steps(model, params, batch):
  """(calls, storage): calls running one step each: prompt tuning, model tuning (trainable regex
  '.*') with the same code and optimizer, and the prompt-tuning step sharded by the Partitioner
  over all local devices (one here: what the sharding machinery costs)."""
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
    state, frozen = ts.init_train_state(params, labels, optimizer)
    if name == "prompt_tuning":
      stored = storage(state, frozen)
    calls[name] = stepper(step, state, frozen, batch)
  labels = optim.param_labels(params, optim.PROMPT_ONLY)
  optimizer = optim.masked_optimizer(optim.adafactor(), labels)
  partitioner = partitioning.Partitioner.create(devices=jax.local_devices()[:1])
  state, frozen = ts.init_train_state(params, labels, optimizer)
  train, _, shardings = ts.sharded_steps(
      model, optimizer, partitioner, *jax.eval_shape(lambda: (state, frozen)))
  calls["prompt_tuning_sharded"] = stepper(
      train, partitioner.put(state, shardings["state"]),
      partitioner.put(frozen, shardings["frozen"]),
      partitioner.put(batch, {k: shardings["batch"] for k in batch}))
  return calls, stored


def peft_config(prompt_len: int):
  import peft
  return peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=prompt_len,
                                 num_transformer_submodules=1)


def hf_t5_random(config, dtype: str):
  """transformers' T5 with random weights, built on the current torch device, laid out as
  `from_pretrained` lays out our checkpoints: one embedding table for encoder and decoder, and
  (T5 1.1) a separate lm_head; transformers 5 would tie the lm_head to the embedding."""
  import torch
  import transformers

  from softprompt_jax.checkpoints.hf_names import hf_config_dict
  hf = transformers.T5ForConditionalGeneration._from_config(
      transformers.T5Config(**hf_config_dict(config)), dtype=torch_dtype(dtype))
  if not config.logits_via_embedding:
    hf.lm_head.weight = torch.nn.Parameter(hf.shared.weight.detach().clone())
  return hf


def hf_models(config, params, prompt, tmp, device, dtype: str):
  """transformers' T5 holding exactly `params` (written and read as safetensors), in `dtype` on
  `device`, wrapped by PEFT prompt tuning whose prompt is set to `prompt`. The base model is cast
  before PEFT wraps it, so PEFT makes its prompt embedding as it does for a bfloat16 model:
  float32, cast to the input embeddings' dtype in the forward pass."""
  import peft
  import torch
  import transformers

  from softprompt_jax.checkpoints.hf_writer import save_hf_t5
  t5_params = {k: v for k, v in params.items() if k != "prompt"}
  save_hf_t5(tmp, t5_params, config)  # float32 files of the stored values: the cast is exact
  hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp, dtype=torch_dtype(dtype))
  hf = hf.to(device).eval()
  model = peft.get_peft_model(hf, peft_config(prompt.shape[0]))
  with torch.no_grad():
    model.prompt_encoder["default"].embedding.weight.copy_(torch.from_numpy(prompt.copy()))
  return model


def torch_inputs(enc, targets, device):
  import numpy as np
  import torch
  return {"input_ids": torch.from_numpy(enc.astype(np.int64)).to(device),
          "attention_mask": torch.from_numpy((enc > 0).astype(np.int64)).to(device),
          "labels": torch.from_numpy(np.where(targets > 0, targets, -100).astype(np.int64))
                    .to(device)}


def peft_train_step(peft_model, enc, targets, device):
  """PEFT prompt tuning with transformers' Adafactor at the paper's settings."""
  from transformers.optimization import Adafactor
  trainable = [p for p in peft_model.parameters() if p.requires_grad]
  optimizer = Adafactor(trainable, lr=0.3, decay_rate=-0.8, weight_decay=1e-5,
                        clip_threshold=1.0, scale_parameter=False, relative_step=False)
  inputs = torch_inputs(enc, targets, device)
  sync = torch_sync(device)

  def call():
    optimizer.zero_grad()
    loss = peft_model(**inputs).loss
    loss.backward()
    optimizer.step()
    sync()

  peft_model.train()
  return call


def same_function(model, params, batch, peft_model, enc, targets, device, precision: str) -> dict:
  """Both sides' mean token cross-entropy and logits on the benchmark batch before any step,
  and whether they agree within the TOLERANCE of `precision` (`passed`). A control in the same
  run shows that the tolerance tells a wrong model apart: PEFT with its prompt shifted by
  uniform[-0.5, 0.5] noise (the paper's init range) must fall outside it; `passed` requires both.
  """
  import numpy as np
  import torch

  from softprompt_jax import losses
  logits = model.apply({"params": params}, batch["encoder_input_tokens"],
                       batch["decoder_input_tokens"], batch["decoder_target_tokens"])
  ours, _ = losses.t5x_loss(logits, batch["decoder_target_tokens"], z_loss=0.0)
  real = targets > 0
  a = np.asarray(logits, np.float32)[real]
  difference = lambda out: float(np.linalg.norm(a - out) / np.linalg.norm(out))
  inputs = torch_inputs(enc, targets, device)
  peft_model.eval()
  prompt = peft_model.prompt_encoder["default"].embedding.weight
  kept = prompt.detach().clone()
  noise = np.random.RandomState(1).uniform(-0.5, 0.5, tuple(kept.shape)).astype(np.float32)
  with torch.no_grad():
    out = peft_model(**inputs)
    prompt.add_(torch.from_numpy(noise).to(kept.device))
    wrong = peft_model(**inputs).logits.float().cpu().numpy()[real]
    prompt.copy_(kept)
  theirs = out.loss.item()
  tolerance = TOLERANCE[precision]
  result = {"ours": float(ours), "peft": theirs, "peft_loss_dtype": str(out.loss.dtype),
            "relative_difference": abs(float(ours) - theirs) / abs(theirs),
            "logits_relative_difference": difference(out.logits.float().cpu().numpy()[real]),
            "wrong_prompt_logits_relative_difference": difference(wrong),
            "precision": precision, "tolerance": tolerance}
  result["passed"] = bool(result["relative_difference"] <= tolerance["loss"] and
                          result["logits_relative_difference"] <= tolerance["logits"] and
                          result["wrong_prompt_logits_relative_difference"] > tolerance["logits"])
  return result


# ---------------------------------------------------------------------------------------------
# Inference: prompt banks and greedy decoding


def mixed_batches(model, params, s: dict, enc) -> dict:
  """Forward (scoring) and greedy decoding of one batch: a single-task prompt, a bank with
  mixed task ids, and the same examples grouped task by task (one call per task)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from softprompt_jax import decoding
  from softprompt_jax.prompted_t5 import PromptedT5
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


def greedy_against_generate(model, params, peft_model, enc, s: dict, device) -> dict:
  """Tokens/s of our cached greedy decoding and of PEFT/transformers `generate` (greedy, cache
  on); EOS never stops either side, so both produce exactly `target_len` tokens per row. In
  bfloat16 the two may pick different tokens where random weights leave near-ties."""
  import numpy as np
  import torch

  from softprompt_jax import decoding
  steps = s["target_len"]
  ours_tokens = []

  def ours():
    ours_tokens[:] = [np.asarray(decoding.greedy_decode(model, params, enc, steps, eos_id=-1))]

  inputs = torch_inputs(enc, enc, device)
  theirs_tokens = []

  def theirs():
    with torch.no_grad():
      out = peft_model.generate(input_ids=inputs["input_ids"],
                                attention_mask=inputs["attention_mask"],
                                max_new_tokens=steps, do_sample=False,
                                num_beams=1, eos_token_id=None, use_cache=True)
    theirs_tokens[:] = [out.cpu().numpy()[:, 1:]]  # drop the decoder start token (syncs)

  peft_model.eval()
  result = timed({"ours": ours, "generate": theirs}, s["reps"])
  tokens = enc.shape[0] * steps
  for side in ("ours", "generate"):
    result[side]["tokens_per_s"] = tokens / result[side]["median_s"]
  a, b = ours_tokens[0], theirs_tokens[0]
  result["token_agreement"] = float(np.mean(a[:, :b.shape[1]] == b)) if a.shape == b.shape else None
  return result


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
  peak memory (the device allocator's on a GPU, the process's resident memory on a CPU) and
  XLA's own accounting of the compiled step. trainable "peft": PEFT prompt tuning instead."""
  if trainable == "peft":
    return peft_memory_child(size, s)
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
  stored = storage(state, frozen)
  step, _ = ts.jit_steps(model, optimizer)
  rng = jax.random.PRNGKey(0)
  compiled = step.lower(state, frozen, batch, rng).compile()
  analysis = compiled.memory_analysis()
  for _ in range(3):
    state, metrics = step(state, frozen, batch, rng)
    metrics["loss"].block_until_ready()
  result = {"peak_rss_bytes": peak_rss_bytes(), "baseline_rss_bytes": baseline,
            "xla_argument_bytes": analysis.argument_size_in_bytes,
            "xla_output_bytes": analysis.output_size_in_bytes,
            "xla_alias_bytes": analysis.alias_size_in_bytes,
            "xla_temp_bytes": analysis.temp_size_in_bytes, **stored}
  if jax_on_gpu():
    result["peak_bytes"] = jax.devices()[0].memory_stats()["peak_bytes_in_use"]
    result["peak_source"] = "device: jax memory_stats()['peak_bytes_in_use']"
  else:
    result["peak_bytes"], result["peak_source"] = result["peak_rss_bytes"], "host: VmHWM"
  return result


def peft_memory_child(size: str, s: dict) -> dict:
  """PEFT prompt tuning with Adam on its prompt (as ours in the memory table), transformers' T5
  built with random weights straight in s["dtype"] on the PyTorch device."""
  baseline = peak_rss_bytes()
  import peft
  import torch
  device = torch_device(s.get("torch_device"))
  config = model_config(size, s["dtype"])
  with torch.device(device):
    hf = hf_t5_random(config, s["dtype"])
  model = peft.get_peft_model(hf, peft_config(s["prompt_len"]))
  model.train()
  optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
  inputs = torch_inputs(*random_tokens(config, s), device)
  for _ in range(3):
    optimizer.zero_grad()
    model(**inputs).loss.backward()
    optimizer.step()
  torch_sync(device)()
  frozen = [p for p in model.parameters() if not p.requires_grad]
  result = {"peak_rss_bytes": peak_rss_bytes(), "baseline_rss_bytes": baseline,
            "frozen_dtypes": sorted({str(p.dtype).replace("torch.", "") for p in frozen}),
            "frozen_bytes": int(sum(p.numel() * p.element_size() for p in frozen)),
            "trainable_dtypes": sorted({str(p.dtype).replace("torch.", "")
                                        for p in model.parameters() if p.requires_grad})}
  if device.type == "cuda":
    result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    result["peak_source"] = "device: torch.cuda.max_memory_allocated()"
  else:
    result["peak_bytes"], result["peak_source"] = result["peak_rss_bytes"], "host: VmHWM"
  return result


def peak_memory(size: str, s: dict) -> dict:
  results = {}
  for name, trainable in (("prompt_tuning", ".*prompt.*"), ("model_tuning", ".*"),
                          ("peft_prompt_tuning", "peft")):
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
    result = memory_child(*args.memory_child, json.loads(args.shape))
    print(json.dumps(result))
    return result
  import gc

  import numpy as np
  import torch

  from softprompt_jax import flops
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
      peft_model = hf_models(config, params, np.asarray(params["prompt"]["prompt"]), tmp, device,
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
