"""The T5 encoder-decoder as a flax.linen Module, with t5x's parameter tree and logical axes.

Parameter paths (`token_embedder/embedding`, `encoder/layers_0/attention/query/kernel`,
`encoder/relpos_bias/rel_embedding`, `decoder/logits_dense/kernel`, ...) and their logical axis
names are those of t5x's T5 1.1 network, so t5x checkpoints load without renaming. Axis names are
recorded t5x-style in a `params_axes` collection (`<param>_axes` entries), keeping `params` a tree
of plain arrays. The building blocks (norm, dense, embedding, relative positions, attention, MLP)
are in t5_layers.py; this file stacks them into layers, the encoder, the decoder and `T5`.

Tensor names carry their layout: B batch, T encoder length, S decoder length, H d_model,
N heads, D head_dim, F mlp width, V vocabulary, Q/K query/key length in attention.

Prompt variants never change this file: the encoder takes its inputs already embedded (so a
prompt can be spliced in first, `T5.encoder_inputs`), an optional per-layer hook
(`LayerInputs`) may rewrite each encoder layer's input (e.g. a prompt at every layer), and
`T5.encoder_attention_mask` may restrict the encoder's self-attention (prompt masks).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from softprompt_jax.t5_config import T5Config
from softprompt_jax.t5_layers import (MASK_BIAS, MLP, AxisMetadata, Dense, Embed,
                                      MultiHeadAttention, RelativePositionBiases, RMSNorm,
                                      attention_mask_bias, constrain)

# The encoder's per-layer hook: (layer index, that layer's input x_BxTxH, valid_BxT) -> the
# input the layer gets instead, same shape. See `Encoder` for where it runs.
LayerInputs = Callable[[int, jax.Array, jax.Array], jax.Array]

Tokens = TypeVar("Tokens", np.ndarray, jax.Array)


def shift_right(target_tokens_BxS: Tokens) -> Tokens:
  """Teacher-forced decoder inputs: the targets one step late, after the start token 0.

  NumPy in, NumPy out (the host data pipeline); a jax array (or tracer) stays one.
  """
  xp = np if isinstance(target_tokens_BxS, np.ndarray) else jnp
  return xp.pad(target_tokens_BxS[:, :-1], ((0, 0), (1, 0)))


def _residual(module: nn.Module, x_BxLxH: jax.Array, sublayer_BxLxH: jax.Array,
              deterministic: bool) -> jax.Array:
  dropped = nn.Dropout(module.config.dropout_rate, broadcast_dims=(-2,))(
      sublayer_BxLxH, deterministic=deterministic)
  return constrain(x_BxLxH + dropped, ("batch", "length", "embed"))


class EncoderLayer(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, x_BxTxH: jax.Array, biases: tuple[jax.Array, ...],
               deterministic: bool) -> jax.Array:
    c = self.config
    dt = c.activation_dtype
    y = RMSNorm(c.layer_norm_epsilon, dt, name="pre_attention_layer_norm")(x_BxTxH)
    y = MultiHeadAttention(c.num_heads, c.head_dim, c.dropout_rate, dt, name="attention")(
        y, y, biases, deterministic=deterministic)
    x_BxTxH = _residual(self, x_BxTxH, y, deterministic)
    y = RMSNorm(c.layer_norm_epsilon, dt, name="pre_mlp_layer_norm")(x_BxTxH)
    y = MLP(c.mlp_dim, c.mlp_activations, c.dropout_rate, dt, name="mlp")(
        y, deterministic=deterministic)
    return _residual(self, x_BxTxH, y, deterministic)


class DecoderLayer(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, y_BxSxH: jax.Array, encoded_BxTxH: jax.Array,
               self_biases: tuple[jax.Array, ...], cross_biases: tuple[jax.Array, ...],
               deterministic: bool, decode: bool) -> jax.Array:
    c = self.config
    dt = c.activation_dtype
    z = RMSNorm(c.layer_norm_epsilon, dt, name="pre_self_attention_layer_norm")(y_BxSxH)
    z = MultiHeadAttention(c.num_heads, c.head_dim, c.dropout_rate, dt, name="self_attention")(
        z, z, self_biases, deterministic=deterministic, decode=decode)
    y_BxSxH = _residual(self, y_BxSxH, z, deterministic)
    z = RMSNorm(c.layer_norm_epsilon, dt, name="pre_cross_attention_layer_norm")(y_BxSxH)
    z = MultiHeadAttention(c.num_heads, c.head_dim, c.dropout_rate, dt,
                           name="encoder_decoder_attention")(
                               z, encoded_BxTxH, cross_biases, deterministic=deterministic,
                               cache_kv_projections=decode)
    y_BxSxH = _residual(self, y_BxSxH, z, deterministic)
    z = RMSNorm(c.layer_norm_epsilon, dt, name="pre_mlp_layer_norm")(y_BxSxH)
    z = MLP(c.mlp_dim, c.mlp_activations, c.dropout_rate, dt, name="mlp")(
        z, deterministic=deterministic)
    return _residual(self, y_BxSxH, z, deterministic)


REMAT_POLICIES = {
    "none": None,
    # Keep only each layer's inputs; recompute the rest in the backward pass (~1/3 more work).
    "full": jax.checkpoint_policies.nothing_saveable,
    # Keep matmul outputs, recompute the cheap elementwise work.
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def rematted(layer_cls: type[nn.Module], policy: str,
             static_argnums: tuple[int, ...]) -> type[nn.Module]:
  """`layer_cls`, rematerialised under `policy` (T5Config.remat_policy); same parameter names."""
  if policy == "none":
    return layer_cls
  return nn.remat(layer_cls, policy=REMAT_POLICIES[policy], static_argnums=static_argnums)


class Encoder(nn.Module):
  """The encoder stack over already-embedded inputs (so a prompt can be spliced in first)."""
  config: T5Config

  @nn.compact
  def __call__(self, x_BxTxH: jax.Array, valid_BxT: jax.Array, *, deterministic: bool,
               layer_inputs: Optional[LayerInputs] = None,
               attention_mask_BxTxT: Optional[jax.Array] = None) -> jax.Array:
    """Encoded [B, T, H] of embedded inputs [B, T, H] (prompt included) and their mask [B, T].

    `layer_inputs(i, x_BxTxH, valid_BxT)`, when given, runs before every encoder layer i: it
    gets that layer's input (the previous layer's output; for i = 0 the embedded inputs after
    dropout) and returns the input layer i uses instead, both for its pre-attention layer norm
    and for its residual. It may add to or replace any positions (e.g. a per-layer prompt at the
    prompt positions) but keep the shape: the mask and relative positions are fixed for the
    whole stack. Its result is cast to the activation dtype. It runs outside the (rematerialised)
    layers, so it may call bound modules of any parent; the final layer norm sees the last
    layer's output unhooked. None changes nothing.

    `attention_mask_BxTxT` (bool, query x key), when given, replaces the padding mask of every
    self-attention (e.g. a prompt that may not see the inputs, `prompt_masks`); it must mask
    padding itself. None: every real position sees every real one.
    """
    c = self.config
    dt = c.activation_dtype
    t = x_BxTxH.shape[1]
    relpos_1xNxTxT = RelativePositionBiases(c.relative_attention_num_buckets,
                                            c.relative_attention_max_distance, c.num_heads, dt,
                                            name="relpos_bias")(t, t, bidirectional=True)
    if attention_mask_BxTxT is None:
      biases = (relpos_1xNxTxT, attention_mask_bias(valid_BxT, valid_BxT))
    else:
      mask_bias = jnp.where(attention_mask_BxTxT[:, None], 0.0, MASK_BIAS).astype(jnp.float32)
      biases = (relpos_1xNxTxT, mask_bias)
    x = nn.Dropout(c.dropout_rate, broadcast_dims=(-2,))(x_BxTxH, deterministic=deterministic)
    x = constrain(x.astype(dt), ("batch", "length", "embed"))
    layer = rematted(EncoderLayer, c.remat_policy, static_argnums=(3,))
    for i in range(c.num_encoder_layers):
      if layer_inputs is not None:
        hooked = layer_inputs(i, x, valid_BxT)
        if hooked.shape != x.shape:
          raise ValueError(f"layer_inputs at encoder layer {i} returned shape {hooked.shape}; "
                           f"it must keep the layer input's shape {x.shape}")
        x = constrain(hooked.astype(dt), ("batch", "length", "embed"))
      x = layer(c, name=f"layers_{i}")(x, biases, deterministic)
    x = RMSNorm(c.layer_norm_epsilon, dt, name="encoder_norm")(x)
    return nn.Dropout(c.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)


class Decoder(nn.Module):
  config: T5Config
  token_embedder: Embed

  @nn.compact
  def __call__(self, encoded_BxTxH: jax.Array, encoder_valid_BxT: jax.Array,
               decoder_input_tokens_BxS: jax.Array, decoder_valid_BxS: Optional[jax.Array] = None,
               *, deterministic: bool, decode: bool = False,
               max_decode_length: Optional[int] = None) -> jax.Array:
    c = self.config
    dt = c.activation_dtype
    s = decoder_input_tokens_BxS.shape[1]
    relpos = RelativePositionBiases(c.relative_attention_num_buckets,
                                    c.relative_attention_max_distance, c.num_heads, dt,
                                    name="relpos_bias")
    # A step needs the cache; the first decode=True call creates it, even when s == 1.
    step = decode and s == 1 and self.has_variable("cache", "layers_0")
    if step:
      # One step: the cache supplies the causal mask; the bias row is sliced at the position.
      self_bias = relpos(max_decode_length, max_decode_length, bidirectional=False)
      index = self._step_index()
      self_biases = (jax.lax.dynamic_slice_in_dim(self_bias, index, 1, axis=2),)
    if decoder_valid_BxS is None:
      decoder_valid_BxS = jnp.ones(decoder_input_tokens_BxS.shape, bool)
    if not step:
      causal_SxS = jnp.tril(jnp.ones((s, s), bool))
      self_biases = (relpos(s, s, bidirectional=False)
                     + jnp.where(causal_SxS, 0.0, MASK_BIAS)[None, None],
                     attention_mask_bias(decoder_valid_BxS, decoder_valid_BxS))
    cross_biases = (attention_mask_bias(decoder_valid_BxS, encoder_valid_BxT),)

    y = self.token_embedder(decoder_input_tokens_BxS)
    y = nn.Dropout(c.dropout_rate, broadcast_dims=(-2,))(y, deterministic=deterministic)
    y = constrain(y.astype(dt), ("batch", "length", "embed"))
    # The decode path mutates the cache; rematerialisation only pays off in training anyway.
    layer = DecoderLayer if decode else rematted(DecoderLayer, c.remat_policy,
                                                  static_argnums=(5, 6))
    for i in range(c.num_decoder_layers):
      y = layer(c, name=f"layers_{i}")(y, encoded_BxTxH, self_biases, cross_biases,
                                       deterministic, decode)
    y = RMSNorm(c.layer_norm_epsilon, dt, name="decoder_norm")(y)
    y = nn.Dropout(c.dropout_rate, broadcast_dims=(-2,))(y, deterministic=deterministic)
    if c.logits_via_embedding:
      logits_BxSxV = self.token_embedder.attend(y) / jnp.sqrt(jnp.array(y.shape[-1], dt))
    else:
      logits_BxSxV = Dense(c.vocab_size, ("embed", "vocab"), dt,
                           nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
                           name="logits_dense")(y)
    logits_BxSxV = constrain(logits_BxSxV, ("batch", "length", "vocab"))
    return logits_BxSxV.astype(jnp.float32)

  def _step_index(self) -> jax.Array:
    """Current decode position: the first self-attention cache's index before this step."""
    return self.get_variable("cache", "layers_0")["self_attention"]["cache_index"]


