"""Prompt attention masks (prompt_masks, PromptedT5.prompt_attention, @methods.masked_prompt):
each visibility pattern's matrix over [prompt; input] positions, written out by hand; a masked
pair truly carries nothing (perturbing the key leaves the query's output bitwise unchanged, and
every visible pair does change it); the default builds no mask at all."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softprompt_jax as sj
from softprompt_jax import decoding, prompt_masks
from softprompt_jax import train_step as ts
from softprompt_jax.cli import main
from softprompt_jax.errors import ConfigError
from softprompt_jax.prompted_t5 import (PromptedT5, append, make_prompted_params, prepend,
                                        prompt_index)
from softprompt_jax.t5 import Encoder

CONFIG = sj.tiny_config(dropout_rate=0.0)
P = 2
# Two examples: three input tokens and a pad, and four input tokens.
TOKENS = np.array([[5, 6, 7, 0], [5, 6, 7, 8]], np.int32)

# Example 0 placed first: positions p0 p1 i0 i1 i2 pad; rows are queries, columns keys.
PATTERNS = {
    "full": (prompt_masks.FULL, """
        111110
        111110
        111110
        111110
        111110
        000000"""),
    "prompt_sees_prompt_only": (["prompt->prompt"], """
        110000
        110000
        111110
        111110
        111110
        000000"""),
    "causal_prompt_and_inputs": (["prompt->prompt;causal", "prompt->input"], """
        101110
        111110
        111110
        111110
        111110
        000000"""),
    "causal_prompt_only": (["prompt->prompt;causal"], """
        100000
        110000
        111110
        111110
        111110
        000000"""),
    "prompt_sees_inputs_and_itself": (["prompt->input"], """
        101110
        011110
        111110
        111110
        111110
        000000"""),
    "prompt_sees_itself_only": ([], """
        100000
        010000
        111110
        111110
        111110
        000000"""),
}


def _matrix(text: str) -> np.ndarray:
  return np.array([[c == "1" for c in row.strip()] for row in text.strip().splitlines()])


def _placed_valid(placement: str):
  x_BxTxH = jnp.zeros(TOKENS.shape + (1,))
  _, valid_BxT = {"prepend": prepend, "append": append}[placement](
      x_BxTxH, jnp.asarray(TOKENS > 0), jnp.zeros((2, P, 1)))
  return valid_BxT


@pytest.mark.parametrize("name", PATTERNS)
def test_each_pattern_is_the_matrix_written_out(name):
  kinds, text = PATTERNS[name]
  expected_0 = _matrix(text)
  valid = _placed_valid("prepend")
  mask = np.asarray(prompt_masks.encoder_mask(prompt_index("prepend", valid, P), valid, kinds))
  np.testing.assert_array_equal(mask[0], expected_0)
  # Example 1 has no padding: the same pattern with its last position real.
  expected_1 = expected_0.copy()
  expected_1[5] = expected_1[4]  # position 5 is an input like position 4
  expected_1[:, 5] = expected_1[:, 4]
  np.testing.assert_array_equal(mask[1], expected_1)

  # Appended, the prompt follows each example's last token: the same relations, moved.
  valid = _placed_valid("append")
  index = np.asarray(prompt_index("append", valid, P))
  np.testing.assert_array_equal(index, [[-1, -1, -1, 0, 1, -1], [-1, -1, -1, -1, 0, 1]])
  mask = np.asarray(prompt_masks.encoder_mask(jnp.asarray(index), valid, kinds))
  where_0 = [2, 3, 4, 0, 1, 5]  # appended position j holds prepended position where_0[j]
  np.testing.assert_array_equal(mask[0], expected_0[np.ix_(where_0, where_0)])


def test_kinds_are_checked_and_the_always_on_ones_added():
  assert prompt_masks.canonical(["prompt->input"]) == (
      "input->input", "input->prompt", "prompt->input")
  assert prompt_masks.is_full(["prompt->prompt", "prompt->input"])
  assert not prompt_masks.is_full(["prompt->prompt;causal", "prompt->input"])
  for bad, words in [(["prompt->nothing"], "unknown kind"), ("prompt->input", "a list"),
                     (["prompt->prompt", "prompt->prompt;causal"], "exclude each other")]:
    with pytest.raises(ConfigError, match=words):
      prompt_masks.canonical(bad)


@pytest.fixture(scope="module")
def t5_params():
  return jax.jit(lambda rng: sj.init_params(sj.T5(CONFIG), rng)[0])(jax.random.PRNGKey(0))


def test_a_masked_key_never_reaches_its_query_and_a_visible_one_always_does(t5_params):
  """One encoder layer, so influence is direct: perturbing key position k changes query q's
  output iff the mask lets q see k (or q is k)."""
  config = CONFIG.replace(num_encoder_layers=1)
  encoder_params = {"relpos_bias": t5_params["encoder"]["relpos_bias"],
                    "layers_0": t5_params["encoder"]["layers_0"],
                    "encoder_norm": t5_params["encoder"]["encoder_norm"]}
  valid = _placed_valid("prepend")
  t = valid.shape[1]
  x_BxTxH = jax.random.normal(jax.random.PRNGKey(1), (2, t, CONFIG.emb_dim))
  bump_H = jax.random.normal(jax.random.PRNGKey(2), (CONFIG.emb_dim,))

  @jax.jit
  def influence(mask_BxTxT):
    encode = lambda x: Encoder(config).apply({"params": encoder_params}, x, valid,
                                              deterministic=True, attention_mask_BxTxT=mask_BxTxT)
    # Key k bumped for k < t; k = t bumps nothing: the baseline, from the same computation.
    bumps_KxTxH = jnp.eye(t + 1, t)[:, :, None] * bump_H
    outs_KxBxTxH = jax.vmap(lambda bump_TxH: encode(x_BxTxH + bump_TxH))(bumps_KxTxH)
    changed_KxBxT = jnp.any(outs_KxBxTxH[:t] != outs_KxBxTxH[t:], axis=-1)
    return jnp.transpose(changed_KxBxT, (1, 2, 0))  # [B, query, key]

  for kinds, _ in PATTERNS.values():
    mask = prompt_masks.encoder_mask(prompt_index("prepend", valid, P), valid, kinds)
    changed = np.asarray(influence(mask))
    expected = np.asarray(mask) | np.eye(t, dtype=bool)[None]
    real_q = np.asarray(valid)  # a padded query's output is never read
    np.testing.assert_array_equal(changed[real_q], expected[real_q], err_msg=str(kinds))


def _encoder(model):
  """(params, tokens) -> encoder outputs, compiled once per model."""
  return jax.jit(lambda params, tokens: model.apply({"params": params}, tokens,
                                                     method="encode")[0])


def test_through_the_whole_encoder_a_blind_prompt_ignores_the_inputs(t5_params):
  model = PromptedT5(CONFIG, prompt_length=P, prompt_attention=("prompt->prompt",))
  params = make_prompted_params(model, t5_params, jax.random.PRNGKey(3))
  other = TOKENS.copy()
  other[:, 1] = 9
  encode = _encoder(model)
  a, b = encode(params, TOKENS), encode(params, other)
  np.testing.assert_array_equal(np.asarray(a[:, :P]), np.asarray(b[:, :P]))  # both layers
  assert float(jnp.abs(a[:, P:] - b[:, P:]).max()) > 1e-4
  # With the paper's full visibility the prompt does see the inputs.
  full = PromptedT5(CONFIG, prompt_length=P)
  encode = _encoder(full)
  a, b = encode(params, TOKENS), encode(params, other)
  assert float(jnp.abs(a[:, :P] - b[:, :P]).max()) > 1e-4


def test_a_causal_prompt_ignores_later_prompt_rows(t5_params):
  model = PromptedT5(CONFIG, prompt_length=3, prompt_attention=("prompt->prompt;causal",))
  params = make_prompted_params(model, t5_params, jax.random.PRNGKey(4))
  bumped = {**params, "prompt": {"prompt": params["prompt"]["prompt"].at[1].add(1.0)}}
  encode = _encoder(model)
  a, b = encode(params, TOKENS), encode(bumped, TOKENS)
  np.testing.assert_array_equal(np.asarray(a[:, 0]), np.asarray(b[:, 0]))
  assert float(jnp.abs(a[:, 1:3] - b[:, 1:3]).max()) > 1e-4


def test_default_builds_no_mask_and_decoding_uses_a_mask(t5_params):
  """Full visibility is T5's own padding-mask path (no mask array); a masked model decodes and
  scores through the same encoder as its logits."""
  plain = PromptedT5(CONFIG, prompt_length=P)
  params = make_prompted_params(plain, t5_params, jax.random.PRNGKey(5))
  valid = _placed_valid("prepend")
  assert plain.apply({"params": params}, valid, method="encoder_attention_mask") is None
  full = prompt_masks.encoder_mask(prompt_index("prepend", valid, P), valid, prompt_masks.FULL)
  np.testing.assert_array_equal(np.asarray(full), np.asarray(valid[:, :, None] & valid[:, None]))

  masked = PromptedT5(CONFIG, prompt_length=P, prompt_attention=("prompt->input",))
  batch = ts.make_batch(TOKENS, np.array([[3, 4], [4, 3]], np.int32))
  args = (batch["encoder_input_tokens"], batch["decoder_input_tokens"])
  logits = jax.jit(masked.apply)({"params": params}, *args)
  assert float(jnp.abs(logits - jax.jit(plain.apply)({"params": params}, *args)).max()) > 1e-4
  targets = batch["decoder_target_tokens"]
  scores = decoding.score(masked, params, batch["encoder_input_tokens"], targets)
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]
  np.testing.assert_allclose(np.asarray(scores), np.asarray(jnp.sum(logp, axis=-1)), rtol=1e-5)


def test_a_bad_kind_is_one_line_before_loading(tmp_path, capsys, no_expensive_work):
  run = tmp_path / "run"
  capsys.readouterr()
  status = main(["train", "--gin_file", "runs/smoke_masked_prompt.gin", "--model_dir", str(run),
                 "--gin.methods.masked_prompt.prompt_attention=['prompt->everything']"])
  err = capsys.readouterr().err.splitlines()
  assert status == 2 and len(err) == 1, err
  assert "methods.masked_prompt.prompt_attention" in err[0] and "prompt->input" in err[0]
  assert not run.exists()
