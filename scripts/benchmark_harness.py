"""What every benchmark shares: devices, timing, the machine's description and matmul peak, the
configurations and batches both sides are given, and a process's peak memory.

Heavy imports (jax, torch) happen inside the functions: the benchmark sets JAX's allocator
options before JAX is first imported.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time

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
# Timing and the machine


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


def cpu_model() -> str:
  """The CPU's model name (Linux), else what platform says."""
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def machine(device) -> dict:
  import importlib.metadata as md
  cpu = cpu_model()
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
# What both sides are given


def model_config(size: str, dtype: str = "float32"):
  from softprompt_jax.t5_config import t5_config, tiny_config
  if size == "embedded":
    from softprompt_jax import pretrained
    return pretrained.load_tiny(dropout_rate=0.0, dtype=dtype)[0].config
  # "tiny" (the test suite's model) only checks that the script runs end to end.
  if size == "tiny":
    return tiny_config(dropout_rate=0.0, dtype=dtype)
  return t5_config(size, "t5_1_1", dropout_rate=0.0, dtype=dtype)


def random_tokens(config, s: dict, seed: int = 0):
  """(encoder input ids, target ids) as numpy: every other row padded, as real batches are."""
  import numpy as np
  rng = np.random.RandomState(seed)
  enc = rng.randint(2, config.vocab_size, (s["batch"], s["input_len"])).astype(np.int32)
  enc[1::2, s["input_len"] * 3 // 4:] = 0
  targets = rng.randint(2, config.vocab_size, (s["batch"], s["target_len"])).astype(np.int32)
  return enc, targets


# ---------------------------------------------------------------------------------------------
# Memory


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


def gib(n):
  return n / 2 ** 30
