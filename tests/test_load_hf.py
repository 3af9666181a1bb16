"""load_t5 on Hugging Face directories, against transformers' PyTorch T5 as the reference."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import oracles
from softprompt_jax.checkpoints import hf
from softprompt_jax.checkpoints.loading import load_t5


@pytest.fixture(scope="module")
def hf_models():
  return {family: oracles.tiny_hf_t5(family, seed=i)
          for i, family in enumerate(("t5_1_1", "t5_1_0"))}


@pytest.fixture(scope="module")
def batch():
  return oracles.random_batch(seed=1)


def _all_float32(params):
  return all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))


@pytest.mark.parametrize("family,num_shards", [("t5_1_1", 1), ("t5_1_1", 3), ("t5_1_0", 1)])
def test_logits_match_transformers(tmp_path, hf_models, batch, family, num_shards):
  reference = hf_models[family]
  directory = oracles.save_hf(reference, tmp_path, num_shards=num_shards)
  if num_shards > 1:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == num_shards
    assert not (directory / "model.safetensors").exists()
  model, params = load_t5(directory)

  c = model.config
  assert (c.num_encoder_layers, c.num_decoder_layers, c.vocab_size) == (2, 3, 100)
  assert c.logits_via_embedding == (family == "t5_1_0")
  assert c.mlp_activations == (("gelu", "linear") if family == "t5_1_1" else ("relu",))
  assert _all_float32(params)
  enc, dec = batch
  want = oracles.hf_logits(reference, enc, dec)
  got = np.asarray(model.apply({"params": params}, enc, dec))
  assert got.shape == want.shape == (3, dec.shape[1], 100)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("scaled", [False, True], ids=["t5_1_1_tied", "t5_1_0"])
def test_transformers_save_pretrained_layout(tmp_path, batch, scaled):
  """transformers >= 5's own writer: config says tied, the file holds shared.weight only and no
  lm_head; with scale_decoder_outputs false the output layer is an unscaled copy of it."""
  import torch
  import transformers
  cfg = transformers.T5Config(
      vocab_size=100, d_model=16, d_kv=8, d_ff=32, num_layers=3, num_decoder_layers=2,
      num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=20,
      feed_forward_proj="relu" if scaled else "gated-gelu", tie_word_embeddings=True,
      scale_decoder_outputs=scaled, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
      eos_token_id=1)
  torch.manual_seed(3)
  reference = transformers.T5ForConditionalGeneration(cfg).eval()
  reference.save_pretrained(tmp_path)
  model, params = load_t5(tmp_path)
  assert model.config.logits_via_embedding == scaled
  assert ("logits_dense" in params["decoder"]) == (not scaled)
  enc, dec = batch
  got = np.asarray(model.apply({"params": params}, enc, dec))
  np.testing.assert_allclose(got, oracles.hf_logits(reference, enc, dec), atol=1e-4, rtol=0)


def test_untied_output_layer_is_read_from_lm_head(tmp_path, hf_models):
  """T5 1.1's lm_head differs from the embedding; loading must not fall back to the latter."""
  reference = hf_models["t5_1_1"]
  _, params = load_t5(oracles.save_hf(reference, tmp_path))
  lm_head = reference.lm_head.weight.detach().numpy()
  assert not np.allclose(lm_head, reference.shared.weight.detach().numpy())
  np.testing.assert_array_equal(np.asarray(params["decoder"]["logits_dense"]["kernel"]), lm_head.T)


def test_bfloat16_override_runs_with_float32_params(tmp_path, hf_models, batch):
  reference = hf_models["t5_1_1"]
  directory = oracles.save_hf(reference, tmp_path)
  _, params32 = load_t5(directory)
  model, params = load_t5(directory, dtype="bfloat16")
  assert model.config.dtype == "bfloat16"
  assert _all_float32(params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params32)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  enc, dec = batch
  got = np.asarray(model.apply({"params": params}, enc, dec))
  want = oracles.hf_logits(reference, enc, dec)
  assert np.isfinite(got).all()
  # bfloat16 activations: close to the float32 reference, but not equal to it.
  scale = np.abs(want).max()
  assert 0 < np.abs(got - want).max() < 0.05 * scale


def test_bfloat16_checkpoint_comes_back_float32(tmp_path, hf_models):
  """A bf16 safetensors file loads as float32 params holding exactly the bf16 values."""
  from safetensors.numpy import load_file, save_file
  directory = oracles.save_hf(hf_models["t5_1_0"], tmp_path)
  state = load_file(str(directory / "model.safetensors"))
  state16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in state.items()}
  save_file(state16, str(directory / "model.safetensors"))
  _, params = load_t5(directory / "model.safetensors")
  assert _all_float32(params)
  np.testing.assert_array_equal(np.asarray(params["token_embedder"]["embedding"]),
                                state16["shared.weight"].astype(np.float32))
  np.testing.assert_array_equal(
      np.asarray(params["encoder"]["relpos_bias"]["rel_embedding"]),
      state16["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].astype(
          np.float32).T)


def test_each_array_is_placed_before_the_next_is_read(tmp_path, hf_models, monkeypatch):
  directory = oracles.save_hf(hf_models["t5_1_1"], tmp_path, num_shards=3)
  events = []
  read = hf.HFSafetensorsReader.read

  def logged_read(self, path):
    events.append(("read", path))
    return read(self, path)

  def place(path, array):
    assert isinstance(array, np.ndarray) and array.dtype == np.float32
    events.append(("place", path))
    return jnp.asarray(array) + 1.0  # visible in the result: params are what place returns

  monkeypatch.setattr(hf.HFSafetensorsReader, "read", logged_read)
  _, params = load_t5(directory, place=place)
  _, plain = load_t5(directory)
  n = len(jax.tree.leaves(plain))
  assert len(events) == 2 * n + n  # the second load's reads are logged too
  first = events[:2 * n]
  for i in range(n):
    assert first[2 * i][0] == "read" and first[2 * i + 1] == ("place", first[2 * i][1])
  assert len({path for _, path in first}) == n
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(plain)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b) + 1.0)
