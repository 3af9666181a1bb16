"""PromptedT5: the T5 tree plus one prompt leaf; only the prompt learns; banks mix tasks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import softprompt_jax as sj
from softprompt_jax import optim, prompts
from softprompt_jax import train_step as ts
from softprompt_jax.prompted_t5 import PromptedT5, append, make_prompted_params, prepend

CONFIG = sj.tiny_config()
PROMPT_LENGTH = 4


@pytest.fixture(scope="module")
def t5_params():
  return sj.init_params(sj.T5(CONFIG), jax.random.PRNGKey(0))[0]


def _batch(seed, batch=4, input_len=10, target_len=3):
  rng = np.random.RandomState(seed)
  enc = rng.randint(2, CONFIG.vocab_size, (batch, input_len))
  enc[0, 6:] = 0
  return ts.make_batch(enc, rng.randint(2, CONFIG.vocab_size, (batch, target_len)))


def test_tree_is_t5_tree_plus_one_prompt_leaf(t5_params):
  model = PromptedT5(CONFIG, prompt_length=PROMPT_LENGTH)
  variables = model.init(jax.random.PRNGKey(1), jnp.ones((1, 6), jnp.int32),
                         jnp.ones((1, 2), jnp.int32))
  ours = flatten_dict(variables["params"], sep="/")
  t5 = flatten_dict(t5_params, sep="/")
  extra = set(ours) - set(t5)
  assert set(t5) <= set(ours) and len(extra) == 1
  (prompt_path,) = extra
  assert "prompt" in prompt_path
  assert ours[prompt_path].shape == (PROMPT_LENGTH, CONFIG.emb_dim)
  assert all(ours[k].shape == t5[k].shape for k in t5)
  axes = flatten_dict(sj.logical_axes(model), sep="/")
  assert axes[prompt_path] == ("prompt", "prompt_embed")


def test_prompt_is_seen_and_a_zero_length_effect_is_not_faked(t5_params):
  model = PromptedT5(CONFIG, prompt_length=PROMPT_LENGTH)
  batch = _batch(0)
  a = make_prompted_params(model, t5_params, jax.random.PRNGKey(1))
  b = make_prompted_params(model, t5_params, jax.random.PRNGKey(2))
  logits_a = model.apply({"params": a}, batch["encoder_input_tokens"],
                         batch["decoder_input_tokens"])
  logits_b = model.apply({"params": b}, batch["encoder_input_tokens"],
                         batch["decoder_input_tokens"])
  assert logits_a.shape == (4, 3, CONFIG.vocab_size)
  assert float(jnp.abs(logits_a - logits_b).max()) > 1e-3


def test_prompted_equals_t5_fed_the_prompt_embeddings(t5_params):
  """Prepending equals running T5's encoder on [prompt; embedded tokens] with the prompt visible."""
  model = PromptedT5(CONFIG, prompt_length=PROMPT_LENGTH)
  params = make_prompted_params(model, t5_params, jax.random.PRNGKey(3))
  batch = _batch(1)
  ours = model.apply({"params": params}, batch["encoder_input_tokens"],
                     batch["decoder_input_tokens"])
  t5 = sj.T5(CONFIG)
  tokens = batch["encoder_input_tokens"]
  embedded = t5.apply({"params": t5_params}, tokens, method=lambda m, t: m.token_embedder(t))
  x, valid = prepend(embedded, tokens > 0,
                     jnp.broadcast_to(params["prompt"]["prompt"], (4, PROMPT_LENGTH, 16)))
  encoded = t5.apply({"params": t5_params}, x, valid,
                     method=lambda m, x, v: m.encoder(x, v, deterministic=True))
  ref = t5.apply({"params": t5_params}, encoded, valid, batch["decoder_input_tokens"],
                 method=T5_decode)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-6)


def T5_decode(m, encoded, valid, dec):
  return m.decode(encoded, valid, dec)


def test_append_places_prompt_after_real_tokens():
  x = jnp.arange(2 * 5, dtype=jnp.float32).reshape(2, 5, 1) + 1
  valid = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  prompt = -jnp.ones((2, 2, 1))
  joined, joined_valid = append(x, valid, prompt)
  np.testing.assert_array_equal(np.asarray(joined[0, :, 0]), [1, 2, 3, -1, -1, 4, 5])
  np.testing.assert_array_equal(np.asarray(joined_valid[0]), [1, 1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(np.asarray(joined[1, :, 0]), [6, 7, 8, 9, 10, -1, -1])


@pytest.mark.parametrize("placement", ["prepend", "append"])
def test_extra_padding_changes_nothing(t5_params, placement):
  model = PromptedT5(CONFIG, prompt_length=PROMPT_LENGTH, placement=placement)
  params = make_prompted_params(model, t5_params, jax.random.PRNGKey(4))
  batch = _batch(2)
  padded = jnp.pad(batch["encoder_input_tokens"], ((0, 0), (0, 5)))
  a = model.apply({"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"])
  b = model.apply({"params": params}, padded, batch["decoder_input_tokens"])
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.parametrize("base", ["adafactor", "adam"])
def test_only_the_prompt_learns(t5_params, base):
  model = PromptedT5(CONFIG, prompt_length=PROMPT_LENGTH)
  params = make_prompted_params(model, t5_params, jax.random.PRNGKey(5))
  labels = optim.param_labels(params)
  tx = optim.adafactor() if base == "adafactor" else optim.adam(1e-2)
  optimizer = optim.masked_optimizer(tx, labels)
  state, frozen = ts.init_train_state(params, labels, optimizer)
  frozen_before = jax.tree_util.tree_map(lambda x: np.asarray(x).copy(), frozen)
  prompt_before = np.asarray(state.trainable["prompt"]["prompt"]).copy()
  train, _ = ts.jit_steps(model, optimizer)
  batch = _batch(3)
  losses = []
  for _ in range(4):
    state, metrics = train(state, frozen, batch, jax.random.PRNGKey(6))
    losses.append(float(metrics["loss"]))
  assert int(state.step) == 4 and all(np.isfinite(losses))
  for path, before in flatten_dict(frozen_before, sep="/").items():
    after = np.asarray(flatten_dict(frozen, sep="/")[path])
    assert after.tobytes() == before.tobytes(), f"frozen {path} changed"
  assert not np.array_equal(np.asarray(state.trainable["prompt"]["prompt"]), prompt_before)
  assert set(flatten_dict(state.trainable, sep="/")) == {"prompt/prompt"}
  frozen_shapes = {tuple(x.shape) for x in jax.tree_util.tree_leaves(frozen)}
  prompt_shape = (PROMPT_LENGTH, CONFIG.emb_dim)
  slot_shapes = {tuple(x.shape) for x in jax.tree_util.tree_leaves(state.opt_state)}
  assert not (slot_shapes & (frozen_shapes - {prompt_shape, (), (1,)})), slot_shapes
  slot_bytes = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state))
  assert slot_bytes <= 3 * np.prod(prompt_shape) + 8


