"""Per-device memory of the sharded prompt-tuning train step, compiled ahead of time.

  python scripts/plan_memory.py --size xxl --mesh 4x8 --topology v3:4x4 [--remat_policy full
      --frozen_dtype bfloat16 --batch 32 --prompt_length 100 --lengths 512,8 --family t5_1_1]

Nothing is allocated: parameters, state and batch are abstract shapes with their shardings, and
`jax.jit(...).lower(...).compile()` builds the exact SPMD program that `train` runs.

With `--topology` (e.g. v3:2x2 = v3-8, v3:4x4 = v3-32, v4:2x2x1 = v4-8, v4:2x4x4 = v4-32) the
program is compiled by the TPU compiler (libtpu, `pip install -e ".[tpu]"`) for compile-only
devices of that topology, no TPU needed: the figures are the TPU compiler's own. A program that
does not fit makes that compiler refuse it; the planner reports that as `"fits": false` with the
compiler's figures. Without `--topology` it compiles for D x M simulated CPU devices: XLA:CPU
fuses less and ignores rematerialisation, so read that figure as an upper bound.

The last line is JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import time

GIB = 1024 ** 3
# HBM per JAX device (a v2/v3 core; a v4/v5p chip in megacore mode), for the "fits" figure of
# a CPU plan and for the report: the TPU compiler itself decides what fits.
HBM_GIB = {"TPU v2": 8, "TPU v3": 16, "TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95,
           "TPU v6 lite": 32}
CPU_BUDGET_GIB = 16


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--size", required=True, choices=["tiny", "small", "base", "large", "xl", "xxl"],
                 help="a T5 size; tiny is the test model (a quick check of the toolchain)")
  p.add_argument("--mesh", required=True, help="DATAxMODEL, e.g. 4x8 (their product: the number "
                 "of devices)")
  p.add_argument("--topology", help="a TPU topology, e.g. v3:4x4 or v4:2x4x4: compile with the "
                 "TPU compiler (libtpu) instead of XLA:CPU")
  p.add_argument("--chip_config_name", default=None,
                 help="TPU chip configuration, e.g. megacore (v4/v5p: one device a chip)")
  p.add_argument("--family", default="t5_1_1", choices=["t5_1_1", "t5_1_0", "mt5", "byt5"])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--prompt_length", type=int, default=100)
  p.add_argument("--lengths", default="512,8", help="INPUT,TARGET token lengths")
  p.add_argument("--dtype", default="bfloat16", help="activation dtype")
  p.add_argument("--frozen_dtype", default="float32", choices=["float32", "bfloat16"],
                 help="how the frozen weights are stored (frozen_model.frozen_dtype); the prompt "
                 "and its optimizer state are float32")
  p.add_argument("--parameter_partitioning_dims", type=int, default=1, choices=[1, 2])
  p.add_argument("--activation_partitioning_dims", type=int, default=1, choices=[1, 2])
  p.add_argument("--trainable", default=".*prompt.*", help="regex; '.*' plans model tuning")
  p.add_argument("--dropout_rate", type=float, default=0.1)
  p.add_argument("--remat_policy", default="none", choices=["none", "full", "minimal"],
                 help="rematerialise each layer in the backward pass (T5Config.remat_policy)")
  return p.parse_args(argv)


def tpu_devices(topology: str, chip_config_name=None):
  """Compile-only devices of a TPU topology (libtpu loaded in this process; CPU stays the
  default backend)."""
  from jax.experimental import topologies
  kwargs = {"chip_config_name": chip_config_name} if chip_config_name else {}
  return topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs).devices


def parse_out_of_memory(message: str) -> dict:
  """What the TPU compiler's out-of-HBM refusal says: GiB needed (of temporaries, or in all) and
  GiB available. Its two forms: '... required for HLO temporaries (16.88G) exceeds available
  HBM (15.48G)' and 'Used 20.51G of 15.48G hbm. Exceeded hbm capacity by 5.03G.'"""
  def gib(number, unit):
    return float(number) * {"K": 2 ** -20, "M": 2 ** -10, "G": 1, "T": 1024}[unit.upper()]
  out = {}
  required = re.search(r"required for ([\w ]+?) \(([\d.]+)([KMGT])\) exceeds available HBM "
                       r"\(([\d.]+)([KMGT])\)", message)
  used = re.search(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm", message)
  if required:
    what, number, unit, avail, avail_unit = required.groups()
    key = "temporaries_gib" if "temporar" in what else "per_device_gib"
    out[key] = gib(number, unit)
    out["hbm_gib"] = gib(avail, avail_unit)
  elif used:
    out["per_device_gib"] = gib(*used.groups()[:2])
    out["hbm_gib"] = gib(*used.groups()[2:])
  return out


def bytes_per_device(shapes, shardings, itemsize=None) -> int:
  """Bytes of one device's shards of `shapes` (each leaf's own dtype, or `itemsize` bytes)."""
  import jax
  import numpy as np
  sizes = jax.tree_util.tree_map(
      lambda x, s: int(np.prod(s.shard_shape(x.shape))) * (itemsize or x.dtype.itemsize),
      shapes, shardings)
  return sum(jax.tree_util.tree_leaves(sizes))


def main(argv=None) -> dict:
  args = parse_args(argv)
  try:
    data, model_parallel = (int(x) for x in args.mesh.lower().split("x"))
  except ValueError:
    raise SystemExit(f"--mesh {args.mesh!r}: write it as DATAxMODEL, e.g. 4x8") from None
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # CPU stays the default backend
  if args.topology:
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server: compile only
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # another planner may run beside
  else:  # simulated devices must be configured before jax starts
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                               f"device_count={data * model_parallel}")
  import jax
  import jax.numpy as jnp

  from softprompt_jax import optim, partitioning
  from softprompt_jax import train_step as ts
  from softprompt_jax.prompted_t5 import PromptedT5
  from softprompt_jax.t5_config import t5_config, tiny_config

  input_len, target_len = (int(x) for x in args.lengths.split(","))
  if args.batch % data:
    raise SystemExit(f"--batch {args.batch} must be a multiple of the data axis ({data})")
  if args.topology:
    try:
      devices = tpu_devices(args.topology, args.chip_config_name)
    except Exception as e:  # libtpu missing, or a topology it does not know
      raise SystemExit(f"--topology {args.topology}: {str(e).splitlines()[0]} (TPU plans need "
                       "libtpu: pip install -e '.[tpu]')") from None
    device_kind = devices[0].device_kind
  else:
    devices, device_kind = jax.devices(), "cpu"
  if data * model_parallel != len(devices):
    where = f"topology {args.topology}" if args.topology else "the simulated CPU devices"
    raise SystemExit(f"--mesh {args.mesh} has {data * model_parallel} devices but {where} has "
                     f"{len(devices)}; give DATAxMODEL with product {len(devices)}")
  make_config = tiny_config if args.size == "tiny" else functools.partial(t5_config, args.size)
  config = make_config(args.family, dtype=args.dtype, remat_policy=args.remat_policy,
                       dropout_rate=args.dropout_rate)
  model = PromptedT5(config, prompt_length=args.prompt_length)
  partitioner = partitioning.Partitioner.create(
      mesh_shape=(data, model_parallel), devices=devices,
      activation_partitioning_dims=args.activation_partitioning_dims,
      parameter_partitioning_dims=args.parameter_partitioning_dims)
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens, tokens)["params"]
  labels = optim.param_labels(params, (args.trainable,))
  # Frozen leaves in their storage dtype, as load_frozen leaves them.
  params = jax.tree_util.tree_map(
      lambda x, label: jax.ShapeDtypeStruct(
          x.shape, args.frozen_dtype if label == optim.FROZEN else x.dtype), params, labels)
  optimizer = optim.masked_optimizer(optim.adafactor(), labels)
  state, frozen = jax.eval_shape(lambda p: ts.init_train_state(p, labels, optimizer), params)
  train, _, shardings = ts.sharded_steps(model, optimizer, partitioner, state, frozen)

  def abstract(tree, sharding_tree):
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sharding_tree)

  batch = {
      "encoder_input_tokens": jax.ShapeDtypeStruct((args.batch, input_len), jnp.int32),
      "decoder_input_tokens": jax.ShapeDtypeStruct((args.batch, target_len), jnp.int32),
      "decoder_target_tokens": jax.ShapeDtypeStruct((args.batch, target_len), jnp.int32),
  }
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings["batch"])
           for k, v in batch.items()}
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=partitioner.replicated)
  frozen_f32 = bytes_per_device(frozen, shardings["frozen"], itemsize=4)
  frozen_stored = bytes_per_device(frozen, shardings["frozen"])
  arguments = (frozen_stored + bytes_per_device(state, shardings["state"])
               + bytes_per_device(batch, {k: shardings["batch"] for k in batch}))
  hbm_gib = HBM_GIB.get(device_kind) if args.topology else CPU_BUDGET_GIB
  result = {
      "compiler": "tpu" if args.topology else "cpu", "topology": args.topology,
      "device_kind": device_kind, "chip_config_name": args.chip_config_name,
      "num_devices": len(devices), "size": args.size, "family": args.family,
      "mesh": f"{data}x{model_parallel}", "batch": args.batch, "lengths": [input_len, target_len],
      "prompt_length": args.prompt_length, "trainable": args.trainable,
      "activation_dtype": args.dtype, "frozen_dtype": args.frozen_dtype,
      "remat_policy": args.remat_policy,
      "params_billions": round(sum(x.size for x in jax.tree_util.tree_leaves(params)) / 1e9, 3),
      "frozen_gib": round(frozen_stored / GIB, 3),
      "frozen_saving_gib": round((frozen_f32 - frozen_stored) / GIB, 3),
  }
  start = time.perf_counter()
  try:
    compiled = train.lower(abstract(state, shardings["state"]),
                           abstract(frozen, shardings["frozen"]), batch, rng).compile()
  except Exception as e:  # the TPU compiler refuses a program that exceeds HBM
    message = str(e)
    if "RESOURCE_EXHAUSTED" not in message:
      raise
    # The compiler names what it needed; with temporaries alone, add the arguments (known
    # exactly from the shardings) for the per-device figure.
    found = parse_out_of_memory(message)
    if "temporaries_gib" in found:
      found["per_device_gib"] = found["temporaries_gib"] + arguments / GIB
    result.update({"fits": False, "arguments_gib": round(arguments / GIB, 3),
                   **{k: round(v, 3) for k, v in found.items()},
                   "compile_s": round(time.perf_counter() - start, 1),
                   "compiler_message": " ".join(message.split())[:400]})
    result.setdefault("per_device_gib", None)
    result.setdefault("hbm_gib", hbm_gib)
    print(f"{_describe(result)}: does not fit: {result['compiler_message']}")
    print(json.dumps(result))
    return result
  mem = compiled.memory_analysis()
  per_device = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
  result.update({
      "per_device_gib": round(per_device / GIB, 3),
      "arguments_gib": round(mem.argument_size_in_bytes / GIB, 3),
      "temporaries_gib": round(mem.temp_size_in_bytes / GIB, 3),
      "hbm_gib": hbm_gib,
      # The TPU compiler refuses what does not fit, so a compiled TPU program fits.
      "fits": True if args.topology else per_device <= CPU_BUDGET_GIB * GIB,
      "compile_s": round(time.perf_counter() - start, 1),
  })
  bound = "" if args.topology else " (XLA:CPU: an upper bound)"
  print(f"{_describe(result)}: {result['per_device_gib']} GiB per device{bound} (arguments "
        f"{result['arguments_gib']}, of which frozen weights {result['frozen_gib']}, temporaries "
        f"{result['temporaries_gib']}); {args.frozen_dtype} frozen weights save "
        f"{result['frozen_saving_gib']} GiB per device against float32; compiled in "
        f"{result['compile_s']:.0f}s")
  print(json.dumps(result))
  return result


def _describe(result: dict) -> str:
  where = (f"{result['topology']} ({result['num_devices']} x {result['device_kind']})"
           if result["topology"] else f"{result['num_devices']} simulated CPU devices")
  return (f"T5 {result['family']} {result['size']} ({result['params_billions']}B params) on "
          f"{where}, mesh {result['mesh']} (data x model), batch {result['batch']}, lengths "
          f"{result['lengths'][0]}/{result['lengths'][1]}, prompt {result['prompt_length']}, "
          f"remat {result['remat_policy']}, frozen {result['frozen_dtype']}")


if __name__ == "__main__":
  main(sys.argv[1:])
