"""The train step of a sweep: M members trained by one compiled step over one frozen model.

The members' `TrainState`s (step, trainable subtree, optimizer state) are stacked on a leading
member axis [M, ...], and the step is `train_step.train_step` under `jax.vmap` over that axis:
each member gets its own batch, dropout key and optimizer hyperparameters (traced values, so
members that differ in, say, the learning rate share the compiled step), while the frozen params
are one copy that every member reads (an input outside the vmap: never batched, copied or
donated). Shardings are the single run's with the member axis in front, replicated.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from softprompt_jax import partitioning
from softprompt_jax import train_step as ts


def stack(trees: list):
  """One tree whose leaves are the members' leaves stacked on a new leading axis."""
  return jax.tree_util.tree_map(lambda *leaves: np.stack([np.asarray(x) for x in leaves]),
                                *trees)


def member(tree, index: int):
  """Member `index`'s slice of a stacked tree."""
  return jax.tree_util.tree_map(lambda x: x[index], tree)


def members_step(states: ts.TrainState, frozen: dict, batches: ts.Batch, rngs: jax.Array,
                 hyper: dict, *, model, optimizer_for: Callable[[dict], object],
                 loss_config: ts.LossConfig) -> tuple[ts.TrainState, dict]:
  """One optimizer step of every member: (stacked new states, metrics [M] each).

  `batches` are [M, B, ...], `rngs` [M, 2] (each member's `train_step` rng), `hyper` {name: [M]}
  the hyperparameters that differ between members; `optimizer_for(hyper_of_one_member)` builds
  the (masked) optimizer from one member's traced values."""
  def one(state, batch, rng, hyper_m):
    return ts.train_step(state, frozen, batch, rng, model=model,
                         optimizer=optimizer_for(hyper_m), loss_config=loss_config)
  return jax.vmap(one)(states, batches, rngs, hyper)


def _with_member_axis(sharding: NamedSharding) -> NamedSharding:
  return NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))


def stacked_shardings(single_state_shardings):
  """The single run's state shardings with an unsharded member axis in front."""
  return jax.tree_util.tree_map(_with_member_axis, single_state_shardings)


def sharded_members_step(model, optimizer_for: Callable[[dict], object],
                         partitioner: partitioning.Partitioner, single_shardings: dict,
                         loss_config: ts.LossConfig) -> tuple[Callable, dict]:
  """(step, shardings) for `partitioner`'s mesh: step(states, frozen, batches, rngs, hyper) ->
  (states, metrics), the states donated. `single_shardings` are those `ts.sharded_steps` gives
  one member ("state", "frozen", "batch"); the returned ones hold the stacked "state" and
  "batch" and the single "frozen"."""
  state_shardings = stacked_shardings(single_shardings["state"])
  batch_sharding = _with_member_axis(single_shardings["batch"])
  replicated = partitioner.replicated
  step = partitioner.partition(
      functools.partial(members_step, model=model, optimizer_for=optimizer_for,
                        loss_config=loss_config),
      in_shardings=(state_shardings, single_shardings["frozen"], batch_sharding, replicated,
                    replicated),
      out_shardings=(state_shardings, replicated), donate_argnums=(0,))
  return step, {"state": state_shardings, "frozen": single_shardings["frozen"],
                "batch": batch_sharding}


def shard_batches(partitioner: partitioning.Partitioner, local_batches: list[dict],
                  global_batch_size: int, sharding: NamedSharding) -> dict:
  """Global [M, B, ...] arrays from this process's rows of each member's batch (the rows
  `partitioner.process_rows` names), sharded as `sharding` (members unsharded, batch on data)."""
  out = {}
  for name in local_batches[0]:
    local = np.stack([np.asarray(b[name]) for b in local_batches])
    global_shape = (local.shape[0], global_batch_size) + local.shape[2:]
    out[name] = jax.make_array_from_process_local_data(sharding, local, global_shape)
  return out
