"""Frozen weights stored in bfloat16 (`frozen_model.frozen_dtype`): half the memory, logits within
bfloat16 rounding of float32, and the prompt and its optimizer state still float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softprompt_jax import optim
from softprompt_jax import train_step as ts
from softprompt_jax.model_spec import frozen_model, load_frozen
from softprompt_jax.pretrained import TINY_MODEL_DIR
from softprompt_jax.prompted_t5 import PromptedT5, make_prompted_params
from softprompt_jax.t5 import T5

PROMPT_LENGTH = 4


def _nbytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))


@pytest.fixture(scope="module")
def loaded():
  """The shipped pretrained tiny T5 (real, trained weights) loaded both ways."""
  f32 = load_frozen(frozen_model(checkpoint=str(TINY_MODEL_DIR)), dropout_rate=0.0)
  bf16 = load_frozen(frozen_model(checkpoint=str(TINY_MODEL_DIR), frozen_dtype="bfloat16"),
                     dropout_rate=0.0)
  return f32, bf16


@pytest.fixture(scope="module")
def batch():
  rng = np.random.RandomState(0)
  return ts.make_batch(rng.randint(3, 250, (4, 24)), rng.randint(3, 250, (4, 6)))


def test_every_frozen_array_is_stored_in_bfloat16_at_half_the_bytes(loaded):
  (_, f32), (_, bf16) = loaded
  dtypes = {x.dtype for x in jax.tree_util.tree_leaves(bf16)}
  assert dtypes == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree_util.tree_leaves(f32)} == {jnp.dtype(jnp.float32)}
  assert _nbytes(bf16) * 2 == _nbytes(f32)
  # The stored values are the float32 ones rounded, not something else.
  for a, b in zip(jax.tree_util.tree_leaves(f32), jax.tree_util.tree_leaves(bf16)):
    np.testing.assert_array_equal(np.asarray(a).astype(jnp.bfloat16), np.asarray(b))


def test_logits_are_within_bfloat16_rounding_of_float32(loaded, batch):
  (config, f32), (_, bf16) = loaded
  model = T5(config)
  run = lambda p: np.asarray(model.apply({"params": p}, batch["encoder_input_tokens"],
                                         batch["decoder_input_tokens"]), np.float64)
  exact, rounded = run(f32), run(bf16)
  # The only difference is the storage rounding: float32 weights rounded to bfloat16 by numpy
  # and widened back give the same logits (the activations stay float32).
  widened = jax.tree_util.tree_map(
      lambda x: np.asarray(x).astype(jnp.bfloat16).astype(np.float32), f32)
  np.testing.assert_allclose(rounded, run(widened), rtol=1e-5, atol=1e-5)
  # Weights rounded to 8 significant bits (relative 2**-9) through 4+4 layers: a few percent
  # of the largest logit at most, and the same argmax nearly everywhere.
  error = np.max(np.abs(exact - rounded)) / np.max(np.abs(exact))
  assert 0 < error < 5e-2, error
  assert np.mean(np.argmax(exact, -1) == np.argmax(rounded, -1)) > 0.9


def test_prompt_and_optimizer_state_stay_float32_and_train(loaded, batch):
  (config, f32), (_, bf16) = loaded
  model = PromptedT5(config, prompt_length=PROMPT_LENGTH)
  losses = {}
  for name, frozen_params in (("float32", f32), ("bfloat16", bf16)):
    params = make_prompted_params(model, frozen_params, jax.random.PRNGKey(0))
    labels = optim.param_labels(params)
    optimizer = optim.masked_optimizer(optim.adafactor(), labels)
    state, frozen = ts.init_train_state(params, labels, optimizer)
    assert {x.dtype for x in jax.tree_util.tree_leaves(frozen)} == {jnp.dtype(name)}
    for leaf in jax.tree_util.tree_leaves((state.trainable, state.opt_state)):
      assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
    train, _ = ts.jit_steps(model, optimizer)
    before = np.asarray(state.trainable["prompt"]["prompt"])
    state, metrics = train(state, frozen, batch, jax.random.PRNGKey(1))
    after = state.trainable["prompt"]["prompt"]
    assert after.dtype == jnp.float32 and not np.array_equal(before, np.asarray(after))
    losses[name] = float(metrics["loss"])
  assert abs(losses["bfloat16"] - losses["float32"]) < 2e-2 * abs(losses["float32"]), losses


def test_model_tuning_keeps_trainable_weights_float32(loaded):
  (config, _), (_, bf16) = loaded
  model = PromptedT5(config, prompt_length=PROMPT_LENGTH)
  params = make_prompted_params(model, bf16, jax.random.PRNGKey(0))
  labels = optim.param_labels(params, (".*",))
  state, frozen = ts.init_train_state(params, labels, optim.masked_optimizer(optim.adam(), labels))
  assert not jax.tree_util.tree_leaves(frozen)
  assert {x.dtype for x in jax.tree_util.tree_leaves(state.trainable)} == {jnp.dtype("float32")}


def test_random_init_is_stored_in_the_frozen_dtype():
  spec = frozen_model(family="byt5", size="tiny", frozen_dtype="bfloat16",
                      overrides={"vocab_size": 384, "emb_dim": 32, "mlp_dim": 64})
  _, params = load_frozen(spec)
  assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}


def test_an_unknown_frozen_dtype_is_refused_by_name():
  with pytest.raises(ValueError, match="frozen_dtype='int8'"):
    load_frozen(frozen_model(family="byt5", size="tiny", frozen_dtype="int8"))
