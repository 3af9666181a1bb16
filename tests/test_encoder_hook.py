"""The encoder's per-layer hook (`layer_inputs`): a no-op when absent or the identity, and a
learned per-layer prompt inside a wrapping module equals a hand-written encoder loop."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import softprompt_jax as sj
from softprompt_jax import decoding, optim
from softprompt_jax import train_step as ts
from softprompt_jax.prompted_t5 import PromptedT5, make_prompted_params
from softprompt_jax.t5 import T5, EncoderLayer
from softprompt_jax.t5_layers import RelativePositionBiases, RMSNorm, attention_mask_bias

CONFIG = sj.tiny_config(dropout_rate=0.0)
NUM_LAYERS = CONFIG.num_encoder_layers
P = 3  # prompt positions: the first P of the encoder sequence


class LayerShift(nn.Module):
  """A per-layer prompt in its simplest form: a learned vector per layer added at positions < P."""
  num_layers: int
  length: int

  @nn.compact
  def __call__(self, layer_index: int, x_BxTxH: jax.Array, valid_BxT: jax.Array) -> jax.Array:
    shift_LxH = self.param("shift", nn.initializers.normal(1.0),
                           (self.num_layers, x_BxTxH.shape[-1]))
    at_prompt_T = jnp.arange(x_BxTxH.shape[1]) < self.length
    return x_BxTxH + jnp.where(at_prompt_T[None, :, None], shift_LxH[layer_index], 0.0)


class Wrapped(nn.Module):
  """A wrapper owning the frozen T5 and the hook's params; the hook is a closure over its own
  bound submodule, passed at call time."""
  config: sj.T5Config

  def setup(self):
    self.t5 = T5(self.config)
    self.layer_shift = LayerShift(self.config.num_encoder_layers, P)

  def __call__(self, encoder_input_tokens, decoder_input_tokens):
    hook = lambda i, x_BxTxH, valid_BxT: self.layer_shift(i, x_BxTxH, valid_BxT)
    return self.t5(encoder_input_tokens, decoder_input_tokens, layer_inputs=hook)


@pytest.fixture(scope="module")
def batch():
  rng = np.random.RandomState(0)
  enc = rng.randint(2, CONFIG.vocab_size, (2, 7))
  enc[1, 5:] = 0
  return ts.make_batch(enc, rng.randint(2, CONFIG.vocab_size, (2, 3)))


@pytest.fixture(scope="module")
def wrapped_params(batch):
  init = jax.jit(Wrapped(CONFIG).init)
  return init(jax.random.PRNGKey(0), batch["encoder_input_tokens"],
              batch["decoder_input_tokens"])["params"]


def _reference_logits(t5_params, shift_LxH, batch, config=CONFIG):
  """The encoder loop written out: embed, then per layer add shift[i] at positions < P and apply
  that layer alone; final norm; T5's decoder."""
  enc_BxT = batch["encoder_input_tokens"]
  enc_params = t5_params["encoder"]
  x_BxTxH = t5_params["token_embedder"]["embedding"][enc_BxT]
  valid_BxT = enc_BxT > 0
  t = enc_BxT.shape[1]
  relpos = RelativePositionBiases(config.relative_attention_num_buckets,
                                  config.relative_attention_max_distance, config.num_heads)
  biases = (relpos.apply({"params": enc_params["relpos_bias"]}, t, t, True),
            attention_mask_bias(valid_BxT, valid_BxT))
  for i in range(config.num_encoder_layers):
    x_BxTxH = x_BxTxH.at[:, :P].add(shift_LxH[i])
    x_BxTxH = EncoderLayer(config).apply({"params": enc_params[f"layers_{i}"]}, x_BxTxH, biases,
                                         True)
  encoded = RMSNorm(config.layer_norm_epsilon).apply({"params": enc_params["encoder_norm"]},
                                                     x_BxTxH)
  return T5(config).apply({"params": t5_params}, encoded, valid_BxT,
                          batch["decoder_input_tokens"], method="decode")