class T5(nn.Module):
  """Encoder-decoder T5. `apply(params, encoder_input_tokens, decoder_input_tokens)` -> logits.

  Token id 0 is padding: the encoder mask is `encoder_input_tokens > 0`; decoder inputs start
  with 0 (the shifted targets), so decoder padding is read from `decoder_target_tokens` when
  given, as in t5x.

  `layer_inputs` (a `LayerInputs` hook, passed to `encode` / `__call__`) rewrites each encoder
  layer's input; see `Encoder`. A wrapping module passes a closure over its own bound submodule,
  so the hook's params live under the wrapper and the frozen T5 stays as it is.
  """
  config: T5Config

  def setup(self) -> None:
    c = self.config
    self.token_embedder = Embed(c.vocab_size, c.emb_dim, c.activation_dtype)
    self.encoder = Encoder(c)
    self.decoder = Decoder(c, self.token_embedder)

  # The hook PromptedT5 overrides: embedded encoder inputs and their validity mask.
  def encoder_inputs(self, encoder_input_tokens_BxT: jax.Array,
                     **kwargs: Any) -> tuple[jax.Array, jax.Array]:
    if kwargs:
      raise TypeError(f"T5 takes no extra encoder arguments, got {sorted(kwargs)}")
    return self.token_embedder(encoder_input_tokens_BxT), encoder_input_tokens_BxT > 0

  # The hook a prompt variant overrides to restrict who sees whom in the encoder: a [B, T', T']
  # bool mask over its inputs (`encoder_inputs`' mask), or None for the padding mask alone.
  def encoder_attention_mask(self, valid_BxT: jax.Array) -> Optional[jax.Array]:
    return None

  def encode(self, encoder_input_tokens_BxT: jax.Array, *, enable_dropout: bool = False,
             layer_inputs: Optional[LayerInputs] = None,
             **kwargs: Any) -> tuple[jax.Array, jax.Array]:
    """Returns (encoded [B, T', H], encoder_valid [B, T']); T' includes any prompt."""
    x_BxTxH, valid_BxT = self.encoder_inputs(encoder_input_tokens_BxT, **kwargs)
    encoded = self.encoder(x_BxTxH, valid_BxT, deterministic=not enable_dropout,
                           layer_inputs=layer_inputs,
                           attention_mask_BxTxT=self.encoder_attention_mask(valid_BxT))
    return encoded, valid_BxT

  def decode(self, encoded_BxTxH: jax.Array, encoder_valid_BxT: jax.Array,
             decoder_input_tokens_BxS: jax.Array,
             decoder_target_tokens_BxS: Optional[jax.Array] = None, *,
             enable_dropout: bool = False, decode: bool = False,
             max_decode_length: Optional[int] = None) -> jax.Array:
    decoder_valid = None if decoder_target_tokens_BxS is None else decoder_target_tokens_BxS > 0
    return self.decoder(encoded_BxTxH, encoder_valid_BxT, decoder_input_tokens_BxS, decoder_valid,
                        deterministic=not enable_dropout, decode=decode,
                        max_decode_length=max_decode_length)

  # Argument names are t5x's (its models pass them by keyword); shapes [B, T], [B, S], [B, S].
  def __call__(self, encoder_input_tokens: jax.Array, decoder_input_tokens: jax.Array,
               decoder_target_tokens: Optional[jax.Array] = None, *,
               enable_dropout: bool = False, layer_inputs: Optional[LayerInputs] = None,
               **encoder_kwargs: Any) -> jax.Array:
    """Logits [B, S, V] (float32)."""
    encoded, valid = self.encode(encoder_input_tokens, enable_dropout=enable_dropout,
                                 layer_inputs=layer_inputs, **encoder_kwargs)
    return self.decode(encoded, valid, decoder_input_tokens, decoder_target_tokens,
                       enable_dropout=enable_dropout)


