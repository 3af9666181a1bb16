"""Cached decoding, sampling, beam search and scoring against independent references.

References: the teacher-forced full forward pass (no cache), transformers' PyTorch T5 (greedy
`generate` and logits), exhaustive enumeration for beam search, numpy softmax for sampling.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softprompt_jax as sj
from softprompt_jax import decoding

import oracles

B, T, L = 4, 12, 8  # one batch shape for every test on the transformers models: few compiles


def _hf_greedy(hf_model, enc, max_new_tokens):
  """transformers' greedy tokens [B, max_new_tokens], start token stripped, 0 after EOS."""
  import torch
  # use_cache=False: transformers' generation cache is built for num_layers (the encoder depth)
  # and fails on these deeper decoders; without it each step is a full forward, still greedy.
  out = hf_model.generate(
      input_ids=torch.tensor(enc, dtype=torch.long),
      attention_mask=torch.tensor(enc > 0, dtype=torch.long), do_sample=False, num_beams=1,
      max_new_tokens=max_new_tokens, use_cache=False).numpy()
  assert (out[:, 0] == 0).all(), "transformers should start from decoder_start_token_id 0"
  tokens = np.zeros((enc.shape[0], max_new_tokens), np.int64)
  tokens[:, :out.shape[1] - 1] = out[:, 1:]
  return tokens


def _make_eos_likely(hf_model, enc):
  """Gives EOS a scaled copy of the output row of the token greedy decoding emits most.

  Random tiny models rarely emit EOS; after this, rows that would emit that token end instead,
  so a batch has both finished and unfinished rows.
  """
  import torch
  common = np.bincount(_hf_greedy(hf_model, enc, L).ravel()).argmax()
  out = hf_model.lm_head.weight  # tied to shared.weight for T5 1.0
  with torch.no_grad():
    out[1] = 1.05 * out[common]


@functools.cache
def _setup(family):
  """(transformers model, our T5, its params, encoder batch [B, T] with padding), built once."""
  enc, _ = oracles.random_batch(seed=4, batch=B, input_len=T, target_len=L)
  hf_model = oracles.tiny_hf_t5(family, seed=3)
  _make_eos_likely(hf_model, enc)
  config, params = oracles.hf_to_ours(hf_model)
  return hf_model, sj.T5(config), params, enc


FAMILIES = pytest.mark.parametrize("family", ["t5_1_1", "t5_1_0"])


@functools.partial(jax.jit, static_argnames=("model",))
def _forward(model, params, enc, decoder_input_tokens):
  """The teacher-forced full forward pass (no cache): logits [B, S, V]."""
  return model.apply({"params": params}, enc, decoder_input_tokens)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _random_params(model, seed):
  """sj.init_params under jit (eager init compiles every op on its own, which is slow)."""
  return sj.init_params(model, jax.random.PRNGKey(seed))[0]


def _log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


@functools.partial(jax.jit, static_argnames=("model", "cache_len"))
def _stepwise_logits(model, params, enc, decoder_input_tokens_BxS, cache_len):
  """Next-token logits [B, S, V] from one cached decode step per position."""
  encoded, valid = decoding.encode(model, params, enc)
  cache = decoding.init_cache(model, params, encoded, valid, cache_len)

  def step(cache, tokens_B):
    logits_BxV, cache = decoding.decode_step(model, params, cache, encoded, valid, tokens_B,
                                             cache_len)
    return cache, logits_BxV

  _, logits_SxBxV = jax.lax.scan(step, cache, decoder_input_tokens_BxS.T)
  return logits_SxBxV.transpose(1, 0, 2)


@pytest.mark.parametrize("family,extra", [("t5_1_1", 0), ("t5_1_0", 0), ("t5_1_1", 3)])
def test_cached_steps_match_full_forward(family, extra):
  # A cache longer than the steps taken (extra > 0) must not change anything either.
  _, model, params, enc = _setup(family)
  _, dec = oracles.random_batch(seed=5, batch=B, input_len=T, target_len=L)
  full = _forward(model, params, jnp.asarray(enc), jnp.asarray(dec))
  steps = _stepwise_logits(model, params, jnp.asarray(enc), jnp.asarray(dec), L + extra)
  np.testing.assert_allclose(np.asarray(steps), np.asarray(full), atol=1e-5, rtol=0)


