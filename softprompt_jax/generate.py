"""`softprompt-jax generate`: load a T5 checkpoint (t5x or Hugging Face) and decode some inputs,
greedily, by beam search or by sampling; with no checkpoint, a tiny random model shows the path."""

from __future__ import annotations

import pathlib
import tempfile
import time

import jax
import numpy as np

from softprompt_jax import decoding
from softprompt_jax.checkpoints.hf_writer import save_hf_t5
from softprompt_jax.errors import ConfigError, UsageError
from softprompt_jax.checkpoints.loading import load_t5
from softprompt_jax.run_setup import load_vocabulary
from softprompt_jax.t5 import T5, init_params
from softprompt_jax.t5_config import tiny_config


def run_generate(args) -> int:
  """Loads `args.checkpoint` (or a tiny random model written on the fly) and decodes
  `args.input` with `args.method`, printing timings and the decoded texts."""
  try:
    vocab = load_vocabulary(args.vocab)
  except ConfigError as e:
    raise UsageError(f"--vocab: {e}") from None
  checkpoint = args.checkpoint
  if checkpoint is None:
    checkpoint = _write_tiny_random_checkpoint(pathlib.Path(tempfile.mkdtemp()) / "tiny_t5",
                                               args.seed)
    print(f"no --checkpoint given: wrote a tiny randomly initialised ByT5-style model to "
          f"{checkpoint} (its output is arbitrary bytes; it shows the load-and-decode path)")
  start = time.perf_counter()
  model, params = load_t5(checkpoint, dropout_rate=0.0)
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  print(f"loaded {checkpoint}: {n_params:,} parameters in {time.perf_counter() - start:.1f}s; "
        f"{model.config.num_encoder_layers}+{model.config.num_decoder_layers} layers, "
        f"d_model {model.config.emb_dim}")
  tokens = vocab.encode_batch(args.input, max_length=args.max_input_length)
  start = time.perf_counter()
  if args.method == "beam":
    out = decoding.beam_search(model, params, tokens, args.max_length, num_beams=args.num_beams)
  elif args.method == "sample":
    out = decoding.sample_decode(model, params, tokens, args.max_length,
                                 rng=jax.random.PRNGKey(args.seed), temperature=args.temperature,
                                 top_k=args.top_k, top_p=args.top_p)
  else:
    out = decoding.greedy_decode(model, params, tokens, args.max_length)
  out = np.asarray(out)
  print(f"{args.method} decoding of {len(args.input)} inputs took "
        f"{time.perf_counter() - start:.1f}s (compilation included)")
  for text, ids in zip(args.input, out):
    print(f"  {text!r} -> {vocab.decode(ids)!r}  ids={ids.tolist()}")
  return 0


def _write_tiny_random_checkpoint(directory: pathlib.Path, seed: int) -> pathlib.Path:
  config = tiny_config("byt5", vocab_size=384, emb_dim=32, mlp_dim=64, num_decoder_layers=1)
  params, _ = init_params(T5(config), jax.random.PRNGKey(seed))
  return save_hf_t5(directory, params, config)
