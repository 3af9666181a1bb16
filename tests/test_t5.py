"""The Flax T5 against transformers' PyTorch T5 on the same weights, and its t5x-shaped tree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import softprompt_jax as sj
from softprompt_jax.t5_layers import relative_position_bucket

import oracles


@pytest.fixture(scope="module", params=["t5_1_1", "t5_1_0"])
def hf_pair(request):
  hf_model = oracles.tiny_hf_t5(request.param, seed=1)
  config, params = oracles.hf_to_ours(hf_model)
  return request.param, hf_model, config, params


def test_logits_match_transformers_with_padding(hf_pair):
  family, hf_model, config, params = hf_pair
  assert config.logits_via_embedding == (family == "t5_1_0")
  enc, dec = oracles.random_batch(seed=2)
  assert (enc == 0).any(), "the batch must contain padding for this test to mean anything"
  ours = sj.T5(config).apply({"params": params}, jnp.asarray(enc), jnp.asarray(dec))
  ref = oracles.hf_logits(hf_model, enc, dec)
  assert ours.dtype == jnp.float32 and ours.shape == ref.shape
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)


def test_padding_does_not_leak_into_real_positions(hf_pair):
  _, _, config, params = hf_pair
  model = sj.T5(config)
  enc, dec = oracles.random_batch(seed=3, batch=1)
  extra_padding = np.concatenate([enc, np.zeros((1, 9), np.int32)], axis=1)
  a = model.apply({"params": params}, jnp.asarray(enc), jnp.asarray(dec))
  b = model.apply({"params": params}, jnp.asarray(extra_padding), jnp.asarray(dec))
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_relative_position_buckets_match_transformers():
  torch = pytest.importorskip("torch")
  from transformers.models.t5.modeling_t5 import T5Attention
  rel = np.arange(300)[None, :] - np.arange(300)[:, None]
  for buckets, distance in [(32, 128), (4, 128), (8, 20)]:
    for bidirectional in (True, False):
      ours = relative_position_bucket(rel, bidirectional, buckets, distance)
      ref = T5Attention._relative_position_bucket(
          torch.tensor(rel), bidirectional=bidirectional, num_buckets=buckets,
          max_distance=distance).numpy()
      np.testing.assert_array_equal(ours, ref)


def test_bfloat16_activations_keep_float32_params(hf_pair):
  _, hf_model, config, params = hf_pair
  enc, dec = oracles.random_batch(seed=4)
  model16 = sj.T5(config.replace(dtype="bfloat16"))
  variables = model16.init(jax.random.PRNGKey(0), jnp.asarray(enc), jnp.asarray(dec))
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables["params"]))
  logits16 = model16.apply({"params": params}, jnp.asarray(enc), jnp.asarray(dec))
  assert logits16.dtype == jnp.float32
  ref = oracles.hf_logits(hf_model, enc, dec)
  # bfloat16 has ~3 significant digits: close in aggregate, not to 1e-4.
  assert np.corrcoef(np.asarray(logits16).ravel(), ref.ravel())[0, 1] > 0.99


T5X_TINY_PATHS = {
    "token_embedder/embedding": ("vocab", "embed"),
    "encoder/relpos_bias/rel_embedding": ("heads", "relpos_buckets"),
    "encoder/layers_0/attention/query/kernel": ("embed", "joined_kv"),
    "encoder/layers_0/attention/out/kernel": ("joined_kv", "embed"),
    "encoder/layers_1/mlp/wi_0/kernel": ("embed", "mlp"),
    "encoder/layers_1/mlp/wo/kernel": ("mlp", "embed"),
    "encoder/layers_0/pre_attention_layer_norm/scale": ("embed",),
    "encoder/encoder_norm/scale": ("embed",),
    "decoder/layers_0/encoder_decoder_attention/out/kernel": ("joined_kv", "embed"),
    "decoder/layers_0/pre_cross_attention_layer_norm/scale": ("embed",),
    "decoder/layers_0/self_attention/key/kernel": ("embed", "joined_kv"),
    "decoder/decoder_norm/scale": ("embed",),
    "decoder/logits_dense/kernel": ("embed", "vocab"),
}


def test_parameter_tree_and_axes_are_t5x_names():
  model = sj.T5(sj.tiny_config())
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32),
                          jnp.ones((1, 4), jnp.int32))
  params = flatten_dict(shapes["params"], sep="/")
  axes = flatten_dict(sj.logical_axes(model), sep="/")
  assert set(params) == set(axes)
  for path, names in T5X_TINY_PATHS.items():
    assert axes[path] == names, path
    assert len(params[path].shape) == len(names)
  c = sj.tiny_config()
  assert params["decoder/relpos_bias/rel_embedding"].shape == (
      c.num_heads, c.relative_attention_num_buckets)
  tied = flatten_dict(jax.eval_shape(sj.T5(sj.tiny_config("t5_1_0")).init, jax.random.PRNGKey(0),
                                     jnp.ones((1, 8), jnp.int32),
                                     jnp.ones((1, 4), jnp.int32))["params"], sep="/")
  assert "decoder/logits_dense/kernel" not in tied
  assert "encoder/layers_0/mlp/wi/kernel" in tied


@pytest.mark.parametrize("family,size,expected_billions", [
    ("t5_1_1", "small", 0.077), ("t5_1_1", "base", 0.248), ("t5_1_1", "large", 0.783),
    ("t5_1_1", "xl", 2.85), ("t5_1_1", "xxl", 11.1), ("t5_1_0", "base", 0.223),
    ("t5_1_0", "xxl", 11.3), ("mt5", "base", 0.582), ("byt5", "small", 0.300),
])
def test_named_sizes_have_published_parameter_counts(family, size, expected_billions):
  """Counts published with the checkpoints (e.g. T5 1.1 XXL 11B, mT5 base 580M, ByT5 small 300M)."""
  model = sj.T5(sj.t5_config(size, family))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32),
                          jnp.ones((1, 4), jnp.int32))["params"]
  count = sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)) / 1e9
  assert count == pytest.approx(expected_billions, rel=0.03)


def test_config_rejects_unknown_activation_and_fields():
  with pytest.raises(ValueError, match="mlp_activations"):
    sj.T5Config(mlp_activations=("swishy",))
  with pytest.raises(ValueError, match="unknown fields"):
    sj.T5Config.from_dict({"emb_dim": 8, "d_model": 8})
  with pytest.raises(ValueError, match="unknown size"):
    sj.t5_config("huge")


@pytest.mark.parametrize("policy", ["full", "minimal"])
def test_rematerialisation_changes_no_number(policy):
  """Same tree, same logits, same gradients; only the memory/compute trade-off differs."""
  base = sj.tiny_config(dropout_rate=0.0)
  enc, dec = oracles.random_batch(seed=8, vocab_size=base.vocab_size)
  params = jax.jit(lambda key: sj.init_params(sj.T5(base), key)[0])(jax.random.PRNGKey(0))

  def loss(p, config):
    return jnp.mean(sj.T5(config).apply({"params": p}, jnp.asarray(enc), jnp.asarray(dec)) ** 2)

  remat = base.replace(remat_policy=policy)
  remat_params = jax.eval_shape(lambda: sj.init_params(sj.T5(remat), jax.random.PRNGKey(0))[0])
  assert jax.tree_util.tree_structure(remat_params) == jax.tree_util.tree_structure(params)
  # Jitted, as training runs it (and op by op, the recomputation is slow to dispatch).
  grad = jax.jit(jax.grad(loss), static_argnums=1)
  g0, g1 = grad(params, base), grad(params, remat)
  for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
