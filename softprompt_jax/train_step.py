"""The jitted train and eval steps: loss, gradient of the trainable subtree only, optax update.

State that changes during training (`TrainState`: step, trainable params, optimizer state) is kept
apart from the frozen params, which are an input of every step and never an output: nothing of
the frozen model is copied, differentiated or donated. `jit_steps` compiles the steps for one
device, `sharded_steps` for a partitioner's mesh.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.typing import ArrayLike

from softprompt_jax import losses, optim, partitioning
from softprompt_jax.errors import NumericalError
from softprompt_jax.t5 import shift_right

Batch = dict[str, jax.Array]
ENCODER_KWARGS = ("prompt_ids",)
FINITE_TRAINABLE = "trainable_finite"  # a train-step metric: no NaN/Inf in the updated params


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: optimizer steps taken
  trainable: dict          # the trainable subtree (float32), e.g. {"prompt": {"prompt": [P, H]}}
  opt_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class LossConfig:
  z_loss: float = 1e-4
  label_smoothing: float = 0.0
  normalizer: losses.Normalizer = "num_real_target_tokens"
  # The method's extra term of the params, (trainable, frozen) -> (scalar, metrics) or None
  # (methods.Method.regularizer): added to the training loss, logged beside it.
  regularizer: Optional[Callable] = None


def init_train_state(params: dict, labels: dict, optimizer: optax.GradientTransformation
                     ) -> tuple[TrainState, dict]:
  """(TrainState, frozen params). The optimizer sees the whole tree: its state holds slots only
  for trainable leaves (set_to_zero, for frozen ones, is stateless).

  Trainable leaves and their optimizer slots are float32 whatever dtype the frozen weights are
  stored in (`frozen_model.frozen_dtype`): updates of 0.3 x a small gradient vanish in bfloat16.
  """
  trainable, frozen = optim.split_trainable(params, labels)
  # The step donates the state's buffers; copy (in float32) so the caller's `params` stay valid.
  trainable = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32).copy(), trainable)
  opt_state = optimizer.init(optim.merge(trainable, frozen))
  return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=opt_state), frozen


def _logits(model: nn.Module, params: dict, batch: Batch, rng: Optional[jax.Array],
            enable_dropout: bool) -> jax.Array:
  encoder_kwargs = {k: batch[k] for k in ENCODER_KWARGS if k in batch}
  return model.apply({"params": params}, batch["encoder_input_tokens"],
                     batch["decoder_input_tokens"], batch.get("decoder_target_tokens"),
                     enable_dropout=enable_dropout, rngs={"dropout": rng} if enable_dropout else {},
                     **encoder_kwargs)


def loss_fn(trainable: dict, frozen: dict, batch: Batch, rng: Optional[jax.Array], *,
            model: nn.Module, loss_config: LossConfig,
            enable_dropout: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(scalar loss, diagnostics) of the merged params on `batch`; jax.grad takes `trainable`."""
  logits = _logits(model, optim.merge(trainable, frozen), batch, rng, enable_dropout)
  loss, aux = losses.t5x_loss(logits, batch["decoder_target_tokens"], z_loss=loss_config.z_loss,
                              label_smoothing=loss_config.label_smoothing,
                              normalizer=loss_config.normalizer)
  extra = loss_config.regularizer(trainable, frozen) if loss_config.regularizer else None
  if extra is not None:
    term, extra_metrics = extra
    loss, aux = loss + term, {**aux, **extra_metrics}
  return loss, aux


