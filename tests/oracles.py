"""Independent references for tests: tiny random Hugging Face (PyTorch) T5 models.

Everything here imports torch/transformers lazily, so only the tests that use an oracle pay for it.
"""

from __future__ import annotations

import pathlib

import numpy as np


def tiny_hf_t5(family: str = "t5_1_1", seed: int = 0, *, vocab_size: int = 100,
               num_layers: int = 2, num_decoder_layers: int = 3):
  """A random transformers T5ForConditionalGeneration in eval mode (dropout off).

  family "t5_1_1": gated GELU, untied output layer; "t5_1_0": ReLU, logits from the scaled
  embedding. Encoder and decoder depths differ on purpose, as in ByT5.
  """
  import torch
  import transformers
  gated = family == "t5_1_1"
  cfg = transformers.T5Config(
      vocab_size=vocab_size, d_model=16, d_kv=8, d_ff=32, num_layers=num_layers,
      num_decoder_layers=num_decoder_layers, num_heads=2, relative_attention_num_buckets=8,
      relative_attention_max_distance=20, feed_forward_proj="gated-gelu" if gated else "relu",
      tie_word_embeddings=not gated, dropout_rate=0.0, decoder_start_token_id=0,
      pad_token_id=0, eos_token_id=1)
  torch.manual_seed(seed)
  model = transformers.T5ForConditionalGeneration(cfg).eval()
  if gated:
    # transformers >= 5 ties lm_head to shared.weight; real T5 1.1 checkpoints have their own.
    model.lm_head.weight = torch.nn.Parameter(torch.randn(vocab_size, 16) * 0.5)
  return model


def save_hf(model, directory: pathlib.Path, num_shards: int = 1) -> pathlib.Path:
  """Writes a Hugging Face directory: config.json + safetensors, sharded with an index file.

  Written by hand (not save_pretrained) so that an untied lm_head is kept, as in the published
  T5 1.1 checkpoints whose config says `tie_word_embeddings: false`.
  """
  import json

  from safetensors.numpy import save_file
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  untied = model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
  config = json.loads(model.config.to_json_string())
  config.pop("scale_decoder_outputs", None)
  config["tie_word_embeddings"] = not untied
  (directory / "config.json").write_text(json.dumps(config, indent=2))
  state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  if not untied:
    state.pop("lm_head.weight", None)
  names = sorted(state)
  if num_shards == 1:
    save_file(state, str(directory / "model.safetensors"))
    return directory
  weight_map = {}
  for i in range(num_shards):
    shard = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
    part = {n: state[n] for n in names[i::num_shards]}
    save_file(part, str(directory / shard))
    weight_map.update({n: shard for n in part})
  index = {"metadata": {"total_size": int(sum(a.nbytes for a in state.values()))},
           "weight_map": weight_map}
  (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
  return directory


def hf_logits(model, encoder_input_tokens: np.ndarray,
              decoder_input_tokens: np.ndarray) -> np.ndarray:
  """float32 logits [B, S, V] from the PyTorch reference; padding (id 0) masked as T5 does."""
  import torch
  with torch.no_grad():
    out = model(input_ids=torch.tensor(encoder_input_tokens, dtype=torch.long),
                attention_mask=torch.tensor(encoder_input_tokens > 0, dtype=torch.long),
                decoder_input_ids=torch.tensor(decoder_input_tokens, dtype=torch.long))
  return out.logits.float().numpy()


def random_batch(seed: int, batch: int = 3, input_len: int = 40, target_len: int = 7,
                 vocab_size: int = 100):
  """Token batches with real padding: row 1 padded from 30, row 2 from 5 (when long enough)."""
  rng = np.random.RandomState(seed)
  enc = rng.randint(2, vocab_size, size=(batch, input_len)).astype(np.int32)
  if batch > 1:
    enc[1, min(30, input_len - 1):] = 0
  if batch > 2:
    enc[2, min(5, input_len - 1):] = 0
  dec = rng.randint(2, vocab_size, size=(batch, target_len)).astype(np.int32)
  dec[:, 0] = 0
  return enc, dec


def hf_to_ours(model):
  """(T5Config, params) holding exactly the weights of a transformers T5 model, in memory."""
  import json

  from softprompt_jax.checkpoints.hf_names import config_from_hf, params_from_hf_state
  config = json.loads(model.config.to_json_string())
  config["scale_decoder_outputs"] = model.config.scale_decoder_outputs
  ours = config_from_hf(config, dropout_rate=0.0)
  state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
  if model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr():
    state.pop("lm_head.weight", None)
  return ours, params_from_hf_state(state, ours)


def hf_greedy(model, encoder_input_tokens: np.ndarray, max_new_tokens: int) -> np.ndarray:
  """Greedy `generate` tokens [B, max_new_tokens] of a transformers T5 or a PEFT model around
  one: the start token stripped, 0 after EOS (as our decoders return them)."""
  import torch
  # use_cache=False: transformers' generation cache is built for num_layers (the encoder depth)
  # and fails on tiny_hf_t5's deeper decoder; without it each step is a full forward.
  with torch.no_grad():
    out = model.generate(
        input_ids=torch.tensor(encoder_input_tokens, dtype=torch.long),
        attention_mask=torch.tensor(encoder_input_tokens > 0, dtype=torch.long),
        do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, use_cache=False).numpy()
  assert (out[:, 0] == 0).all(), "generate should start from decoder_start_token_id 0"
  tokens = np.zeros((len(encoder_input_tokens), max_new_tokens), np.int64)
  tokens[:, :out.shape[1] - 1] = out[:, 1:]
  return tokens
