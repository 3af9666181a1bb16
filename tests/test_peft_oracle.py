"""Prompt tuning against PEFT on transformers' PyTorch T5: same weights, same prompt values."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softprompt_jax import losses, peft_interop
from softprompt_jax.checkpoints.checkpoint_reader import CheckpointError
from softprompt_jax.prompted_t5 import PromptedT5, make_prompted_params

import oracles

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

PROMPT_LENGTH = 5


def _rel_close(ours, ref, rtol=1e-4):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  scale = max(np.abs(ref).max(), 1e-12)
  assert np.abs(ours - ref).max() / scale <= rtol, (np.abs(ours - ref).max(), scale)


@pytest.fixture(scope="module", params=["t5_1_1", "t5_1_0"])
def setup(request):
  hf_model = oracles.tiny_hf_t5(request.param, seed=3)
  config, t5_params = oracles.hf_to_ours(hf_model)
  rng = np.random.RandomState(0)
  prompt = rng.uniform(-0.5, 0.5, (PROMPT_LENGTH, config.emb_dim)).astype(np.float32)
  peft_config = peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM",
                                        num_virtual_tokens=PROMPT_LENGTH,
                                        num_transformer_submodules=1)
  peft_model = peft.get_peft_model(hf_model, peft_config)
  with torch.no_grad():
    peft_model.prompt_encoder["default"].embedding.weight.copy_(torch.tensor(prompt))
  model = PromptedT5(config, prompt_length=PROMPT_LENGTH)
  params = make_prompted_params(model, t5_params, jax.random.PRNGKey(0), prompt)
  return hf_model, peft_model, model, params, prompt


def _peft_forward(peft_model, enc, targets):
  labels = torch.tensor(np.where(targets > 0, targets, -100), dtype=torch.long)
  return peft_model(input_ids=torch.tensor(enc, dtype=torch.long),
                    attention_mask=torch.tensor(enc > 0, dtype=torch.long), labels=labels)


def test_logits_loss_and_prompt_gradient_match_peft(setup):
  _, peft_model, model, params, _ = setup
  enc, _ = oracles.random_batch(seed=5)
  targets = np.random.RandomState(6).randint(2, 100, (3, 6)).astype(np.int32)
  targets[0, 4:] = 0  # padded targets are excluded from both losses
  decoder_inputs = np.concatenate([np.zeros((3, 1), np.int32), targets[:, :-1]], axis=1)

  peft_model.zero_grad()
  out = _peft_forward(peft_model, enc, targets)
  out.loss.backward()
  ref_grad = peft_model.prompt_encoder["default"].embedding.weight.grad.numpy()

  def loss_of_prompt(prompt):
    p = {**params, "prompt": {"prompt": prompt}}
    logits = model.apply({"params": p}, jnp.asarray(enc), jnp.asarray(decoder_inputs),
                         jnp.asarray(targets))
    loss, _ = losses.t5x_loss(logits, jnp.asarray(targets), z_loss=0.0)
    return loss, logits

  # Jitted, as the train step runs it: one compile (~2 s) instead of the backward pass
  # dispatched and compiled op by op (~13 s).
  (loss, logits), grad = jax.jit(jax.value_and_grad(loss_of_prompt, has_aux=True))(
      params["prompt"]["prompt"])
  real = targets > 0
  _rel_close(np.asarray(logits)[real], out.logits.detach().numpy()[real])
  _rel_close(loss, out.loss.item())
  _rel_close(grad, ref_grad)
  assert np.abs(ref_grad).max() > 0


def test_exported_adapter_loads_in_peft_and_reproduces_our_logits(setup, tmp_path):
  hf_model, _, model, params, prompt = setup
  config = model.config
  trained = prompt + 0.25  # any values that differ from the PEFT model already in memory
  peft_interop.save_peft_adapter(tmp_path / "adapter", trained,
                                 num_layers=config.num_encoder_layers,
                                 num_heads=config.num_heads)
  # A fresh copy of the same base weights, as a PEFT user would load from disk.
  fresh_hf = oracles.tiny_hf_t5("t5_1_0" if config.logits_via_embedding else "t5_1_1", seed=3)
  loaded = peft.PeftModel.from_pretrained(fresh_hf, str(tmp_path / "adapter"))
  np.testing.assert_array_equal(
      loaded.prompt_encoder["default"].embedding.weight.detach().numpy(), trained)
  enc, dec = oracles.random_batch(seed=7)
  with torch.no_grad():
    ref = loaded(input_ids=torch.tensor(enc, dtype=torch.long),
                 attention_mask=torch.tensor(enc > 0, dtype=torch.long),
                 decoder_input_ids=torch.tensor(dec, dtype=torch.long)).logits.numpy()
  ours = model.apply({"params": {**params, "prompt": {"prompt": jnp.asarray(trained)}}},
                     jnp.asarray(enc), jnp.asarray(dec))
  _rel_close(ours, ref)
  np.testing.assert_array_equal(peft_interop.load_peft_adapter(tmp_path / "adapter"), trained)


def test_adapter_written_by_peft_loads_here(setup, tmp_path):
  _, peft_model, _, _, prompt = setup
  peft_model.save_pretrained(str(tmp_path / "by_peft"))
  np.testing.assert_array_equal(peft_interop.load_peft_adapter(tmp_path / "by_peft"), prompt)


def test_adapter_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="adapter_config.json"):
    peft_interop.load_peft_adapter(tmp_path)
  (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
  with pytest.raises(ValueError, match="LORA"):
    peft_interop.load_peft_adapter(tmp_path)


def test_two_submodule_adapter_reads_as_its_encoder_half(setup, tmp_path):
  """PEFT's seq2seq default keeps 2 prompts, [encoder; decoder], but its T5 prompt tuning
  prepends only the first to the encoder input: the decoder half changes nothing PEFT computes,
  and the first half alone gives PEFT's logits here."""
  _, _, model, params, _ = setup
  family = "t5_1_0" if model.config.logits_via_embedding else "t5_1_1"
  two = peft.get_peft_model(oracles.tiny_hf_t5(family, seed=3), peft.PromptTuningConfig(
      task_type="SEQ_2_SEQ_LM", num_virtual_tokens=PROMPT_LENGTH)).eval()
  assert two.peft_config["default"].num_transformer_submodules == 2  # PEFT's default
  rng = np.random.RandomState(8)
  rows = rng.uniform(-0.5, 0.5, (2 * PROMPT_LENGTH, model.config.emb_dim)).astype(np.float32)
  weight = two.prompt_encoder["default"].embedding.weight
  with torch.no_grad():
    weight.copy_(torch.tensor(rows))
  two.save_pretrained(str(tmp_path / "two"))
  encoder_half = peft_interop.load_peft_adapter(tmp_path / "two")
  np.testing.assert_array_equal(encoder_half, rows[:PROMPT_LENGTH])

  enc, dec = oracles.random_batch(seed=9)
  ref = oracles.hf_logits(two, enc, dec)
  ours = model.apply({"params": {**params, "prompt": {"prompt": jnp.asarray(encoder_half)}}},
                     jnp.asarray(enc), jnp.asarray(dec))
  _rel_close(ours, ref)
  tokens = oracles.hf_greedy(two, enc[:, :12], 4)
  with torch.no_grad():  # another decoder half: PEFT's logits and generate stay the same
    weight[PROMPT_LENGTH:] = torch.tensor(rng.uniform(-9, 9, rows[PROMPT_LENGTH:].shape))
  np.testing.assert_array_equal(oracles.hf_logits(two, enc, dec), ref)
  np.testing.assert_array_equal(oracles.hf_greedy(two, enc[:, :12], 4), tokens)


@pytest.mark.parametrize("fields,message", [
    ({"num_transformer_submodules": 3}, "num_transformer_submodules is 3"),
    ({"num_transformer_submodules": 2, "task_type": "CAUSAL_LM"},
     "Re-create the PEFT config with task_type='SEQ_2_SEQ_LM' and num_transformer_submodules=1"),
    ({"num_transformer_submodules": 2}, r"shape \(5, 4\).*expected 10 rows"),
])
def test_adapter_layouts_that_hold_no_encoder_prompt_are_refused(tmp_path, fields, message):
  peft_interop.save_peft_adapter(tmp_path, np.ones((5, 4), np.float32), num_layers=1,
                                 num_heads=1)
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  (tmp_path / "adapter_config.json").write_text(json.dumps({**config, **fields}))
  with pytest.raises(CheckpointError, match=message) as refused:
    peft_interop.load_peft_adapter(tmp_path)
  assert "adapter_config.json" in str(refused.value) or "adapter_model" in str(refused.value)
  assert "\n" not in str(refused.value)