def test_model_tuning_regex_updates_everything(t5_params):
  """The same code with `.*` is the model-tuning baseline."""
  model = PromptedT5(CONFIG, prompt_length=PROMPT_LENGTH)
  params = make_prompted_params(model, t5_params, jax.random.PRNGKey(5))
  labels = optim.param_labels(params, optim.MODEL_TUNING)
  optimizer = optim.masked_optimizer(optim.adam(1e-2), labels)
  state, frozen = ts.init_train_state(params, labels, optimizer)
  assert frozen == {}
  before = flatten_dict(jax.tree_util.tree_map(np.asarray, state.trainable), sep="/")
  train, _ = ts.jit_steps(model, optimizer)
  state, _ = train(state, frozen, _batch(4), jax.random.PRNGKey(0))
  after = flatten_dict(state.trainable, sep="/")
  changed = [p for p in before if not np.array_equal(before[p], np.asarray(after[p]))]
  assert len(changed) == len(before)


def test_partial_variant_prompt_plus_layer_norms(t5_params):
  model = PromptedT5(CONFIG, prompt_length=PROMPT_LENGTH)
  params = make_prompted_params(model, t5_params, jax.random.PRNGKey(5))
  labels = flatten_dict(optim.param_labels(params, (".*prompt.*", ".*layer_norm.*")), sep="/")
  trainable = sorted(p for p, label in labels.items() if label == optim.TRAINABLE)
  assert "prompt/prompt" in trainable
  assert all(p == "prompt/prompt" or "layer_norm/scale" in p for p in trainable)
  assert len(trainable) == 1 + 2 * CONFIG.num_encoder_layers + 3 * CONFIG.num_decoder_layers


def test_unmatched_regex_is_an_error(t5_params):
  with pytest.raises(ValueError, match="no parameter path matches"):
    optim.param_labels(t5_params, (".*prompt.*",))


def test_mixed_task_batch_equals_each_task_alone(t5_params):
  bank = PromptedT5(CONFIG, prompt_length=PROMPT_LENGTH, num_prompts=3)
  params = make_prompted_params(bank, t5_params, jax.random.PRNGKey(7))
  batch = _batch(5, batch=6)
  ids = jnp.array([2, 0, 1, 2, 0, 1])
  # Jitted (op by op, the tiny model takes seconds a call).
  mixed = jax.jit(bank.apply)({"params": params}, batch["encoder_input_tokens"],
                              batch["decoder_input_tokens"], prompt_ids=ids)
  single = jax.jit(PromptedT5(CONFIG, prompt_length=PROMPT_LENGTH).apply)
  for task in range(3):
    rows = np.where(np.asarray(ids) == task)[0]
    task_params = {**t5_params, "prompt": {"prompt": params["prompt"]["prompt"][task]}}
    alone = single({"params": task_params}, batch["encoder_input_tokens"][rows],
                   batch["decoder_input_tokens"][rows])
    np.testing.assert_allclose(np.asarray(mixed[rows]), np.asarray(alone), atol=1e-5)


def test_prompt_ids_errors(t5_params):
  bank = PromptedT5(CONFIG, prompt_length=PROMPT_LENGTH, num_prompts=2)
  params = make_prompted_params(bank, t5_params, jax.random.PRNGKey(7))
  with pytest.raises(ValueError, match="prompt_ids"):
    bank.apply({"params": params}, jnp.ones((1, 4), jnp.int32), jnp.ones((1, 2), jnp.int32))
  single = PromptedT5(CONFIG, prompt_length=PROMPT_LENGTH)
  with pytest.raises(ValueError, match="single prompt"):
    single.init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32), jnp.ones((1, 2), jnp.int32),
                prompt_ids=jnp.zeros((1,), jnp.int32))


def test_prompt_values_shape_mismatch_names_both_shapes(t5_params):
  model = PromptedT5(CONFIG, prompt_length=PROMPT_LENGTH)
  with pytest.raises(prompts.PromptShapeError, match=r"\(3, 16\).*\(4, 16\)"):
    make_prompted_params(model, t5_params, jax.random.PRNGKey(0), np.zeros((3, 16)))
