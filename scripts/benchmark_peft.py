"""PEFT's side of the benchmark, and the checks that both sides compute the same function:
transformers' T5 holding our weights, wrapped by PEFT prompt tuning; its train step, its
`generate` against our greedy decoding, and its peak memory in a fresh process."""

from __future__ import annotations

from benchmark_harness import (model_config, peak_rss_bytes, random_tokens, timed, torch_device,
                               torch_dtype, torch_sync)

# The check, before anything is timed, that both sides compute the same function on the same
# weights and batch: relative difference of the mean loss, and relative L2 difference of the
# logits at the real target positions (the logits are what tells a wrong model apart: with random
# weights every model's loss is near log(vocab)). float32: the two agree to float rounding
# (measured 3e-7 to 2e-6 on the logits at tiny, small, base, embedded). bfloat16: each side
# rounds activations at other points, and PyTorch's loss is itself a bfloat16 number (steps of
# 0.06 near 10.9); measured on a CPU, logits 0.9% (tiny), 1.6% (small), 1.8% (base), 1.0%
# (embedded), loss 0.2-0.4%. tf32 (float32 on a GPU, see setup_torch) is taken as loose as
# bfloat16. A wrong model is far outside: a prompt shifted by uniform[-0.5, 0.5] noise moves the
# logits by 0.40-0.53 (0.20 on the shipped embedded model, whose 20-token prompt is short), a
# zero prompt by 0.50-1.12, other weights ~1.4.
TOLERANCE = {"float32": {"loss": 1e-4, "logits": 1e-3},
             "bfloat16": {"loss": 2e-2, "logits": 1e-1},
             "tf32": {"loss": 2e-2, "logits": 1e-1}}


def peft_config(prompt_len: int):
  import peft
  return peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=prompt_len,
                                 num_transformer_submodules=1)


def hf_t5_random(config, dtype: str):
  """transformers' T5 with random weights, built on the current torch device, laid out as
  `from_pretrained` lays out our checkpoints: one embedding table for encoder and decoder, and
  (T5 1.1) a separate lm_head; transformers 5 would tie the lm_head to the embedding."""
  import torch
  import transformers

  from softprompt_jax.checkpoints.hf_names import hf_config_dict
  hf = transformers.T5ForConditionalGeneration._from_config(
      transformers.T5Config(**hf_config_dict(config)), dtype=torch_dtype(dtype))
  if not config.logits_via_embedding:
    hf.lm_head.weight = torch.nn.Parameter(hf.shared.weight.detach().clone())
  return hf


def hf_models(config, params, prompt, tmp, device, dtype: str):
  """transformers' T5 holding exactly `params` (written and read as safetensors), in `dtype` on
  `device`, wrapped by PEFT prompt tuning whose prompt is set to `prompt`. The base model is cast
  before PEFT wraps it, so PEFT makes its prompt embedding as it does for a bfloat16 model:
  float32, cast to the input embeddings' dtype in the forward pass."""
  import peft
  import torch
  import transformers

  from softprompt_jax.checkpoints.hf_writer import save_hf_t5
  t5_params = {k: v for k, v in params.items() if k != "prompt"}
  save_hf_t5(tmp, t5_params, config)  # float32 files of the stored values: the cast is exact
  hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp, dtype=torch_dtype(dtype))
  hf = hf.to(device).eval()
  model = peft.get_peft_model(hf, peft_config(prompt.shape[0]))
  with torch.no_grad():
    model.prompt_encoder["default"].embedding.weight.copy_(torch.from_numpy(prompt.copy()))
  return model


def torch_inputs(enc, targets, device):
  import numpy as np
  import torch
  return {"input_ids": torch.from_numpy(enc.astype(np.int64)).to(device),
          "attention_mask": torch.from_numpy((enc > 0).astype(np.int64)).to(device),
          "labels": torch.from_numpy(np.where(targets > 0, targets, -100).astype(np.int64))
                    .to(device)}


def peft_train_step(peft_model, enc, targets, device):
  """PEFT prompt tuning with transformers' Adafactor at the paper's settings."""
  from transformers.optimization import Adafactor
  trainable = [p for p in peft_model.parameters() if p.requires_grad]
  optimizer = Adafactor(trainable, lr=0.3, decay_rate=-0.8, weight_decay=1e-5,
                        clip_threshold=1.0, scale_parameter=False, relative_step=False)
  inputs = torch_inputs(enc, targets, device)
  sync = torch_sync(device)

  def call():
    optimizer.zero_grad()
    loss = peft_model(**inputs).loss
    loss.backward()
    optimizer.step()
    sync()

  peft_model.train()
  return call


