"""optim: path-regex labels, the masked optimizer, split/merge, and Adafactor as the paper ran it
(checked against a NumPy transcription of the algorithm)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict

from softprompt_jax import optim

PROMPT_SHAPE = (4, 6)  # [P, H]; Adafactor factors only when two dims are >= 128, as for [100, H]


def _params():
  rng = np.random.RandomState(0)
  leaf = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return {"prompt": {"prompt": leaf(*PROMPT_SHAPE)},
          "token_embedder": {"embedding": leaf(10, 6)},
          "encoder": {"layers_0": {"attention": {"query": {"kernel": leaf(6, 5)}}},
                      "encoder_norm": {"scale": leaf(6)}}}


def _trainable_paths(labels):
  return {k for k, v in flatten_dict(labels, sep="/").items() if v == optim.TRAINABLE}


def test_labels_fullmatch_paths():
  params = _params()
  assert _trainable_paths(optim.param_labels(params)) == {"prompt/prompt"}
  assert _trainable_paths(optim.param_labels(params, optim.MODEL_TUNING)) == set(
      flatten_dict(params, sep="/"))
  assert _trainable_paths(optim.param_labels(params, ["encoder/.*", "prompt/prompt"])) == {
      "encoder/layers_0/attention/query/kernel", "encoder/encoder_norm/scale", "prompt/prompt"}
  # A single string is one pattern, not a sequence of one-character patterns.
  assert _trainable_paths(optim.param_labels(params, ".*/scale")) == {
      "encoder/encoder_norm/scale"}
  labels = flatten_dict(optim.param_labels(params), sep="/")
  assert set(labels) == set(flatten_dict(params, sep="/"))
  assert set(labels.values()) == {optim.TRAINABLE, optim.FROZEN}


@pytest.mark.parametrize("pattern", ["prompt", "encoder/layers_0", "ncoder/.*", "token_embedder"])
def test_a_pattern_matching_only_part_of_a_path_labels_nothing(pattern):
  # re.search or re.match would accept these; t5x's rules (and ours) need the whole path.
  with pytest.raises(ValueError, match="no parameter path matches"):
    optim.param_labels(_params(), [pattern])


def test_a_bad_regex_is_a_value_error():
  with pytest.raises(ValueError, match="not a valid regex"):
    optim.param_labels(_params(), ["prompt/(prompt"])


def test_split_and_merge_round_trip():
  params = _params()
  labels = optim.param_labels(params, ["prompt/prompt", ".*/scale"])
  trainable, frozen = optim.split_trainable(params, labels)
  flat_t, flat_f = flatten_dict(trainable, sep="/"), flatten_dict(frozen, sep="/")
  assert set(flat_t) == {"prompt/prompt", "encoder/encoder_norm/scale"}
  assert not set(flat_t) & set(flat_f)
  merged = optim.merge(trainable, frozen)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  # The very same arrays come back: nothing is copied.
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
    assert a is b


def test_masked_optimizer_moves_only_trainable_leaves_and_keeps_no_frozen_state():
  params = _params()
  labels = optim.param_labels(params)
  grads = jax.tree.map(jnp.ones_like, params)
  tx = optim.masked_optimizer(optax.adam(0.1), labels)
  state = tx.init(params)
  for _ in range(2):
    updates, state = tx.update(grads, state, params)
  flat = flatten_dict(updates, sep="/")
  for path, update in flat.items():
    if path != "prompt/prompt":
      np.testing.assert_array_equal(np.asarray(update), 0.0)
  # The prompt's update is plain Adam's on the prompt alone.
  plain = optax.adam(0.1)
  prompt = params["prompt"]["prompt"]
  plain_state = plain.init(prompt)
  for _ in range(2):
    expected, plain_state = plain.update(jnp.ones_like(prompt), plain_state, prompt)
  np.testing.assert_allclose(np.asarray(flat["prompt/prompt"]), np.asarray(expected), rtol=1e-6)
  # State: Adam's two slots for the prompt, step counters, nothing shaped like a frozen weight.
  arrays = [x for x in jax.tree.leaves(state) if hasattr(x, "shape")]
  assert sum(x.size for x in arrays if x.ndim > 0) == 2 * prompt.size
  assert all(x.shape in ((), PROMPT_SHAPE) for x in arrays)


def _adafactor_numpy(param, grads, lr, decay_rate, wd, clip, eps=1e-30):
  """Unfactored Adafactor (Shazeer & Stern 2018, as t5x runs it), step by step, in float64."""
  p, v = np.asarray(param, np.float64), np.zeros(param.shape)
  for step, g in enumerate(grads):
    g = np.asarray(g, np.float64)
    beta2 = 1.0 - (step + 1.0) ** -decay_rate
    v = beta2 * v + (1.0 - beta2) * (g * g + eps)
    u = g / np.sqrt(v)
    u = u / max(1.0, np.sqrt(np.mean(u * u)) / clip)
    p = (1.0 - wd) * p - lr * u
  return p


def _run(tx, param, grads):
  state = tx.init(param)
  for g in grads:
    updates, state = tx.update(g, state, param)
    param = optax.apply_updates(param, updates)
  return param


def test_adafactor_is_the_papers_and_matches_the_algorithm():
  rng = np.random.RandomState(1)
  param = jnp.asarray(rng.uniform(-0.5, 0.5, PROMPT_SHAPE), jnp.float32)
  # Later gradients of other scales, so the decaying average and the clipping both matter.
  grads = [jnp.asarray(rng.normal(size=PROMPT_SHAPE) * s, jnp.float32) for s in (1e-2, 1.0, 3e-3)]
  ours = _run(optim.adafactor(), param, grads)
  direct = _run(optax.adafactor(learning_rate=0.3, decay_rate=0.8, weight_decay_rate=1e-5,
                                clipping_threshold=1.0, multiply_by_parameter_scale=False),
                param, grads)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(direct))
  expected = _adafactor_numpy(param, grads, lr=0.3, decay_rate=0.8, wd=1e-5, clip=1.0)
  np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5, atol=1e-6)


def test_adafactor_weight_decay_is_not_scaled_by_the_learning_rate():
  """(1 - wd) * p - lr * u: decoupled from lr (t5x), so it is visible at a tiny lr."""
  rng = np.random.RandomState(2)
  param = jnp.asarray(rng.uniform(-0.5, 0.5, PROMPT_SHAPE), jnp.float32)
  grad = [jnp.asarray(rng.normal(size=PROMPT_SHAPE), jnp.float32)]
  lr, wd = 1e-3, 0.1
  decayed = _run(optim.adafactor(learning_rate=lr, weight_decay_rate=wd), param, grad)
  plain = _run(optim.adafactor(learning_rate=lr, weight_decay_rate=None), param, grad)
  lr_times_u = np.asarray(param) - np.asarray(plain)
  np.testing.assert_allclose(np.asarray(decayed), (1 - wd) * np.asarray(param) - lr_times_u,
                             rtol=1e-6, atol=1e-7)


def test_adam_with_weight_decay_is_adamw():
  rng = np.random.RandomState(3)
  param = jnp.asarray(rng.normal(size=PROMPT_SHAPE), jnp.float32)
  grads = [jnp.asarray(rng.normal(size=PROMPT_SHAPE), jnp.float32) for _ in range(2)]
  np.testing.assert_array_equal(
      np.asarray(_run(optim.adam(1e-2, weight_decay=0.1), param, grads)),
      np.asarray(_run(optax.adamw(1e-2, weight_decay=0.1), param, grads)))
  np.testing.assert_array_equal(np.asarray(_run(optim.adam(1e-2), param, grads)),
                                np.asarray(_run(optax.adam(1e-2), param, grads)))


def test_the_learning_rate_of_an_optimizer_made_here_is_known_for_the_log():
  masked = optim.masked_optimizer(optim.adafactor(learning_rate=0.25), {"a": optim.TRAINABLE})
  assert optim.learning_rate_of(masked) == 0.25
  assert optim.learning_rate_of(optim.adam(learning_rate=1e-3)) == 1e-3
  assert optim.learning_rate_of(optax.sgd(0.1)) is None  # made elsewhere: not guessed