@FAMILIES
def test_greedy_matches_transformers_generate(family):
  hf_model, model, params, enc = _setup(family)
  assert (enc == 0).any(), "the batch must contain padding"
  ours = np.asarray(decoding.greedy_decode(model, params, enc, L))
  ref = _hf_greedy(hf_model, enc, L)
  np.testing.assert_array_equal(ours, ref)
  ended = (ours == 1).any(axis=1)
  assert ended.any() and not ended.all(), "want finished and unfinished rows"
  for row in ours[ended]:
    assert (row[np.argmax(row == 1) + 1:] == 0).all()


@FAMILIES
def test_degenerate_sampling_is_greedy(family):
  _, model, params, enc = _setup(family)
  greedy = np.asarray(decoding.greedy_decode(model, params, enc, L))
  rng = jax.random.PRNGKey(0)
  for kwargs in (dict(top_k=1), dict(top_k=1, temperature=3.0), dict(top_p=1e-6),
                 dict(temperature=0.0)):
    sampled = decoding.sample_decode(model, params, enc, L, rng=rng, **kwargs)
    np.testing.assert_array_equal(np.asarray(sampled), greedy, err_msg=str(kwargs))


@FAMILIES
def test_sampling_is_deterministic_per_rng(family):
  _, model, params, enc = _setup(family)
  sample = functools.partial(decoding.sample_decode, model, params, enc, L, temperature=2.0)
  a = np.asarray(sample(rng=jax.random.PRNGKey(1)))
  np.testing.assert_array_equal(a, np.asarray(sample(rng=jax.random.PRNGKey(1))))
  assert (a != np.asarray(sample(rng=jax.random.PRNGKey(2)))).any()
  for row in a:  # padding after EOS, as greedy
    if (row == 1).any():
      assert (row[np.argmax(row == 1) + 1:] == 0).all()


def _filtered_probs(logits_V, temperature, top_k, top_p):
  """numpy reference of temperature, then top-k, then nucleus filtering."""
  z = logits_V.astype(np.float64) / temperature
  p = np.exp(z - z.max())
  p /= p.sum()
  order = np.argsort(-p)
  keep = np.zeros(p.shape, bool)
  keep[order[:top_k or len(p)]] = True
  p = np.where(keep, p, 0.0) / p[keep].sum()
  cum = np.cumsum(p[order])
  nucleus = order[:np.searchsorted(cum, top_p - 1e-12) + 1]
  q = np.zeros_like(p)
  q[nucleus] = p[nucleus]
  return q / q.sum()


def test_sampling_follows_filtered_softmax():
  config = sj.tiny_config(vocab_size=8)
  model = sj.T5(config)
  params = _random_params(model, 0)
  n = 4000
  enc = np.tile(np.array([[5, 3, 7, 2, 6, 0]], np.int32), (n, 1))
  logits_V = np.asarray(_forward(model, params, jnp.asarray(enc[:1]),
                                 jnp.zeros((1, 1), jnp.int32)))[0, 0]
  settings = [(1.0, 0, 1.0), (0.5, 0, 1.0), (2.0, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.6),
              (2.0, 5, 0.9)]
  expected = [_filtered_probs(logits_V, *s) for s in settings]
  # The settings must be told apart by the test for it to mean anything.
  for a, b in itertools.combinations(expected, 2):
    assert 0.5 * np.abs(a - b).sum() > 0.1
  for i, ((temperature, top_k, top_p), want) in enumerate(zip(settings, expected)):
    tokens = decoding.sample_decode(model, params, enc, 1, rng=jax.random.PRNGKey(i),
                                    temperature=temperature, top_k=top_k, top_p=top_p)
    freq = np.bincount(np.asarray(tokens)[:, 0], minlength=8) / n
    assert (freq[want == 0] == 0).all(), (settings[i], freq, want)
    # Expected total variation at n = 4000 over 8 tokens is ~0.02.
    assert 0.5 * np.abs(freq - want).sum() < 0.05, (settings[i], freq, want)
  # One-token decoding (the cache is created and stepped at once); temperature 0 is argmax.
  tokens = decoding.sample_decode(model, params, enc, 1, rng=jax.random.PRNGKey(0),
                                  temperature=0.0)
  assert (np.asarray(tokens) == np.argmax(logits_V)).all()


# --------------------------------------------------------------------------------------------
# Beam search


def _sequence_log_probs(model, params, enc_1xT, seqs_NxS, lengths_N):
  """log p of each sequence's first `length` tokens, from one teacher-forced forward pass."""
  n = len(seqs_NxS)
  logp = _log_softmax(_forward(model, params, jnp.asarray(np.repeat(enc_1xT, n, 0)),
                               decoding.shift_right(jnp.asarray(seqs_NxS))))
  token_logp = np.take_along_axis(logp, seqs_NxS[:, :, None], -1)[:, :, 0]
  counted = np.arange(seqs_NxS.shape[1])[None, :] < lengths_N[:, None]
  return np.where(counted, token_logp, 0.0).sum(-1)


