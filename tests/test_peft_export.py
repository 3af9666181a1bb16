"""`export` as a PEFT adapter that PyTorch users load on their own: its base model named
(AutoPeftModelForSeq2SeqLM loads it from the adapter alone), and PEFT's `generate` with it
decoding what our greedy decoder decodes."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softprompt_jax import decoding, prompts
from softprompt_jax.checkpoints.loading import load_t5
from softprompt_jax.checkpoints.state import PromptCheckpoints
from softprompt_jax.cli import main
from softprompt_jax.model_spec import frozen_model
from softprompt_jax.prompted_t5 import PromptedT5, make_prompted_params
from softprompt_jax.run_layout import CHECKPOINT_SUBDIR, PROMPT_FILE

import oracles

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

PROMPT_LENGTH = 3
DECODE_LENGTH = 6


def _run_dir(directory, prompt, config, checkpoint=None):
  """A run directory as `export` reads it: its best prompt, and a checkpoint whose metadata
  names the frozen model (`checkpoint`: what frozen_model.checkpoint was) and its config."""
  directory.mkdir()
  prompts.save_npy(directory / PROMPT_FILE, prompt)
  meta = {"model": frozen_model(checkpoint=checkpoint).describe(), "config": config.to_dict()}
  checkpoints = PromptCheckpoints(directory / CHECKPOINT_SUBDIR)
  try:
    checkpoints.save(1, {"trainable": {"prompt": {"prompt": prompt}}}, {"position": 0}, meta)
  finally:
    checkpoints.close()
  return directory


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(adapter exported from a run on a local Hugging Face T5, that directory, the prompt)."""
  where = tmp_path_factory.mktemp("peft_export")
  hf_dir = oracles.save_hf(oracles.tiny_hf_t5("t5_1_1", seed=11), where / "hf_t5")
  model, _ = load_t5(hf_dir, dropout_rate=0.0)
  prompt = np.random.RandomState(1).uniform(-1, 1, (PROMPT_LENGTH, model.config.emb_dim))
  run = _run_dir(where / "run", prompt.astype(np.float32), model.config, checkpoint=str(hf_dir))
  assert main(["export", "--model_dir", str(run), "--out", str(where / "adapter")]) == 0
  return where / "adapter", hf_dir, prompt.astype(np.float32)


def _adapter_config(adapter):
  return json.loads((adapter / "adapter_config.json").read_text())


def test_adapter_names_the_runs_hf_model_and_auto_peft_loads_it(exported, monkeypatch):
  adapter, hf_dir, prompt = exported
  assert _adapter_config(adapter)["base_model_name_or_path"] == os.path.abspath(hf_dir)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # PEFT would otherwise look for a tokenizer online
  monkeypatch.chdir(adapter.parent.parent)  # the absolute path, not the working directory, counts
  loaded = peft.AutoPeftModelForSeq2SeqLM.from_pretrained(str(adapter)).eval()
  np.testing.assert_array_equal(
      loaded.prompt_encoder["default"].embedding.weight.detach().numpy(), prompt)

  model, t5_params = load_t5(hf_dir, dropout_rate=0.0)
  net = PromptedT5(model.config, prompt_length=PROMPT_LENGTH)
  params = make_prompted_params(net, t5_params, jax.random.PRNGKey(0), prompt)
  enc, dec = oracles.random_batch(seed=3, input_len=12, target_len=DECODE_LENGTH)
  with torch.no_grad():
    ref = loaded(input_ids=torch.tensor(enc, dtype=torch.long),
                 attention_mask=torch.tensor(enc > 0, dtype=torch.long),
                 decoder_input_ids=torch.tensor(dec, dtype=torch.long)).logits.numpy()
  ours = np.asarray(net.apply({"params": params}, jnp.asarray(enc), jnp.asarray(dec)))
  np.testing.assert_allclose(ours, ref, atol=1e-4 * np.abs(ref).max())

  # PEFT's generate with the adapter decodes what our greedy decoder decodes, token for token.
  peft_tokens = oracles.hf_greedy(loaded, enc, DECODE_LENGTH)
  our_tokens = np.asarray(decoding.greedy_decode(net, params, enc, DECODE_LENGTH))
  np.testing.assert_array_equal(our_tokens, peft_tokens)
  assert len(np.unique(our_tokens)) > 2  # a real sequence, not one token repeated
  # ... and the prompt is what decides them: the bare model decodes otherwise.
  assert not np.array_equal(oracles.hf_greedy(loaded.get_base_model(), enc, DECODE_LENGTH),
                            peft_tokens)


def test_base_model_flag(exported, tmp_path, monkeypatch, capsys):
  adapter, hf_dir, prompt = exported
  run = _run_dir(tmp_path / "run", prompt, load_t5(hf_dir)[0].config)  # no checkpoint: random T5

  def export(out, *base_model):
    code = main(["export", "--model_dir", str(run), "--out", str(tmp_path / out), *base_model])
    return code, capsys.readouterr().err

  code, err = export("plain")
  assert code == 0 and _adapter_config(tmp_path / "plain")["base_model_name_or_path"] is None
  assert "--base_model" in err and err.startswith("note: ")  # says how to set it

  assert export("hub", "--base_model", "google/t5-v1_1-small") == (0, "")  # a hub id, as given
  assert _adapter_config(tmp_path / "hub")["base_model_name_or_path"] == "google/t5-v1_1-small"

  monkeypatch.chdir(hf_dir.parent)
  assert export("local", "--base_model", f"./{hf_dir.name}")[0] == 0  # a local path, absolute
  assert _adapter_config(tmp_path / "local")["base_model_name_or_path"] == os.path.abspath(hf_dir)

  other = tmp_path / "wider_t5"
  other.mkdir()
  (other / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 999}))
  for out, base, expected in [("missing", "./no_such_model", "no such directory"),
                              ("not_hf", str(tmp_path), "not a Hugging Face model directory"),
                              ("wider", str(other), "has d_model 999 but the run's model is 16"),
                              ("p.npy", "google/t5-v1_1-small", "plain .npy prompt")]:
    code, err = export(out, "--base_model", base)
    assert code == 2 and len(err.splitlines()) == 1 and expected in err, err
    assert not os.path.exists(tmp_path / out)