def init_params(model: nn.Module, rng: jax.Array, batch: int = 1, input_len: int = 8,
                target_len: int = 4) -> tuple[dict, dict]:
  """Initialise `model`'s params with dummy shapes; returns (params, params_axes)."""
  enc = jnp.ones((batch, input_len), jnp.int32)
  dec = jnp.ones((batch, target_len), jnp.int32)
  variables = model.init(rng, enc, dec)
  return variables["params"], variables.get("params_axes", {})


def logical_axes(model: nn.Module, input_len: int = 8, target_len: int = 4) -> dict:
  """The logical axis names of every parameter, as a tree shaped like `params`."""
  enc = jax.ShapeDtypeStruct((1, input_len), jnp.int32)
  dec = jax.ShapeDtypeStruct((1, target_len), jnp.int32)
  axes = jax.eval_shape(model.init, jax.random.PRNGKey(0), enc, dec)["params_axes"]
  return strip_axes_suffix(axes)


def strip_axes_suffix(params_axes: dict) -> dict:
  """`{'kernel_axes': AxisMetadata(names)}` -> `{'kernel': names}`, recursively."""
  out = {}
  for k, v in params_axes.items():
    if isinstance(v, AxisMetadata):
      out[k[:-len("_axes")]] = v.names
    else:
      out[k] = strip_axes_suffix(v)
  return out
