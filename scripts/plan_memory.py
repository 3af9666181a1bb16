"""Per-device memory of the prompt-tuning train step on a simulated mesh, compiled ahead of time.

  python scripts/plan_memory.py --size xxl --mesh 4x8 [--batch 32 --prompt_length 100
                                 --lengths 512,8 --family t5_1_1 --dtype bfloat16]

Nothing is allocated: parameters, state and batch are abstract shapes with their shardings, and
`jax.jit(...).lower(...).compile()` builds the SPMD program for D x M simulated CPU devices. The
figure is XLA's own accounting of that program (arguments + outputs - aliased + temporaries); a
TPU or GPU compilation fuses differently, so treat it as an estimate. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--size", required=True, choices=["small", "base", "large", "xl", "xxl"])
  p.add_argument("--mesh", required=True, help="DATAxMODEL, e.g. 4x8")
  p.add_argument("--family", default="t5_1_1", choices=["t5_1_1", "t5_1_0", "mt5", "byt5"])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--prompt_length", type=int, default=100)
  p.add_argument("--lengths", default="512,8", help="INPUT,TARGET token lengths")
  p.add_argument("--dtype", default="bfloat16", help="activation dtype (params stay float32)")
  p.add_argument("--parameter_partitioning_dims", type=int, default=1, choices=[1, 2])
  p.add_argument("--activation_partitioning_dims", type=int, default=1, choices=[1, 2])
  p.add_argument("--trainable", default=".*prompt.*", help="regex; '.*' plans model tuning")
  p.add_argument("--dropout_rate", type=float, default=0.1)
  p.add_argument("--remat_policy", default="none", choices=["none", "full", "minimal"],
                 help="rematerialise each layer in the backward pass (T5Config.remat_policy)")
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  data, model_parallel = (int(x) for x in args.mesh.lower().split("x"))
  # Simulated devices must be configured before jax starts.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={data * model_parallel}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import jax.numpy as jnp

  from softprompt_jax import optim, partitioning
  from softprompt_jax import train_step as ts
  from softprompt_jax.prompted import PromptedT5
  from softprompt_jax.t5_config import t5_config

  input_len, target_len = (int(x) for x in args.lengths.split(","))
  if args.batch % data:
    raise SystemExit(f"--batch {args.batch} must be a multiple of the data axis ({data})")
  config = t5_config(args.size, args.family, dtype=args.dtype, remat_policy=args.remat_policy,
                     dropout_rate=args.dropout_rate)
  model = PromptedT5(config, prompt_length=args.prompt_length)
  partitioner = partitioning.Partitioner.create(
      mesh_shape=(data, model_parallel),
      activation_partitioning_dims=args.activation_partitioning_dims,
      parameter_partitioning_dims=args.parameter_partitioning_dims)
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens, tokens)["params"]
  labels = optim.param_labels(params, (args.trainable,))
  optimizer = optim.masked_optimizer(optim.adafactor(), labels)
  state, frozen = jax.eval_shape(lambda p: ts.init_train_state(p, labels, optimizer), params)
  train, _, shardings = partitioning.sharded_steps(model, optimizer, partitioner, state, frozen)

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
  start = time.perf_counter()
  compiled = train.lower(abstract(state, shardings["state"]), abstract(frozen, shardings["frozen"]),
                         batch, rng).compile()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  gib = 1024 ** 3
  per_device = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  result = {
      "size": args.size, "family": args.family, "mesh": f"{data}x{model_parallel}",
      "batch": args.batch, "lengths": [input_len, target_len],
      "prompt_length": args.prompt_length, "trainable": args.trainable,
      "activation_dtype": args.dtype, "remat_policy": args.remat_policy, "params_billions": round(n_params / 1e9, 3),
      "per_device_gib": round(per_device / gib, 3),
      "arguments_gib": round(mem.argument_size_in_bytes / gib, 3),
      "temporaries_gib": round(mem.temp_size_in_bytes / gib, 3),
      "fits_16gib": per_device <= 16 * gib,
      "compile_s": round(compile_s, 1),
  }
  print(f"T5 {args.family} {args.size} ({result['params_billions']}B params), mesh "
        f"{result['mesh']} (data x model), batch {args.batch}, lengths {input_len}/{target_len}, "
        f"prompt {args.prompt_length}, remat {args.remat_policy}: "
        f"{result['per_device_gib']} GiB per device "
        f"(arguments {result['arguments_gib']}, temporaries {result['temporaries_gib']}); "
        f"compiled in {compile_s:.0f}s")
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
