"""pjit-style SPMD: a ("data", "model") mesh, t5x's logical-axis rules, and shardings from them.

Everything runs through JAX's own machinery (`jax.jit` with `NamedSharding`s, logical
constraints inside the model, `jax.distributed` across hosts). The rules are t5x's
`standard_logical_axis_rules`, plus replicated prompt axes, so a t5x user's partitioning gin
bindings carry over.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from softprompt_jax.t5 import logical_axes

LogicalRules = Sequence[tuple[str, Optional[str]]]

# The prompt is tiny and read by every example: replicate it on every device.
PROMPT_RULES = [("prompt", None), ("prompts", None), ("prompt_embed", None)]


def standard_logical_axis_rules(activation_partitioning_dims: int = 1,
                                parameter_partitioning_dims: int = 1,
                                additional_rules: Optional[LogicalRules] = None) -> list:
  """t5x's rules: 1-D or 2-D parameter and activation partitioning, then `additional_rules`.

  As in t5x the first rule naming an axis wins, so `additional_rules` only add new names; put a
  rule in front (e.g. `[("prompt", "model")] + rules`) to override one.
  """
  common = [("batch", "data"), ("vocab", "model"), ("mlp", "model"), ("heads", "model"),
            ("kv", None), ("joined_kv", "model")]
  embed = {(1, 1): [("embed", None)], (2, 1): [("embed", "model")],
           (1, 2): [("embed", "data")], (2, 2): [("embed", "model"), ("embed", "data")]}
  key = (activation_partitioning_dims, parameter_partitioning_dims)
  if key not in embed:
    raise ValueError(f"activation_partitioning_dims={key[0]}, parameter_partitioning_dims="
                     f"{key[1]}: each must be 1 or 2")
  replicated = [("relpos_buckets", None), ("abspos_buckets", None), ("length", None),
                ("layers", None), ("stack", None), ("mlp_activations", None)]
  return common + embed[key] + replicated + PROMPT_RULES + list(additional_rules or [])


def make_mesh(num_partitions: Optional[int] = None, mesh_shape: Optional[Sequence[int]] = None,
              devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A ("data", "model") mesh: `mesh_shape` = (data, model), or `num_partitions` model-parallel
  devices with the rest data-parallel (default: 1, pure data parallelism)."""
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  divisors = [d for d in range(1, n + 1) if n % d == 0]
  if mesh_shape is None:
    model = num_partitions or 1
    if model < 1 or n % model:
      raise ValueError(f"num_partitions={model} does not divide the {n} devices; set "
                       f"num_partitions (MODEL_PARALLEL in the partitioning gin files) to one of "
                       f"{divisors}")
    mesh_shape = (n // model, model)
  mesh_shape = tuple(int(x) for x in mesh_shape)
  if len(mesh_shape) != 2 or int(np.prod(mesh_shape)) != n:
    raise ValueError(f"mesh_shape {mesh_shape} does not fit the {n} devices: give two sizes "
                     f"(data, model); their product must be {n}, e.g. ({n}, 1)")
  try:
    grid = mesh_utils.create_device_mesh(
        mesh_shape, devices, allow_split_physical_axes=True)
  except Exception:  # no topology information (e.g. simulated CPU devices): plain order
    grid = np.array(devices).reshape(mesh_shape)
  return Mesh(grid, ("data", "model"))


def parse_mesh(text: str) -> tuple[int, int]:
  """'4x2' -> (4, 2)."""
  try:
    data, model = (int(x) for x in text.lower().split("x"))
  except ValueError:
    raise ValueError(f"mesh {text!r}: write it as DATAxMODEL, e.g. 4x2") from None
  return data, model


def _spec(names) -> PartitionSpec:
  return PartitionSpec(*names)


def logical_to_shardings(axes_tree: dict, mesh: Mesh, rules: LogicalRules) -> dict:
  """{path: logical names} tree -> {path: NamedSharding} tree (same nesting)."""
  flat = flatten_dict(axes_tree)
  out = {k: NamedSharding(mesh, nn.logical_to_mesh_axes(names, rules))
         for k, names in flat.items()}
  return unflatten_dict(out)


def param_shardings(model: nn.Module, mesh: Mesh, rules: LogicalRules) -> dict:
  """NamedSharding of every parameter of `model` (PromptedT5 or T5) from its logical axes."""
  return logical_to_shardings(logical_axes(model), mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over "data"; the rest replicated."""
  return NamedSharding(mesh, PartitionSpec("data"))


def opt_state_shardings(opt_state_shapes, params_shardings: dict, params_shapes: dict,
                        mesh: Mesh):
  """Optimizer slots shaped like their parameter share its sharding; the rest are replicated.

  optax states mirror the parameter tree, so a slot's key path ends with its parameter's path.
  Factored Adafactor rows/columns and counters are small and replicated.
  """
  flat_shardings = flatten_dict(params_shardings)
  flat_shapes = {k: tuple(v.shape) for k, v in flatten_dict(params_shapes).items()}

  def choose(key_path, leaf):
    keys = tuple(getattr(k, "key", getattr(k, "name", None)) for k in key_path)
    for start in range(len(keys)):
      path = keys[start:]
      if path in flat_shardings and flat_shapes[path] == tuple(leaf.shape):
        return flat_shardings[path]
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(choose, opt_state_shapes)


@dataclasses.dataclass(frozen=True)
class Partitioner:
  """A mesh and its rules: the shardings of params, state and batches, and context for tracing."""
  mesh: Mesh
  rules: tuple

  @classmethod
  def create(cls, num_partitions: Optional[int] = None,
             mesh_shape: Optional[Sequence[int]] = None, activation_partitioning_dims: int = 1,
             parameter_partitioning_dims: int = 1,
             additional_rules: Optional[LogicalRules] = None, devices=None) -> "Partitioner":
    rules = standard_logical_axis_rules(activation_partitioning_dims,
                                        parameter_partitioning_dims, additional_rules)
    return cls(make_mesh(num_partitions, mesh_shape, devices), tuple(rules))

  def context(self):
    """Mesh + logical rules, so the model's `with_logical_constraint`s apply while tracing."""
    return _Context(self.mesh, self.rules)

  def param_shardings(self, model) -> dict:
    return param_shardings(model, self.mesh, self.rules)

  def partition(self, fn: Callable, in_shardings, out_shardings,
                donate_argnums: Sequence[int] = ()) -> "Partitioned":
    """`fn` jitted for the mesh with these shardings (as t5x's `PjitPartitioner.partition`);
    it is called, and `.lower()`ed, inside `context()`, so the model's logical constraints
    apply while it is traced."""
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                     donate_argnums=tuple(donate_argnums))
    return Partitioned(jitted, self)

  @property
  def replicated(self) -> NamedSharding:
    return replicated(self.mesh)

  @property
  def batch_sharding(self) -> NamedSharding:
    return batch_sharding(self.mesh)

  def place(self, shardings: dict):
    """A `load_t5(place=...)` callable: each array goes straight into its shards, one at a
    time, so a host never holds more than one full parameter besides its own shards."""
    flat = flatten_dict(shardings)
    return lambda path, array: _to_shards(array, flat[tuple(path)])

  def put(self, tree, shardings):
    """Host values (identical on every process) -> global arrays with `shardings`; each
    device receives only its own slice."""
    return jax.tree_util.tree_map(_to_shards, tree, shardings)

  def shard_batch(self, local_batch: dict, global_batch_size: int) -> dict:
    """Global arrays from this process's rows (see `process_rows`); works on one host too."""
    sharding = self.batch_sharding
    out = {}
    for name, local in local_batch.items():
      local = np.asarray(local)
      global_shape = (global_batch_size,) + local.shape[1:]
      out[name] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out

  def process_rows(self, global_batch_size: int) -> slice:
    """The rows of each global batch that this process feeds (it reads only these)."""
    return process_rows(self.batch_sharding, global_batch_size)


def _to_shards(host_value, sharding: NamedSharding) -> jax.Array:
  """A global array from a value every process holds whole: each device copies its slice."""
  x = np.asarray(host_value)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


class Partitioned:
  """A function jitted for a partitioner's mesh: called or lowered under its context."""

  def __init__(self, jitted, partitioner: Partitioner):
    self._jitted, self._partitioner = jitted, partitioner
    functools.update_wrapper(self, jitted)

  def __call__(self, *args):
    with self._partitioner.context():
      return self._jitted(*args)

  def lower(self, *args):
    with self._partitioner.context():
      return self._jitted.lower(*args)


class _Context:
  def __init__(self, mesh, rules):
    self.mesh, self.rules = mesh, rules

  def __enter__(self):
    self._mesh_cm = jax.set_mesh(self.mesh)
    self._mesh_cm.__enter__()
    self._rules_cm = nn.logical_axis_rules(self.rules)
    self._rules_cm.__enter__()
    return self

  def __exit__(self, *exc):
    self._rules_cm.__exit__(*exc)
    self._mesh_cm.__exit__(*exc)


def process_rows(sharding: NamedSharding, global_batch_size: int) -> slice:
  """The contiguous rows of a [global_batch_size, ...] batch held by this process's devices."""
  indices = sharding.addressable_devices_indices_map((global_batch_size,))
  starts = sorted({(idx[0].start or 0) for idx in indices.values()})
  stops = sorted({(idx[0].stop if idx[0].stop is not None else global_batch_size)
                  for idx in indices.values()})
  rows = slice(starts[0], stops[-1])
  covered = sum(b - a for a, b in zip(starts, stops))
  if covered != rows.stop - rows.start:
    raise ValueError(f"this process's batch rows {list(zip(starts, stops))} are not contiguous; "
                     "use a mesh whose data axis is laid out by host")
  return rows


# How long JAX's coordination service waits for a silent process before it declares it dead and
# aborts the others (JAX's default is 100 s; collectives on CPU wait for a dead peer forever).
# The commands also run a `multihost.PeerWatch`, which stops them sooner and names the lost process.
HEARTBEAT_TIMEOUT_S = 60


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None,
                           local_device_ids: Optional[Sequence[int]] = None,
                           cpu_collectives: str = "gloo",
                           heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S,
                           initialization_timeout_s: int = 300) -> bool:
  """`jax.distributed.initialize` from arguments or the environment; returns whether it ran.

  On TPU pods no argument is needed (JAX finds the other hosts). For GPU or CPU clusters
  give the coordinator explicitly, or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
  and JAX_PROCESS_ID. CPU processes talk through gloo collectives. Must run before anything
  asks JAX for its devices. JAX's preemption service is turned off: it would swallow SIGTERM
  in every command, and `train` agrees on a stop step itself (see `preemption`).
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and env.get("JAX_NUM_PROCESSES"):
    num_processes = int(env["JAX_NUM_PROCESSES"])
  if process_id is None and env.get("JAX_PROCESS_ID"):
    process_id = int(env["JAX_PROCESS_ID"])
  on_tpu_pod = bool(env.get("TPU_WORKER_HOSTNAMES") or env.get("MEGASCALE_COORDINATOR_ADDRESS"))
  if coordinator_address is None and not on_tpu_pod:
    return False  # one process: nothing to initialise
  if jax.distributed.is_initialized():
    return True
  if cpu_collectives and jax.config.jax_platforms in (None, "", "cpu"):
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.config.update("jax_enable_preemption_service", False)
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             local_device_ids=local_device_ids,
                             heartbeat_timeout_seconds=heartbeat_timeout_s,
                             initialization_timeout=initialization_timeout_s)
  return True


def is_primary_process() -> bool:
  """Only process 0 writes prompts, logs and metrics."""
  return jax.process_index() == 0