def test_beam_search_equals_exhaustive_search():
  vocab, length, eos = 5, 3, 1
  config = sj.tiny_config(vocab_size=vocab)
  model = sj.T5(config)
  params = _random_params(model, 1)
  enc = np.array([[4, 2, 3, 0, 0], [3, 3, 4, 2, 2]], np.int32)
  # Every EOS-terminated sequence of at most `length` tokens (0, the pad id, may be emitted).
  others = [t for t in range(vocab) if t != eos]
  seqs, lengths = [], []
  for n in range(1, length + 1):
    for prefix in itertools.product(others, repeat=n - 1):
      seqs.append(list(prefix) + [eos] + [0] * (length - n))
      lengths.append(n)
  seqs, lengths = np.array(seqs, np.int32), np.array(lengths)
  # 2K >= live prefixes * vocab at every step makes beam search exact here.
  num_beams = (vocab - 1) ** (length - 1) * vocab // 2
  assert num_beams >= len(seqs)
  for alpha in (0.0, 0.6, 2.0):
    tokens, scores = decoding.beam_search(model, params, enc, length, num_beams=num_beams,
                                          alpha=alpha, return_all=True)
    tokens, scores = np.asarray(tokens), np.asarray(scores)
    for b in range(len(enc)):
      want = (_sequence_log_probs(model, params, enc[b:b + 1], seqs, lengths)
              / decoding.brevity_penalty(alpha, lengths))
      order = np.argsort(-want)
      found = len(seqs)
      np.testing.assert_array_equal(tokens[b, :found], seqs[order], err_msg=f"alpha {alpha}")
      np.testing.assert_allclose(scores[b, :found], want[order], rtol=1e-5)
      assert (scores[b, found:] == decoding.NEG_INF).all()
    best = decoding.beam_search(model, params, enc, length, num_beams=num_beams, alpha=alpha)
    np.testing.assert_array_equal(np.asarray(best), tokens[:, 0])


