"""load_t5's errors: checkpoints that do not fit, files it must refuse or cannot read."""

import json
import pathlib
import pickle
import pickletools
import re

import flax.serialization
import numpy as np
import pytest
from flax.traverse_util import unflatten_dict
from safetensors.numpy import save_file

from softprompt_jax import tiny_config
from softprompt_jax.checkpoints.hf_names import hf_name_map
from softprompt_jax.checkpoints.checkpoint_reader import CheckpointError, CheckpointMismatchError
from softprompt_jax.checkpoints.loading import expected_param_shapes, load_t5

CONFIG = tiny_config("t5_1_1", relative_attention_max_distance=20)
HF_CONFIG = {"model_type": "t5", "vocab_size": CONFIG.vocab_size, "d_model": CONFIG.emb_dim,
             "d_kv": CONFIG.head_dim, "d_ff": CONFIG.mlp_dim, "num_heads": CONFIG.num_heads,
             "num_layers": CONFIG.num_encoder_layers,
             "num_decoder_layers": CONFIG.num_decoder_layers,
             "relative_attention_num_buckets": CONFIG.relative_attention_num_buckets,
             "relative_attention_max_distance": CONFIG.relative_attention_max_distance,
             "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}


def _hf_state(seed=0) -> dict:
  """A complete Hugging Face state dict for CONFIG ([out, in] kernels), random values."""
  rng = np.random.RandomState(seed)
  shapes = expected_param_shapes(CONFIG)
  state = {}
  for hf_name, (path, transpose) in hf_name_map(CONFIG).items():
    shape = shapes[tuple(path.split("/"))].shape
    state[hf_name] = rng.standard_normal(shape[::-1] if transpose else shape).astype(np.float32)
  return state


def _write_hf(directory: pathlib.Path, state: dict, config=None) -> pathlib.Path:
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(config or HF_CONFIG))
  save_file(state, str(directory / "model.safetensors"))
  return directory


def test_complete_hand_written_checkpoint_loads(tmp_path):
  """The control for the tests below: the unbroken checkpoint loads."""
  state = _hf_state()
  model, params = load_t5(_write_hf(tmp_path / "hf", state))
  assert model.config == CONFIG
  np.testing.assert_array_equal(np.asarray(params["decoder"]["layers_0"]["mlp"]["wi_1"]["kernel"]),
                                state["decoder.block.0.layer.2.DenseReluDense.wi_1.weight"].T)


