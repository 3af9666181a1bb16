"""`softprompt-jax convert`: t5x -> Hugging Face and back, against transformers and the layout of
the checkpoint t5x itself wrote (tests/testdata)."""

import json

import flax.serialization
import jax.numpy as jnp
import msgpack
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from softprompt_jax.checkpoints.convert import convert_checkpoint
from softprompt_jax.checkpoints.loading import load_t5
from softprompt_jax.cli import main

import oracles

T5X_CHECKPOINT = ("t5x_t5_1_1_tiny", "checkpoint_3")


def _flat(params):
  return {"/".join(k): np.asarray(v) for k, v in flatten_dict(params).items()}


def _assert_same_params(ours, reference):
  ours, reference = _flat(ours), _flat(reference)
  assert sorted(ours) == sorted(reference)
  for name, value in reference.items():
    np.testing.assert_array_equal(ours[name], value, err_msg=name)


def _safetensors(directory):
  from safetensors.numpy import load_file
  return load_file(str(directory / "model.safetensors"))


def _one_error_line(capsys) -> str:
  lines = capsys.readouterr().err.splitlines()
  assert len(lines) == 1 and lines[0].startswith("softprompt-jax convert: error: "), lines
  return lines[0]


def test_t5x_checkpoint_to_hf_loads_in_transformers_with_our_logits(testdata, tmp_path, capsys):
  transformers = pytest.importorskip("transformers")
  source = testdata.joinpath(*T5X_CHECKPOINT)
  assert main(["convert", "--from", "t5x", "--to", "hf", str(source), str(tmp_path / "hf")]) == 0
  assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'hf'}"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no staging directory left

  hf_model = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
  model, params = load_t5(source, dropout_rate=0.0)
  enc, dec = oracles.random_batch(seed=2, input_len=12, target_len=5, vocab_size=32128)
  ours = np.asarray(model.apply({"params": params}, jnp.asarray(enc), jnp.asarray(dec)))
  ref = oracles.hf_logits(hf_model, enc, dec)
  np.testing.assert_allclose(ours, ref, atol=1e-5 * np.abs(ref).max())
  # And the directory reads back here as the same weights.
  _assert_same_params(load_t5(tmp_path / "hf")[1], params)


@pytest.mark.parametrize("family", ["t5_1_1", "t5_1_0"])
def test_hf_to_t5x_and_back_is_exact(testdata, tmp_path, family):
  hf_model = oracles.tiny_hf_t5(family, seed=5)
  source = oracles.save_hf(hf_model, tmp_path / "hf")
  config, reference = oracles.hf_to_ours(hf_model)
  t5x_dir = tmp_path / "t5x" / "checkpoint_7"
  written, notes = convert_checkpoint(source, t5x_dir, to="t5x", step=7)
  assert written == t5x_dir
  # The tiny model's relative_attention_max_distance (20) is no array's shape: said, not lost
  # silently.
  assert len(notes) == 1 and "relative_attention_max_distance (20" in notes[0], notes

  model, params = load_t5(t5x_dir, relative_attention_max_distance=20, dropout_rate=0.0)
  assert model.config == config
  _assert_same_params(params, reference)
  _assert_t5x_layout(t5x_dir, testdata.joinpath(*T5X_CHECKPOINT), step=7)

  written, notes = convert_checkpoint(t5x_dir, tmp_path / "hf_again", to="hf", source_format="t5x")
  original, again = _safetensors(source), _safetensors(written)
  for name, value in again.items():
    np.testing.assert_array_equal(value, original[name], err_msg=name)
  assert set(original) - set(again) <= {"encoder.embed_tokens.weight",
                                        "decoder.embed_tokens.weight", "lm_head.weight"}
  assert ("lm_head.weight" in again) == (family == "t5_1_1")  # T5 1.0's output is the embedding
  assert json.loads((written / "config.json").read_text())["tie_word_embeddings"] == (
      family == "t5_1_0")


def _assert_t5x_layout(written, real, step):
  """The written checkpoint is laid out as the one t5x wrote: the same msgpack structure, array
  leaves of the same kinds (zarr spec or inline) and zarr directories of the same names."""
  def tree(directory):
    return msgpack.unpackb((directory / "checkpoint").read_bytes(), raw=False,
                           ext_hook=lambda code, data: ("ext", code))

  def leaves(target):  # {param path: its leaf}, a tensorstore spec counted as one leaf
    return flatten_dict(target, is_leaf=lambda _, v: isinstance(v, dict) and "driver" in v)

  ours, theirs = tree(written), tree(real)
  assert ours["version"] == theirs["version"] == 3
  assert set(ours["optimizer"]) == {"target", "state"}
  assert flatten_dict(ours["optimizer"]["state"]) == {("step",): ("ext", 1)}
  restored = flax.serialization.msgpack_restore((written / "checkpoint").read_bytes())
  assert restored["optimizer"]["state"]["step"] == step

  our_leaves = leaves(ours["optimizer"]["target"])
  their_leaves = leaves(theirs["optimizer"]["target"])
  kind = lambda leaf: "zarr" if isinstance(leaf, dict) else "inline"
  shared = set(our_leaves) & set(their_leaves)  # the tiny models differ in depth
  assert len(shared) > 20
  assert {k: kind(our_leaves[k]) for k in shared} == {k: kind(their_leaves[k]) for k in shared}
  for path, spec in our_leaves.items():
    if kind(spec) == "zarr":
      name = ".".join(("target",) + path)
      assert spec["kvstore"] == {"driver": "file", "path": name}
      assert set(spec["metadata"]) == set(their_leaves[("token_embedder", "embedding")]["metadata"])
      assert (written / name / ".zarray").is_file()


def test_convert_refuses_what_it_cannot_do_in_one_line(testdata, tmp_path, capsys):
  source = str(testdata.joinpath(*T5X_CHECKPOINT))
  full = tmp_path / "full"
  full.mkdir()
  (full / "keep.txt").write_text("mine")
  assert main(["convert", "--to", "hf", source, str(full)]) == 2
  assert "not empty" in _one_error_line(capsys)
  assert (full / "keep.txt").read_text() == "mine"
  assert main(["convert", "--from", "hf", "--to", "t5x", source, str(tmp_path / "a")]) == 2
  assert "is a t5x checkpoint, not --from hf" in _one_error_line(capsys)
  assert main(["convert", "--to", "t5x", source, str(tmp_path / "b")]) == 2
  assert "already a t5x checkpoint" in _one_error_line(capsys)
  assert main(["convert", "--to", "hf", str(tmp_path / "nothing"), str(tmp_path / "c")]) == 2
  assert "no checkpoint at" in _one_error_line(capsys)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]