def test_no_hook_and_identity_hook_are_bitwise_equal(wrapped_params, batch):
  t5_params = wrapped_params["t5"]
  seen = []

  def identity(i, x_BxTxH, valid_BxT):
    seen.append((i, x_BxTxH.shape, valid_BxT.shape))
    return x_BxTxH

  args = ({"params": t5_params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"])
  plain = T5(CONFIG).apply(*args)
  hooked = T5(CONFIG).apply(*args, layer_inputs=identity)
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(hooked))
  assert seen == [(i, (2, 7, CONFIG.emb_dim), (2, 7)) for i in range(NUM_LAYERS)]


def test_wrapper_owns_the_hook_params_and_matches_the_written_out_loop(wrapped_params, batch):
  assert set(wrapped_params) == {"t5", "layer_shift"}
  assert wrapped_params["layer_shift"]["shift"].shape == (NUM_LAYERS, CONFIG.emb_dim)
  t5_tree = sj.init_params(T5(CONFIG), jax.random.PRNGKey(0))[0]
  assert jax.tree.structure(wrapped_params["t5"]) == jax.tree.structure(t5_tree)

  shift_LxH = wrapped_params["layer_shift"]["shift"]
  logits = Wrapped(CONFIG).apply({"params": wrapped_params}, batch["encoder_input_tokens"],
                                 batch["decoder_input_tokens"])
  reference = _reference_logits(wrapped_params["t5"], shift_LxH, batch)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(reference), rtol=1e-5, atol=1e-5)
  # The hook is not a no-op: without it the logits differ.
  plain = T5(CONFIG).apply({"params": wrapped_params["t5"]}, batch["encoder_input_tokens"],
                           batch["decoder_input_tokens"])
  assert float(jnp.abs(plain - logits).max()) > 1e-3

  # Only the layer the shift belongs to sees it: shifting layer 1 alone is the loop with a zero
  # row 0, and differs from shifting layer 0 alone.
  only_last = shift_LxH.at[:-1].set(0.0)
  params = {**wrapped_params, "layer_shift": {"shift": only_last}}
  logits_last = Wrapped(CONFIG).apply({"params": params}, batch["encoder_input_tokens"],
                                      batch["decoder_input_tokens"])
  np.testing.assert_allclose(np.asarray(logits_last),
                             np.asarray(_reference_logits(wrapped_params["t5"], only_last, batch)),
                             rtol=1e-5, atol=1e-5)
  only_first = shift_LxH.at[1:].set(0.0)
  ref_first = _reference_logits(wrapped_params["t5"], only_first, batch)
  assert float(jnp.abs(ref_first - logits_last).max()) > 1e-3


def _loss(logits_BxSxV, targets_BxS):
  logp = jax.nn.log_softmax(logits_BxSxV)
  return -jnp.mean(jnp.take_along_axis(logp, targets_BxS[..., None], axis=-1))


def test_gradients_reach_every_layer_shift_and_match_the_written_out_loop(wrapped_params, batch):
  targets = batch["decoder_target_tokens"]

  def through_model(shift_LxH):
    params = {**wrapped_params, "layer_shift": {"shift": shift_LxH}}
    return _loss(Wrapped(CONFIG).apply({"params": params}, batch["encoder_input_tokens"],
                                       batch["decoder_input_tokens"]), targets)

  def through_reference(shift_LxH):
    return _loss(_reference_logits(wrapped_params["t5"], shift_LxH, batch), targets)

  shift_LxH = wrapped_params["layer_shift"]["shift"]
  # Jitted: one compilation is faster than dispatching the backward pass op by op.
  grad = jax.jit(jax.grad(through_model))(shift_LxH)
  expected = jax.jit(jax.grad(through_reference))(shift_LxH)
  assert np.all(np.linalg.norm(np.asarray(grad), axis=-1) > 1e-6), "a layer's shift got no grad"
  np.testing.assert_allclose(np.asarray(grad), np.asarray(expected), rtol=1e-4, atol=1e-6)


