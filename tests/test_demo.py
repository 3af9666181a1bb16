"""The shipped tiny T5: checksums, loading, and a shortened demo run."""

import json

import pytest

from softprompt_jax import pretrained
from softprompt_jax.cli import main


def test_shipped_checkpoint_matches_its_checksums_and_loads(tmp_path):
  pretrained.verify_checksums()
  model, params = pretrained.load_tiny()
  manifest = pretrained.read_manifest()
  assert model.config.vocab_size == 384 and params["token_embedder"]["embedding"].shape[0] == 384
  assert manifest["sha256"]
  # A changed byte is caught, naming the file.
  copy = tmp_path / "tiny"
  copy.mkdir()
  for f in pretrained.TINY_MODEL_DIR.iterdir():
    (copy / f.name).write_bytes(f.read_bytes())
  weights = copy / "model.safetensors"
  data = bytearray(weights.read_bytes())
  data[-1] ^= 1
  weights.write_bytes(bytes(data))
  with pytest.raises(pretrained.ChecksumError, match="model.safetensors"):
    pretrained.verify_checksums(copy)


def test_short_demo_completes_and_writes_its_files(tmp_path):
  run = tmp_path / "demo"
  assert main(["demo", "--run_dir", str(run), "--steps", "6", "--model_tuning_steps", "3",
               "--eval_examples", "20"]) == 0
  summary = json.loads((run / "summary.json").read_text())
  for key in ("no_prompt", "instruction", "prompt_tuning", "model_tuning"):
    assert 0.0 <= summary[key] <= 1.0
  assert summary["trainable_parameters"]["prompt_tuning"] == 20 * 128
  for name in ("prompt.npy", "curves.png", "interpretation.json"):
    assert (run / name).stat().st_size > 0
