"""One process of the two-process test (tests/test_multihost.py); also builds its reference.

Run as: python multihost_worker.py PROCESS_ID PORT OUT_DIR
"""

import os
import sys

NUM_PROCESSES = 2
GLOBAL_BATCH = 8
STEPS = 3


def build():
  """Model, params, optimizer and the global batch: identical in every process."""
  import jax
  import numpy as np

  import softprompt_jax as sj
  from softprompt_jax import optim
  from softprompt_jax import train_step as ts
  from softprompt_jax.prompted_t5 import PromptedT5, make_prompted_params
  config = sj.tiny_config(num_heads=8, head_dim=4)
  model = PromptedT5(config, prompt_length=4)
  t5_params, _ = sj.init_params(sj.T5(config), jax.random.PRNGKey(0))
  params = make_prompted_params(model, t5_params, jax.random.PRNGKey(1))
  labels = optim.param_labels(params)
  optimizer = optim.masked_optimizer(optim.adafactor(), labels)
  rng = np.random.RandomState(0)
  batch = ts.make_batch(rng.randint(2, config.vocab_size, (GLOBAL_BATCH, 12)),
                        rng.randint(2, config.vocab_size, (GLOBAL_BATCH, 4)))
  return model, params, labels, optimizer, jax.tree_util.tree_map(np.asarray, batch)


def main(process_id: int, port: int, out_dir: str):
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax
  import numpy as np

  from softprompt_jax import partitioning
  from softprompt_jax import train_step as ts
  assert partitioning.initialize_distributed(f"127.0.0.1:{port}", NUM_PROCESSES, process_id)
  assert jax.process_count() == NUM_PROCESSES and jax.device_count() == 8
  model, params, labels, optimizer, batch = build()
  partitioner = partitioning.Partitioner.create(mesh_shape=(4, 2))
  state, frozen = ts.init_train_state(params, labels, optimizer)
  shapes = jax.eval_shape(lambda: (state, frozen))
  train, _, shardings = ts.sharded_steps(model, optimizer, partitioner, *shapes)
  state = partitioner.put(state, shardings["state"])
  frozen = partitioner.put(frozen, shardings["frozen"])
  rows = partitioner.process_rows(GLOBAL_BATCH)
  assert rows.stop - rows.start == GLOBAL_BATCH // NUM_PROCESSES, rows  # only its own slice
  local = {k: v[rows] for k, v in batch.items()}
  sharded_batch = partitioner.shard_batch(local, GLOBAL_BATCH)
  for _ in range(STEPS):
    state, metrics = train(state, frozen, sharded_batch, jax.random.PRNGKey(2))
  loss = float(metrics["loss"])
  prompt = np.asarray(state.trainable["prompt"]["prompt"])
  if partitioning.is_primary_process():  # only process 0 writes
    np.save(os.path.join(out_dir, "prompt.npy"), prompt)
    with open(os.path.join(out_dir, "loss.txt"), "w") as f:
      f.write(repr(loss))
  with open(os.path.join(out_dir, f"rows_{process_id}.txt"), "w") as f:
    f.write(f"{rows.start} {rows.stop}")
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