def test_hook_under_remat_gives_the_same_values_and_gradients(wrapped_params, batch):
  remat = Wrapped(CONFIG.replace(remat_policy="full"))
  targets = batch["decoder_target_tokens"]

  def loss(model, params):
    return _loss(model.apply({"params": params}, batch["encoder_input_tokens"],
                             batch["decoder_input_tokens"]), targets)

  value, grads = jax.jit(jax.value_and_grad(lambda p: loss(Wrapped(CONFIG), p)))(wrapped_params)
  value_r, grads_r = jax.jit(jax.value_and_grad(lambda p: loss(remat, p)))(wrapped_params)
  np.testing.assert_allclose(float(value_r), float(value), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(grads_r["layer_shift"]["shift"]),
                             np.asarray(grads["layer_shift"]["shift"]), rtol=1e-5, atol=1e-7)


def test_a_hook_may_not_change_the_shape(wrapped_params, batch):
  drop_one = lambda i, x_BxTxH, valid_BxT: x_BxTxH[:, 1:]
  with pytest.raises(ValueError, match="layer_inputs at encoder layer 0"):
    T5(CONFIG).apply({"params": wrapped_params["t5"]}, batch["encoder_input_tokens"],
                     batch["decoder_input_tokens"], layer_inputs=drop_one)


def test_prompted_t5_threads_a_layer_prompt(wrapped_params, batch):
  """PromptedT5(layer_prompt=...) owns the per-layer prompt's params next to the prompt, trains
  both, decodes with it, and equals the same hook passed at call time."""
  model = PromptedT5(CONFIG, prompt_length=P, layer_prompt=LayerShift(NUM_LAYERS, P))
  params = make_prompted_params(model, wrapped_params["t5"], jax.random.PRNGKey(1))
  params = {**params, "layer_prompt": wrapped_params["layer_shift"]}
  init_tree = model.init(jax.random.PRNGKey(2), batch["encoder_input_tokens"],
                         batch["decoder_input_tokens"])["params"]
  assert jax.tree.structure(init_tree) == jax.tree.structure(params)
  labels = flatten_dict(optim.param_labels(params), sep="/")
  assert {k for k, v in labels.items() if v == optim.TRAINABLE} == {"prompt/prompt",
                                                                     "layer_prompt/shift"}

  shift_LxH = params["layer_prompt"]["shift"]
  call_time = lambda i, x_BxTxH, valid_BxT: x_BxTxH.at[:, :P].add(shift_LxH[i])
  args = (batch["encoder_input_tokens"], batch["decoder_input_tokens"])
  logits = model.apply({"params": params}, *args)
  plain_model = PromptedT5(CONFIG, prompt_length=P)
  expected = plain_model.apply({"params": params}, *args, layer_inputs=call_time)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(expected))
  # Positions < P are the prepended prompt's; without the hook the logits differ.
  without = plain_model.apply({"params": params}, *args)
  assert float(jnp.abs(without - logits).max()) > 1e-3
  with pytest.raises(ValueError, match="layer_prompt"):
    model.apply({"params": params}, *args, layer_inputs=call_time)

  # Decoding reads the hook from the module: scores equal log p from the logits above.
  targets = batch["decoder_target_tokens"]
  scores = decoding.score(model, params, batch["encoder_input_tokens"], targets)
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]
  np.testing.assert_allclose(np.asarray(scores), np.asarray(jnp.sum(logp, axis=-1)), rtol=1e-5)

  # Both trainable leaves get gradients through the train step's loss.
  trainable, frozen = optim.split_trainable(params, optim.param_labels(params))
  grads = jax.jit(jax.grad(lambda tr: ts.loss_fn(tr, frozen, batch, None, model=model,
                                                 loss_config=ts.LossConfig(),
                                                 enable_dropout=False)[0]))(trainable)
  assert float(jnp.abs(grads["prompt"]["prompt"]).max()) > 0
  assert float(jnp.abs(grads["layer_prompt"]["shift"]).max()) > 0
