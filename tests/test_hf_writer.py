"""Our Hugging Face writer: transformers reads the directory and computes our logits."""

import ast

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softprompt_jax as sj
from softprompt_jax.checkpoints.hf_writer import save_hf_t5
from softprompt_jax.cli import main

import oracles


@pytest.mark.parametrize("family", ["t5_1_1", "t5_1_0"])
def test_written_directory_loads_in_transformers_and_here(tmp_path, family):
  transformers = pytest.importorskip("transformers")
  config = sj.tiny_config(family, vocab_size=100, dropout_rate=0.0)
  params, _ = sj.init_params(sj.T5(config), jax.random.PRNGKey(0))
  save_hf_t5(tmp_path, params, config)
  hf_model = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
  enc, dec = oracles.random_batch(seed=1)
  ours = sj.T5(config).apply({"params": params}, jnp.asarray(enc), jnp.asarray(dec))
  np.testing.assert_allclose(np.asarray(ours), oracles.hf_logits(hf_model, enc, dec), atol=1e-4)
  model, loaded = sj.load_t5(tmp_path, dropout_rate=0.0)
  assert model.config == config
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_generate_command_loads_and_decodes(capsys):
  assert main(["generate", "--input", "abc", "--max_length", "5"]) == 0
  out = capsys.readouterr().out
  assert "loaded" in out and "'abc' ->" in out
  ids_text = out.split("ids=")[-1].strip()
  assert len(ast.literal_eval(ids_text)) == 5