def train_step(state: TrainState, frozen: dict, batch: Batch, rng: jax.Array, *,
               model: nn.Module, optimizer: optax.GradientTransformation,
               loss_config: LossConfig = LossConfig()) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step; returns (new state, metrics). Dropout is on (the model's rate)."""
  step_rng = jax.random.fold_in(rng, state.step)
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, model=model, loss_config=loss_config,
                                                 enable_dropout=True), has_aux=True)
  (loss, aux), grads = grad_fn(state.trainable, frozen, batch, step_rng)
  # The optimizer runs over the whole tree so its labels decide what moves; the frozen part of
  # this gradient is zeros whose updates are discarded, which XLA removes entirely.
  full_grads = optim.merge(grads, jax.tree_util.tree_map(jnp.zeros_like, frozen))
  updates, opt_state = optimizer.update(full_grads, state.opt_state,
                                        optim.merge(state.trainable, frozen))
  trainable_updates, _ = optim.split_trainable(updates, _labels_like(state.trainable, updates))
  trainable = optax.apply_updates(state.trainable, trainable_updates)
  metrics = {"loss": loss, **aux, "grad_norm": optax.tree.norm(grads)}
  # Checked by the training loop before it logs or checkpoints (check_finite).
  metrics[FINITE_TRAINABLE] = jnp.all(jnp.stack(
      [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(trainable)]))
  return TrainState(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics


def _labels_like(trainable: dict, full_tree: dict) -> dict:
  """Labels marking exactly the paths of `trainable` inside `full_tree`."""
  keep = set(flatten_dict(trainable))
  return unflatten_dict({k: optim.TRAINABLE if k in keep else optim.FROZEN
                         for k in flatten_dict(full_tree)})


def eval_step(state: TrainState, frozen: dict, batch: Batch, *, model: nn.Module,
              loss_config: LossConfig = LossConfig()) -> dict[str, jax.Array]:
  """Loss and token accuracy without dropout; sums, so hosts and batches aggregate exactly."""
  logits = _logits(model, optim.merge(state.trainable, frozen), batch, None, False)
  targets = batch["decoder_target_tokens"]
  loss, aux = losses.t5x_loss(logits, targets, z_loss=loss_config.z_loss,
                              label_smoothing=loss_config.label_smoothing,
                              normalizer="sum")
  weights = (targets > 0).astype(jnp.float32)
  correct = jnp.sum((jnp.argmax(logits, -1) == targets) * weights)
  return {"loss_sum": loss, "cross_entropy_sum": aux["cross_entropy"],
          "num_tokens": aux["num_tokens"], "correct_tokens": correct}


def _bound_steps(model, optimizer: optax.GradientTransformation,
                 loss_config: LossConfig) -> tuple[Callable, Callable]:
  """(train_step, eval_step) with the model, optimizer and loss settings bound."""
  train = functools.partial(train_step, model=model, optimizer=optimizer,
                            loss_config=loss_config)
  evaluate = functools.partial(eval_step, model=model, loss_config=loss_config)
  return train, evaluate


def jit_steps(model, optimizer: optax.GradientTransformation,
              loss_config: LossConfig = LossConfig()) -> tuple[Callable, Callable]:
  """(train_step, eval_step) jitted for one device; the TrainState buffers are donated to the
  new state. `sharded_steps` compiles the same steps for a mesh."""
  train, evaluate = _bound_steps(model, optimizer, loss_config)
  return jax.jit(train, donate_argnums=(0,)), jax.jit(evaluate)


def sharded_steps(model, optimizer: optax.GradientTransformation,
                  partitioner: partitioning.Partitioner, state_shapes: TrainState,
                  frozen_shapes: dict, loss_config: Optional[LossConfig] = None
                  ) -> tuple[Callable, Callable, dict]:
  """(train_step, eval_step, shardings) compiled for `partitioner`'s mesh: shardings from the
  model's logical axes, the TrainState donated, the model's activation constraints active.
  `shardings` holds those of the "state", the "frozen" params and a "batch"."""
  loss_config = loss_config or LossConfig()
  all_shardings = partitioner.param_shardings(model)
  flat_all = flatten_dict(all_shardings)
  pick = lambda tree: unflatten_dict({k: flat_all[k] for k in flatten_dict(tree)})
  frozen_shardings = pick(frozen_shapes)
  full_shapes = unflatten_dict({**flatten_dict(frozen_shapes),
                                **flatten_dict(state_shapes.trainable)})
  replicated = partitioner.replicated
  state_shardings = TrainState(
      step=replicated, trainable=pick(state_shapes.trainable),
      opt_state=partitioning.opt_state_shardings(state_shapes.opt_state, all_shardings,
                                                 full_shapes, partitioner.mesh))
  batch_sharding = partitioner.batch_sharding
  train, evaluate = _bound_steps(model, optimizer, loss_config)
  train_sharded = partitioner.partition(
      train, in_shardings=(state_shardings, frozen_shardings, batch_sharding, replicated),
      out_shardings=(state_shardings, replicated), donate_argnums=(0,))
  eval_sharded = partitioner.partition(
      evaluate, in_shardings=(state_shardings, frozen_shardings, batch_sharding),
      out_shardings=replicated)
  shardings = {"state": state_shardings, "frozen": frozen_shardings, "batch": batch_sharding}
  return train_sharded, eval_sharded, shardings


def make_batch(encoder_input_tokens: ArrayLike, target_tokens: ArrayLike,
               prompt_ids: Optional[ArrayLike] = None) -> Batch:
  """A t5x-style batch from inputs [B, T], targets [B, S] and optional prompt ids [B]: decoder
  inputs are the targets shifted right, starting with 0. Names are the batch's keys."""
  targets_BxS = jnp.asarray(target_tokens, jnp.int32)
  batch = {"encoder_input_tokens": jnp.asarray(encoder_input_tokens, jnp.int32),
           "decoder_input_tokens": shift_right(targets_BxS), "decoder_target_tokens": targets_BxS}
  if prompt_ids is not None:
    batch["prompt_ids"] = jnp.asarray(prompt_ids, jnp.int32)
  return batch


def check_finite(recent: list[tuple[int, dict]]) -> None:
  """NumericalError naming the first step (of those not yet checked) whose loss or updated
  trainable params hold NaN or Inf. The loop keeps each step's metrics (device values, so steps
  are not made to wait) and checks them before it logs or checkpoints: no checkpoint ever holds
  a NaN or Inf, and the error names the step where it began."""
  for step, metrics in recent:
    if not np.isfinite(float(metrics["loss"])):
      raise NumericalError(f"step {step}: the loss is {float(metrics['loss'])}; training "
                           "stopped, the last good checkpoint is kept (lower the learning rate, "
                           "or check the data)")
    if not bool(metrics[FINITE_TRAINABLE]):
      raise NumericalError(f"step {step}: the trained parameters (the prompt) hold NaN or Inf; "
                           "training stopped, the last good checkpoint is kept (lower the "
                           "learning rate)")
  recent.clear()