def same_function(model, params, batch, peft_model, enc, targets, device, precision: str) -> dict:
  """Both sides' mean token cross-entropy and logits on the benchmark batch before any step,
  and whether they agree within the TOLERANCE of `precision` (`passed`). A control in the same
  run shows that the tolerance tells a wrong model apart: PEFT with its prompt shifted by
  uniform[-0.5, 0.5] noise (the paper's init range) must fall outside it; `passed` requires both.
  """
  import numpy as np
  import torch

  from softprompt_jax import losses
  logits = model.apply({"params": params}, batch["encoder_input_tokens"],
                       batch["decoder_input_tokens"], batch["decoder_target_tokens"])
  ours, _ = losses.t5x_loss(logits, batch["decoder_target_tokens"], z_loss=0.0)
  real = targets > 0
  a = np.asarray(logits, np.float32)[real]
  difference = lambda out: float(np.linalg.norm(a - out) / np.linalg.norm(out))
  inputs = torch_inputs(enc, targets, device)
  peft_model.eval()
  prompt = peft_model.prompt_encoder["default"].embedding.weight
  kept = prompt.detach().clone()
  noise = np.random.RandomState(1).uniform(-0.5, 0.5, tuple(kept.shape)).astype(np.float32)
  with torch.no_grad():
    out = peft_model(**inputs)
    prompt.add_(torch.from_numpy(noise).to(kept.device))
    wrong = peft_model(**inputs).logits.float().cpu().numpy()[real]
    prompt.copy_(kept)
  theirs = out.loss.item()
  tolerance = TOLERANCE[precision]
  result = {"ours": float(ours), "peft": theirs, "peft_loss_dtype": str(out.loss.dtype),
            "relative_difference": abs(float(ours) - theirs) / abs(theirs),
            "logits_relative_difference": difference(out.logits.float().cpu().numpy()[real]),
            "wrong_prompt_logits_relative_difference": difference(wrong),
            "precision": precision, "tolerance": tolerance}
  result["passed"] = bool(result["relative_difference"] <= tolerance["loss"] and
                          result["logits_relative_difference"] <= tolerance["logits"] and
                          result["wrong_prompt_logits_relative_difference"] > tolerance["logits"])
  return result


def greedy_against_generate(model, params, peft_model, enc, s: dict, device) -> dict:
  """Tokens/s of our cached greedy decoding and of PEFT/transformers `generate` (greedy, cache
  on); EOS never stops either side, so both produce exactly `target_len` tokens per row. In
  bfloat16 the two may pick different tokens where random weights leave near-ties."""
  import numpy as np
  import torch

  from softprompt_jax import decoding
  steps = s["target_len"]
  ours_tokens = []

  def ours():
    ours_tokens[:] = [np.asarray(decoding.greedy_decode(model, params, enc, steps, eos_id=-1))]

  inputs = torch_inputs(enc, enc, device)
  theirs_tokens = []

  def theirs():
    with torch.no_grad():
      out = peft_model.generate(input_ids=inputs["input_ids"],
                                attention_mask=inputs["attention_mask"],
                                max_new_tokens=steps, do_sample=False,
                                num_beams=1, eos_token_id=None, use_cache=True)
    theirs_tokens[:] = [out.cpu().numpy()[:, 1:]]  # drop the decoder start token (syncs)

  peft_model.eval()
  result = timed({"ours": ours, "generate": theirs}, s["reps"])
  tokens = enc.shape[0] * steps
  for side in ("ours", "generate"):
    result[side]["tokens_per_s"] = tokens / result[side]["median_s"]
  a, b = ours_tokens[0], theirs_tokens[0]
  result["token_agreement"] = float(np.mean(a[:, :b.shape[1]] == b)) if a.shape == b.shape else None
  return result


def peft_memory_child(size: str, s: dict) -> dict:
  """PEFT prompt tuning with Adam on its prompt (as ours in the memory table), transformers' T5
  built with random weights straight in s["dtype"] on the PyTorch device."""
  baseline = peak_rss_bytes()
  import peft
  import torch
  device = torch_device(s.get("torch_device"))
  config = model_config(size, s["dtype"])
  with torch.device(device):
    hf = hf_t5_random(config, s["dtype"])
  model = peft.get_peft_model(hf, peft_config(s["prompt_len"]))
  model.train()
  optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
  inputs = torch_inputs(*random_tokens(config, s), device)
  for _ in range(3):
    optimizer.zero_grad()
    model(**inputs).loss.backward()
    optimizer.step()
  torch_sync(device)()
  frozen = [p for p in model.parameters() if not p.requires_grad]
  result = {"peak_rss_bytes": peak_rss_bytes(), "baseline_rss_bytes": baseline,
            "frozen_dtypes": sorted({str(p.dtype).replace("torch.", "") for p in frozen}),
            "frozen_bytes": int(sum(p.numel() * p.element_size() for p in frozen)),
            "trainable_dtypes": sorted({str(p.dtype).replace("torch.", "")
                                        for p in model.parameters() if p.requires_grad})}
  if device.type == "cuda":
    result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    result["peak_source"] = "device: torch.cuda.max_memory_allocated()"
  else:
    result["peak_bytes"], result["peak_source"] = result["peak_rss_bytes"], "host: VmHWM"
  return result