def test_missing_and_misshaped_arrays_in_one_error(tmp_path):
  state = _hf_state()
  del state["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
  state["decoder.block.0.layer.2.DenseReluDense.wi_0.weight"] = np.zeros((30, 16), np.float32)
  directory = _write_hf(tmp_path / "hf", state)
  with pytest.raises(CheckpointMismatchError) as info:
    load_t5(directory)
  err = info.value
  assert isinstance(err, ValueError)
  assert err.missing == ["encoder/layers_1/mlp/wo/kernel"]
  assert err.mismatched == ["decoder/layers_0/mlp/wi_0/kernel"]
  assert err.unexpected == []
  message = str(err)
  assert str(directory) in message
  missing_line = next(line for line in message.splitlines()
                      if "encoder/layers_1/mlp/wo/kernel" in line)
  assert "(32, 16)" in missing_line and "encoder.block.1.layer.1.DenseReluDense.wo.weight" in (
      missing_line)
  wrong_line = next(line for line in message.splitlines()
                    if "decoder/layers_0/mlp/wi_0/kernel" in line)
  assert "expected (16, 32)" in wrong_line and "found (16, 30)" in wrong_line


def test_unexpected_array_is_named(tmp_path):
  state = _hf_state()
  state["encoder.block.0.layer.0.SelfAttention.extra.weight"] = np.ones((3, 4), np.float32)
  with pytest.raises(CheckpointMismatchError) as info:
    load_t5(_write_hf(tmp_path / "hf", state))
  assert info.value.unexpected == ["encoder.block.0.layer.0.SelfAttention.extra.weight"]
  assert info.value.missing == [] and info.value.mismatched == []
  assert "(3, 4)" in str(info.value)


def test_non_float_array_is_refused(tmp_path):
  state = _hf_state()
  state["encoder.final_layer_norm.weight"] = np.ones(16, np.int32)
  with pytest.raises(CheckpointMismatchError) as info:
    load_t5(_write_hf(tmp_path / "hf", state))
  assert info.value.mismatched == ["encoder/encoder_norm/scale"]
  assert "int32" in str(info.value)


def test_override_that_changes_shapes_is_reported(tmp_path):
  with pytest.raises(CheckpointMismatchError) as info:
    load_t5(_write_hf(tmp_path / "hf", _hf_state()), mlp_dim=64)
  assert len(info.value.mismatched) == 3 * (CONFIG.num_encoder_layers + CONFIG.num_decoder_layers)


def _t5x_params(seed=0) -> dict:
  rng = np.random.RandomState(seed)
  return {p: rng.standard_normal(s.shape).astype(np.float32)
          for p, s in expected_param_shapes(CONFIG).items()}


def test_t5x_missing_unexpected_and_misshaped_in_one_error(tmp_path):
  flat = _t5x_params()
  del flat[("decoder", "layers_1", "mlp", "wo", "kernel")]
  flat[("encoder", "layers_0", "mlp", "wo", "kernel")] = np.zeros((32, 8), np.float32)
  flat[("encoder", "layers_0", "mlp", "extra", "kernel")] = np.zeros((2, 2), np.float32)
  ckpt = tmp_path / "checkpoint_1"
  ckpt.mkdir()
  contents = {"version": 3, "optimizer": {"target": unflatten_dict(flat),
                                          "state": {"step": np.int32(1)}}}
  (ckpt / "checkpoint").write_bytes(flax.serialization.msgpack_serialize(contents))
  with pytest.raises(CheckpointMismatchError) as info:
    load_t5(tmp_path, relative_attention_max_distance=20)
  err = info.value
  assert err.missing == ["decoder/layers_1/mlp/wo/kernel"]
  assert err.mismatched == ["encoder/layers_0/mlp/wo/kernel"]
  assert err.unexpected == ["encoder/layers_0/mlp/extra/kernel"]
  assert str(ckpt / "checkpoint") in str(err)
  assert "found (32, 8)" in str(err) and "expected (32, 16)" in str(err)


def test_t5x_missing_zarr_directory_is_named(tmp_path):
  flat = _t5x_params()
  flat[("token_embedder", "embedding")] = {
      "driver": "zarr", "kvstore": {"driver": "file", "path": "target.token_embedder.embedding"}}
  (tmp_path / "checkpoint").write_bytes(flax.serialization.msgpack_serialize(
      {"version": 3, "optimizer": {"target": unflatten_dict(flat)}}))
  with pytest.raises(CheckpointError, match="target.token_embedder.embedding"):
    load_t5(tmp_path)


class _Payload:
  """Pickles to a program that creates `marker` when unpickled."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (open, (self.marker, "w"))


@pytest.mark.parametrize("name,form", [("pytorch_model.bin", "dir"),
                                       ("pytorch_model.bin", "file"),
                                       ("weights.pt", "file"),
                                       ("model.ckpt", "dir")])
def test_pickle_is_refused_without_unpickling(tmp_path, name, form):
  marker = tmp_path / "unpickled.marker"
  directory = tmp_path / "hf"
  directory.mkdir()
  (directory / "config.json").write_text(json.dumps(HF_CONFIG))
  payload = pickle.dumps(_Payload(marker))
  # A live payload (it calls `open` on load), checked without running it.
  assert any(op.name == "REDUCE" for op, _, _ in pickletools.genops(payload))
  (directory / name).write_bytes(payload)
  with pytest.raises(CheckpointError) as info:
    load_t5(directory if form == "dir" else directory / name)
  assert "safetensors" in str(info.value) and "save_pretrained" in str(info.value)
  assert name in str(info.value)
  assert not marker.exists()


def test_safetensors_preferred_over_pickle_beside_it(tmp_path):
  marker = tmp_path / "unpickled.marker"
  directory = _write_hf(tmp_path / "hf", _hf_state())
  (directory / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
  load_t5(directory)
  assert not marker.exists()


def test_nonexistent_path(tmp_path):
  missing = tmp_path / "no" / "such" / "checkpoint_5"
  with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
    load_t5(missing)


def test_remote_path_is_refused_clearly():
  with pytest.raises(CheckpointError, match="copy the checkpoint"):
    load_t5("gs://t5-data/pretrained_models/t5x/t5_1_1_small/checkpoint_1000000")


def test_unknown_override(tmp_path):
  directory = _write_hf(tmp_path / "hf", _hf_state())
  with pytest.raises(TypeError, match=r"'num_head' \(did you mean 'num_heads'\?\)"):
    load_t5(directory, num_head=4)
  with pytest.raises(TypeError, match="bogus"):
    load_t5(directory, dropout_rate=0.0, bogus=1)


@pytest.mark.parametrize("broken", ["model.safetensors", "config.json", "index", "t5x"])
def test_unreadable_files_are_named(tmp_path, broken):
  directory = _write_hf(tmp_path / "hf", _hf_state())
  if broken == "index":
    index = {"weight_map": {"x": "a.safetensors"}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    culprit = "a.safetensors"
  elif broken == "t5x":
    directory = tmp_path / "checkpoint_2"
    directory.mkdir()
    (directory / "checkpoint").write_bytes(b"\x85not msgpack at all")
    culprit = str(directory / "checkpoint")
  else:
    (directory / broken).write_bytes(b"\x00\xffgarbage")
    culprit = str(directory / broken)
  with pytest.raises(CheckpointError, match=re.escape(culprit)):
    load_t5(directory)


def test_unrecognised_directory(tmp_path):
  (tmp_path / "notes.txt").write_text("hello")
  with pytest.raises(CheckpointError, match="notes.txt"):
    load_t5(tmp_path)


def test_safetensors_without_config(tmp_path):
  save_file(_hf_state(), str(tmp_path / "model.safetensors"))
  with pytest.raises(CheckpointError, match="config.json"):
    load_t5(tmp_path)
