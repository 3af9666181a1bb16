"""train_step: the prompt's gradient against a plainly written loss (and finite differences),
a frozen subtree that is neither changed nor donated nor returned, lr = 0, eval sums."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict

import softprompt_jax as sj
from softprompt_jax import optim
from softprompt_jax import train_step as ts
from softprompt_jax.prompted_t5 import PromptedT5, make_prompted_params
from softprompt_jax.t5 import shift_right

# No dropout: the train step (dropout on) and the oracles compute the same function.
CONFIG = sj.tiny_config(dropout_rate=0.0)
MODEL = PromptedT5(CONFIG, prompt_length=3)


@pytest.fixture(scope="module")
def params():
  t5_params = jax.jit(lambda rng: sj.init_params(sj.T5(CONFIG), rng)[0])(jax.random.PRNGKey(0))
  return make_prompted_params(MODEL, t5_params, jax.random.PRNGKey(1))


@pytest.fixture(scope="module")
def batch():
  rng = np.random.RandomState(0)
  enc = rng.randint(2, CONFIG.vocab_size, (3, 6))
  enc[1, 4:] = 0
  targets = rng.randint(2, CONFIG.vocab_size, (3, 4))
  targets[0, 2:] = 0
  return ts.make_batch(enc, targets)


def _plain_loss(prompt_PxH, params, batch):
  """Mean over real target tokens of -log p(target) + 1e-4 * logsumexp(logits)^2."""
  full = {**params, "prompt": {"prompt": prompt_PxH}}
  logits = MODEL.apply({"params": full}, batch["encoder_input_tokens"],
                       batch["decoder_input_tokens"], batch["decoder_target_tokens"])
  targets = batch["decoder_target_tokens"]
  log_z = jax.nn.logsumexp(logits, axis=-1)
  nll = log_z - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  real = (targets > 0).astype(jnp.float32)
  return jnp.sum((nll + 1e-4 * log_z ** 2) * real) / jnp.sum(real)


def _copy(tree):
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def test_make_batch_and_shift_right(batch):
  targets = np.asarray(batch["decoder_target_tokens"])
  expected = np.concatenate([np.zeros((3, 1), np.int32), targets[:, :-1]], axis=1)
  np.testing.assert_array_equal(np.asarray(batch["decoder_input_tokens"]), expected)
  host = shift_right(targets)  # the data pipeline's form: NumPy in, NumPy out
  assert isinstance(host, np.ndarray) and host.dtype == np.int32
  np.testing.assert_array_equal(host, expected)
  np.testing.assert_array_equal(np.asarray(jax.jit(shift_right)(jnp.asarray(targets))), expected)


def test_step_moves_the_prompt_by_the_gradient_of_the_plain_loss(params, batch):
  """SGD with lr 1: the prompt moves by exactly minus the gradient, which must equal jax.grad of
  the loss written out above, and (along one direction) a central finite difference."""
  labels = optim.param_labels(params)
  state, frozen = ts.init_train_state(params, labels, optim.masked_optimizer(optax.sgd(1.0),
                                                                             labels))
  prompt = np.asarray(params["prompt"]["prompt"])
  train, _ = ts.jit_steps(MODEL, optim.masked_optimizer(optax.sgd(1.0), labels))
  new_state, metrics = train(state, frozen, batch, jax.random.PRNGKey(0))
  step_grad = prompt - np.asarray(new_state.trainable["prompt"]["prompt"])

  loss, grad = jax.jit(jax.value_and_grad(_plain_loss))(jnp.asarray(prompt), params, batch)
  grad = np.asarray(grad)
  np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
  # atol: the rounding of prompt - grad in float32 (~1e-7 here), far below the gradient.
  np.testing.assert_allclose(step_grad, grad, rtol=1e-3, atol=1e-5 * np.abs(grad).max())
  np.testing.assert_allclose(float(metrics["grad_norm"]), np.linalg.norm(grad), rtol=1e-5)

  direction = np.random.RandomState(1).normal(size=prompt.shape).astype(np.float32)
  direction /= np.linalg.norm(direction)
  eps = 1e-2
  f = jax.jit(_plain_loss)
  fd = (float(f(jnp.asarray(prompt + eps * direction), params, batch))
        - float(f(jnp.asarray(prompt - eps * direction), params, batch))) / (2 * eps)
  np.testing.assert_allclose(fd, float(np.sum(grad * direction)), rtol=2e-2)


def test_frozen_params_are_untouched_not_donated_not_returned(params, batch):
  labels = optim.param_labels(params)
  optimizer = optim.masked_optimizer(optax.adafactor(learning_rate=0.0, weight_decay_rate=None),
                                     labels)
  state, frozen = ts.init_train_state(params, labels, optimizer)
  frozen_before, prompt_before = _copy(frozen), _copy(state.trainable)
  old_prompt = state.trainable["prompt"]["prompt"]
  train, _ = ts.jit_steps(MODEL, optimizer)
  # Donation as compiled: every state buffer, no frozen one (an unusable donation would not show
  # as a deleted buffer, so ask the lowering).
  (state_info, frozen_info, *_), _ = train.lower(state, frozen, batch,
                                                 jax.random.PRNGKey(0)).args_info
  assert all(info.donated for info in jax.tree.leaves(state_info))
  assert not any(info.donated for info in jax.tree.leaves(frozen_info))
  new_state, metrics = train(state, frozen, batch, jax.random.PRNGKey(0))

  assert old_prompt.is_deleted()
  for leaf, before in zip(jax.tree.leaves(frozen), jax.tree.leaves(frozen_before)):
    assert not leaf.is_deleted()
    np.testing.assert_array_equal(np.asarray(leaf), before)
  # Only the prompt (and its optimizer slots) come back: no copy of the frozen model.
  assert set(flatten_dict(new_state.trainable, sep="/")) == {"prompt/prompt"}
  out_bytes = sum(x.nbytes for x in jax.tree.leaves((new_state, metrics)))
  frozen_bytes = sum(x.nbytes for x in jax.tree.leaves(frozen))
  assert out_bytes < frozen_bytes / 20
  # lr = 0 (and no weight decay): the prompt does not move, bit for bit; the step counts.
  np.testing.assert_array_equal(np.asarray(new_state.trainable["prompt"]["prompt"]),
                                prompt_before["prompt"]["prompt"])
  assert int(new_state.step) == 1 and bool(metrics[ts.FINITE_TRAINABLE])
  # The frozen params feed the next step unchanged.
  newer_state, _ = train(new_state, frozen, batch, jax.random.PRNGKey(0))
  assert int(newer_state.step) == 2


def test_paper_adafactor_step_moves_only_the_prompt(params, batch):
  labels = optim.param_labels(params)
  optimizer = optim.masked_optimizer(optim.adafactor(), labels)
  state, frozen = ts.init_train_state(params, labels, optimizer)
  prompt = np.asarray(params["prompt"]["prompt"])
  train, _ = ts.jit_steps(MODEL, optimizer)
  new_state, _ = train(state, frozen, batch, jax.random.PRNGKey(0))
  moved = np.abs(np.asarray(new_state.trainable["prompt"]["prompt"]) - prompt)
  assert moved.min() > 0.1  # lr 0.3 x a unit-rms update: every entry moves
  # The caller's params stay valid (init_train_state copied them before donation).
  np.testing.assert_array_equal(np.asarray(params["prompt"]["prompt"]), prompt)


def test_eval_sums_agree_with_loss_fn(params, batch):
  labels = optim.param_labels(params)
  state, frozen = ts.init_train_state(params, labels, optim.masked_optimizer(optax.sgd(1.0),
                                                                             labels))
  config = ts.LossConfig(label_smoothing=0.1)
  sums = jax.jit(lambda s, f, b: ts.eval_step(s, f, b, model=MODEL, loss_config=config))(
      state, frozen, batch)
  loss, aux = ts.loss_fn(state.trainable, frozen, batch, None, model=MODEL, loss_config=config,
                         enable_dropout=False)
  targets = np.asarray(batch["decoder_target_tokens"])
  num_tokens = int((targets > 0).sum())
  assert float(sums["num_tokens"]) == num_tokens
  np.testing.assert_allclose(float(sums["loss_sum"]) / num_tokens, float(loss), rtol=1e-5)
  np.testing.assert_allclose(float(sums["cross_entropy_sum"]) / num_tokens,
                             float(aux["cross_entropy"]), rtol=1e-5)
  logits = MODEL.apply({"params": params}, batch["encoder_input_tokens"],
                       batch["decoder_input_tokens"], batch["decoder_target_tokens"])
  correct = ((np.asarray(logits).argmax(-1) == targets) & (targets > 0)).sum()
  assert float(sums["correct_tokens"]) == correct
