"""The building blocks of T5, each a flax.linen Module with t5x's parameter names and axes.

Every parameter is made by `param_with_axes`, which records its logical axis names t5x-style in
the `params_axes` collection (`<param>_axes` entries); activations carry logical sharding
constraints (`constrain`). Tensor names carry their layout as in t5.py: B batch, L length,
H d_model, N heads, D head_dim, F mlp width, V vocabulary, Q/K query/key length in attention.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from softprompt_jax.t5_config import ACTIVATIONS

# Large negative bias for masked attention positions (t5x uses the same value).
MASK_BIAS = -1e10


@flax.struct.dataclass
class AxisMetadata:
  """Logical axis names of one parameter (t5x's `params_axes` entry)."""
  names: tuple[str, ...] = flax.struct.field(pytree_node=False)


def param_with_axes(module: nn.Module, name: str, init_fn: Callable, shape: tuple[int, ...],
                    axes: tuple[str, ...]) -> jax.Array:
  """A float32 parameter whose logical axis names go to the `params_axes` collection."""
  if len(axes) != len(shape):
    raise ValueError(f"{name}: {len(axes)} axis names {axes} for a parameter of shape {shape}")
  value = module.param(name, init_fn, shape, jnp.float32)
  if module.is_mutable_collection("params_axes"):
    module.variable("params_axes", f"{name}_axes", AxisMetadata, axes)
  return value


def constrain(x: jax.Array, axes: tuple[Optional[str], ...]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside a mesh with axis rules."""
  return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
  """T5's layer norm: no mean subtraction, no bias; statistics in float32."""
  epsilon: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxH: jax.Array) -> jax.Array:
    scale_H = param_with_axes(self, "scale", nn.initializers.ones, (x_BxLxH.shape[-1],), ("embed",))
    x = x_BxLxH.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
    return (x * scale_H).astype(self.dtype)


class Dense(nn.Module):
  """A bias-free 2-D kernel [in, out] with logical axes, as t5x stores DenseGeneral kernels."""
  features: int
  axes: tuple[str, str]
  dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")

  @nn.compact
  def __call__(self, x_BxLxI: jax.Array) -> jax.Array:
    kernel_IxO = param_with_axes(self, "kernel", self.kernel_init,
                                 (x_BxLxI.shape[-1], self.features), self.axes)
    return jnp.dot(x_BxLxI.astype(self.dtype), kernel_IxO.astype(self.dtype))


class Embed(nn.Module):
  """Token embedding table [V, H]; `attend` gives the tied output projection."""
  num_embeddings: int
  features: int
  dtype: Any = jnp.float32

  def setup(self) -> None:
    self.embedding = param_with_axes(self, "embedding", nn.initializers.normal(1.0),
                                     (self.num_embeddings, self.features), ("vocab", "embed"))

  def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
    if not jnp.issubdtype(tokens_BxL.dtype, jnp.integer):
      raise TypeError(f"token ids must be integers, got {tokens_BxL.dtype}")
    return jnp.take(self.embedding, tokens_BxL, axis=0).astype(self.dtype)

  def attend(self, x_BxLxH: jax.Array) -> jax.Array:
    return jnp.dot(x_BxLxH.astype(self.dtype), self.embedding.T.astype(self.dtype))


def relative_position_bucket(relative_position: np.ndarray, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> np.ndarray:
  """Mesh TF / t5x bucketing of (memory - query) offsets; numpy, since shapes are static."""
  ret = 0
  n = -relative_position
  if bidirectional:
    num_buckets //= 2
    ret += (n < 0).astype(np.int32) * num_buckets
    n = np.abs(n)
  else:
    n = np.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  # float32 with t5x's epsilon, so bucket edges land where t5x (and the checkpoints) put them.
  val_if_large = max_exact + (
      np.log(n.astype(np.float32) / max_exact + np.finfo(np.float32).eps)
      / np.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(np.int32)
  val_if_large = np.minimum(val_if_large, num_buckets - 1)
  return ret + np.where(is_small, n, val_if_large)


class RelativePositionBiases(nn.Module):
  """One learned scalar per (head, bucket), shared by every layer of a stack."""
  num_buckets: int
  max_distance: int
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, q_len: int, k_len: int, bidirectional: bool) -> jax.Array:
    context = np.arange(q_len, dtype=np.int32)[:, None]
    memory = np.arange(k_len, dtype=np.int32)[None, :]
    buckets_QxK = relative_position_bucket(memory - context, bidirectional, self.num_buckets,
                                           self.max_distance)
    rel_embedding_NxK = param_with_axes(
        self, "rel_embedding", nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
        (self.num_heads, self.num_buckets), ("heads", "relpos_buckets"))
    # One-hot contraction instead of a gather: it partitions cleanly and matches t5x.
    onehot_QxKxR = jax.nn.one_hot(buckets_QxK, self.num_buckets, dtype=self.dtype)
    bias_NxQxK = jnp.einsum("nr,qkr->nqk", rel_embedding_NxK.astype(self.dtype), onehot_QxKxR)
    return bias_NxQxK[None]  # [1, N, Q, K]


class MultiHeadAttention(nn.Module):
  """T5 attention: no query scaling (folded into the initialisation), no biases."""
  num_heads: int
  head_dim: int
  dropout_rate: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxQxH: jax.Array, kv_BxKxH: jax.Array, biases: tuple[jax.Array, ...], *,
               deterministic: bool, decode: bool = False,
               cache_kv_projections: bool = False) -> jax.Array:
    """`biases`: additive terms each broadcastable to [B, N, Q, K] (relative positions [1, N, Q, K],
    padding [B, 1, Q, K]); kept apart so no [B, N, Q, K] bias is ever materialised.

    `cache_kv_projections` (cross-attention while decoding): the keys and values of the fixed
    encoder outputs are projected once, by the call that creates the cache, and read back at
    every step instead of being recomputed.
    """
    inner = self.num_heads * self.head_dim
    emb = x_BxQxH.shape[-1]
    q_init = nn.initializers.variance_scaling(1.0 / self.head_dim, "fan_in", "truncated_normal")
    q = Dense(inner, ("embed", "joined_kv"), self.dtype, q_init, name="query")(x_BxQxH)
    split = lambda t: t.reshape(t.shape[:2] + (self.num_heads, self.head_dim))
    q_BxQxNxD = constrain(split(q), ("batch", "length", "heads", "kv"))
    # Keys and values head-major, the layout of the batched attention matmuls: on CPU the other
    # layout costs a transpose of every cached key and value at every decoding step.
    heads_first = lambda t: constrain(split(t).transpose(0, 2, 1, 3),
                                      ("batch", "heads", "length", "kv"))
    if cache_kv_projections and self.has_variable("cache", "projected_key"):
      k_BxNxKxD = self.get_variable("cache", "projected_key")
      v_BxNxKxD = self.get_variable("cache", "projected_value")
    else:
      project = lambda name: Dense(inner, ("embed", "joined_kv"), self.dtype, name=name)(kv_BxKxH)
      k_BxNxKxD, v_BxNxKxD = self.adapt_kv(heads_first(project("key")),
                                           heads_first(project("value")))
      if cache_kv_projections:
        self.put_variable("cache", "projected_key", k_BxNxKxD)
        self.put_variable("cache", "projected_value", v_BxNxKxD)

    if decode:
      k_BxNxKxD, v_BxNxKxD, biases = self._update_cache(k_BxNxKxD, v_BxNxKxD, biases)

    logits_BxNxQxK = jnp.einsum("bqnd,bnkd->bnqk", q_BxQxNxD, k_BxNxKxD,
                                preferred_element_type=jnp.float32)
    for bias in biases:
      logits_BxNxQxK = logits_BxNxQxK + bias.astype(jnp.float32)
    weights_BxNxQxK = jax.nn.softmax(logits_BxNxQxK, axis=-1).astype(self.dtype)
    if not deterministic and self.dropout_rate > 0:
      weights_BxNxQxK = nn.Dropout(self.dropout_rate)(weights_BxNxQxK, deterministic=False)
    out_BxQxNxD = jnp.einsum("bnqk,bnkd->bqnd", weights_BxNxQxK, v_BxNxKxD)
    out_BxQxF = out_BxQxNxD.reshape(out_BxQxNxD.shape[:2] + (inner,))
    o_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    return Dense(emb, ("joined_kv", "embed"), self.dtype, o_init, name="out")(out_BxQxF)

  def adapt_kv(self, k_BxNxKxD: jax.Array,
               v_BxNxKxD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The projected keys and values as attention uses (and a decode cache keeps) them. A hook,
    the identity here: a method that rescales them (IA3, methods/ia3.py) intercepts this call
    with flax's `nn.intercept_methods`, so the frozen T5's code and params stay as they are."""
    return k_BxNxKxD, v_BxNxKxD

  def _update_cache(self, k_BxNx1xD: jax.Array, v_BxNx1xD: jax.Array,
                    biases: tuple[jax.Array, ...]
                    ) -> tuple[jax.Array, jax.Array, tuple[jax.Array, ...]]:
    """Autoregressive step: write this position's key/value and attend to positions <= it.

    The cache is created by a first call with the full decoder length (see `T5.init_cache`);
    that call only shapes the cache and attends normally.
    """
    initialized = self.has_variable("cache", "cached_key")
    cached_key = self.variable("cache", "cached_key", jnp.zeros, k_BxNx1xD.shape, k_BxNx1xD.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, v_BxNx1xD.shape,
                                 v_BxNx1xD.dtype)
    cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if not initialized:
      return k_BxNx1xD, v_BxNx1xD, biases
    if k_BxNx1xD.shape[2] != 1:
      raise ValueError(f"decode steps take one token at a time, got {k_BxNx1xD.shape[2]}")
    max_len = cached_key.value.shape[2]
    i = cache_index.value
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, k_BxNx1xD, (0, 0, i, 0))
    cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, v_BxNx1xD, (0, 0, i, 0))
    cache_index.value = i + 1
    visible_1xL = jnp.arange(max_len)[None, :] <= i
    mask_bias = jnp.where(visible_1xL, 0.0, MASK_BIAS)[None, None]  # [1, 1, 1, L]
    return cached_key.value, cached_value.value, tuple(biases) + (mask_bias,)


class MLP(nn.Module):
  """Gated (T5 1.1: gelu(x W_0) * (x W_1)) or plain (T5 1.0: relu(x W)) feed-forward block."""
  mlp_dim: int
  activations: tuple[str, ...]
  dropout_rate: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxH: jax.Array, *, deterministic: bool) -> jax.Array:
    emb = x_BxLxH.shape[-1]
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    hidden = None
    for idx, act in enumerate(self.activations):
      name = "wi" if len(self.activations) == 1 else f"wi_{idx}"
      h_BxLxF = ACTIVATIONS[act](Dense(self.mlp_dim, ("embed", "mlp"), self.dtype, init,
                                       name=name)(x_BxLxH))
      hidden = h_BxLxF if hidden is None else hidden * h_BxLxF
    hidden = constrain(hidden, ("batch", "length", "mlp"))
    hidden = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(hidden,
                                                                 deterministic=deterministic)
    return Dense(emb, ("mlp", "embed"), self.dtype, init, name="wo")(self.adapt_hidden(hidden))

  def adapt_hidden(self, hidden_BxLxF: jax.Array) -> jax.Array:
    """The activations `wo` projects back to d_model. A hook, the identity here (see
    `MultiHeadAttention.adapt_kv`; IA3 rescales them)."""
    return hidden_BxLxF


def attention_mask_bias(query_valid_BxQ: jax.Array, key_valid_BxK: jax.Array) -> jax.Array:
  """[B, 1, Q, K] additive bias: 0 where both positions are real, MASK_BIAS elsewhere."""
  mask = query_valid_BxQ[:, None, :, None] & key_valid_BxK[:, None, None, :]
  return jnp.where(mask, 0.0, MASK_BIAS).astype(jnp.float32)