@FAMILIES
def test_beam_scores_are_transformers_log_probs(family):
  hf_model, model, params, enc = _setup(family)
  alpha = 0.6
  tokens, scores = decoding.beam_search(model, params, enc, L, num_beams=3, alpha=alpha,
                                        return_all=True)
  tokens, scores = np.asarray(tokens), np.asarray(scores)
  assert (np.diff(scores, axis=1) <= 0).all(), "beams come best first"
  for b in range(B):
    for k in range(3):
      seq = tokens[b, k]
      if scores[b, k] == decoding.NEG_INF:  # fewer than K beams finished
        assert (seq == 0).all() and (tokens[b, :k] == 1).any()
        continue
      ended = (seq == 1).any()
      n = np.argmax(seq == 1) + 1 if ended else L
      assert (seq[n:] == 0).all()
      ref = _log_softmax(oracles.hf_logits(hf_model, enc[b:b + 1],
                                           np.concatenate([[0], seq[:-1]])[None]))[0]
      logp = ref[np.arange(n), seq[:n]].sum()
      # Finished beams carry the length penalty; an example with none returns raw log p.
      want = logp / decoding.brevity_penalty(alpha, n) if ended else logp
      np.testing.assert_allclose(scores[b, k], want, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Scoring and rank classification


def _targets(seed, batch, length, vocab):
  """Targets ending in EOS, then padding, of varied lengths (one uses the whole length)."""
  rng = np.random.RandomState(seed)
  targets = rng.randint(2, vocab, size=(batch, length)).astype(np.int32)
  for i, n in enumerate(rng.randint(1, length + 1, size=batch)):
    n = length if i == 0 else n
    targets[i, n - 1] = 1
    targets[i, n:] = 0
  return targets


@FAMILIES
def test_score_matches_forward_pass_and_transformers(family):
  hf_model, model, params, enc = _setup(family)
  targets = _targets(6, B, L, vocab=100)
  assert (targets == 0).any()
  ours = np.asarray(decoding.score(model, params, enc, targets))
  assert ours.shape == (B,) and ours.dtype == np.float32
  dec = np.asarray(decoding.shift_right(jnp.asarray(targets)))
  assert (dec[:, 0] == 0).all() and (dec[:, 1:] == targets[:, :-1]).all()
  logp = _log_softmax(_forward(model, params, jnp.asarray(enc), jnp.asarray(dec)))
  gathered = np.take_along_axis(logp, targets[:, :, None], -1)[:, :, 0]
  np.testing.assert_allclose(ours, np.where(targets > 0, gathered, 0).sum(-1), atol=1e-5)
  ref_logp = _log_softmax(oracles.hf_logits(hf_model, enc, dec))
  ref_gathered = np.take_along_axis(ref_logp, targets[:, :, None], -1)[:, :, 0]
  np.testing.assert_allclose(ours, np.where(targets > 0, ref_gathered, 0).sum(-1), atol=1e-4)


def test_rank_classify_picks_the_best_scored_candidate():
  _, model, params, enc = _setup("t5_1_1")
  shared = _targets(7, 3, 4, vocab=100)  # [C, S]
  chosen, scores = decoding.rank_classify(model, params, enc, shared, return_scores=True)
  each = np.stack([np.asarray(decoding.score(model, params, enc, np.tile(c, (B, 1))))
                   for c in shared], axis=1)
  np.testing.assert_allclose(np.asarray(scores), each, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(chosen), each.argmax(1))
  # Per-example candidates [B, C, S]: reversed candidate order reverses the choice.
  per_example = np.stack([shared[::-1]] * B)
  chosen_rev = decoding.rank_classify(model, params, enc, per_example)
  np.testing.assert_array_equal(np.asarray(chosen_rev), 2 - each.argmax(1))


# --------------------------------------------------------------------------------------------
# Subclasses whose encode takes extra arguments (as PromptedT5 does)


class HardPromptT5(sj.T5):
  """Prepends extra tokens given per call: the same as a T5 reading them in its input."""

  def encoder_inputs(self, encoder_input_tokens_BxT, *, prefix_tokens_BxP):
    return super().encoder_inputs(
        jnp.concatenate([prefix_tokens_BxP, encoder_input_tokens_BxT], axis=1))


def test_encoder_kwargs_reach_a_subclass_encode():
  _, model, params, enc = _setup("t5_1_1")
  prompted = HardPromptT5(model.config)
  # Prefix + shortened inputs have the [B, T] shape of the other tests: their programs are reused.
  prefix = np.tile(np.array([[7, 8, 9]], np.int32), (B, 1))
  enc = enc[:, :T - 3]
  joined = np.concatenate([prefix, enc], axis=1)
  kw = dict(prefix_tokens_BxP=prefix)
  np.testing.assert_array_equal(
      np.asarray(decoding.greedy_decode(prompted, params, enc, L, **kw)),
      np.asarray(decoding.greedy_decode(model, params, joined, L)))
  np.testing.assert_array_equal(
      np.asarray(decoding.beam_search(prompted, params, enc, L, num_beams=3, **kw)),
      np.asarray(decoding.beam_search(model, params, joined, L, num_beams=3)))
  targets = _targets(8, B, L, vocab=100)
  np.testing.assert_allclose(
      np.asarray(decoding.score(prompted, params, enc, targets, **kw)),
      np.asarray(decoding.score(model, params, joined, targets)), atol=1e-5)
  candidates = _targets(7, 3, 4, vocab=100)
  np.testing.assert_allclose(
      np.asarray(decoding.rank_classify(prompted, params, enc, candidates, return_scores=True,
                                        **kw)[1]),
      np.asarray(decoding.rank_classify(model, params, joined, candidates,
                                        return_scores=True)[1]), atol=1e-5)
  with pytest.raises(TypeError):
    decoding.greedy_decode(prompted, params, enc, L)  # the subclass needs its argument


@FAMILIES
def test_invalid_settings_are_refused(family):
  _, model, params, enc = _setup(family)
  rng = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="max_decode_length"):
    decoding.greedy_decode(model, params, enc, 0)
  with pytest.raises(ValueError, match="top_p"):
    decoding.sample_decode(model, params, enc, L, rng=rng, top_p=0.0)
  with pytest.raises(ValueError, match="top_k"):
    decoding.sample_decode(model, params, enc, L, rng=rng, top_k=-1)
  with pytest.raises(ValueError, match="temperature"):
    decoding.sample_decode(model, params, enc, L, rng=rng, temperature=-1.0)
  with pytest.raises(ValueError, match="num_beams"):
    decoding.beam_search(model, params, enc, L, num_beams=0)
  with pytest.raises(ValueError, match="candidate_target_tokens"):
    decoding.rank_classify(model, params, enc, np.ones((2, 3, 4), np.int32))
