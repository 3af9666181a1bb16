"""Autoregressive decoding with the KV cache (greedy, sampling, beam search) and target scoring.

Every function takes the flax module and its params rather than a bound model, so a subclass of
`T5` (e.g. PromptedT5, whose `encode` takes extra keyword arguments such as prompt ids) decodes
unchanged: `**encoder_kwargs` go straight to `model.encode`. They are traced by `jax.jit`, so
they must be arrays or pytrees of arrays. The public functions are jit-compiled once per model,
shape and static setting (`max_decode_length`, `eos_id`, `num_beams`); temperature, top-k, top-p
and alpha are traced.

Decoded tokens exclude the leading decoder-start token 0 and are 0 (padding) after EOS, as in
t5x. Layouts: B batch, T encoder length, H d_model, L max decode length, S target length,
V vocabulary, K beams, C candidates.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

# Scoring feeds the targets shifted right; kept importable here as `decoding.shift_right`.
from softprompt_jax.t5 import shift_right

Params = dict[str, Any]
Cache = dict[str, Any]
# Traced settings: a Python number or a scalar array.
Scalar = Union[float, int, jax.Array]

# Finite "minus infinity" for beam scores (t5x's value): sums of it never turn into NaN.
NEG_INF = -1.0e7


def brevity_penalty(alpha: Scalar, length: Scalar) -> Scalar:
  """t5x's (GNMT) length normalisation: a finished beam's score is log p / this."""
  return ((5.0 + length) / 6.0) ** alpha


# --------------------------------------------------------------------------------------------
# Model calls (usable under jit; the public decoders below are already jitted)


def encode(model: nn.Module, params: Params, encoder_input_tokens_BxT: jax.Array,
           **encoder_kwargs: Any) -> tuple[jax.Array, jax.Array]:
  """(encoded [B, T', H], encoder_valid [B, T']) from `model.encode`; T' includes any prompt."""
  return model.apply({"params": params}, encoder_input_tokens_BxT, method="encode",
                     **encoder_kwargs)


def init_cache(model: nn.Module, params: Params, encoded_BxTxH: jax.Array,
               encoder_valid_BxT: jax.Array, max_decode_length: int) -> Cache:
  """An empty self-attention KV cache for B sequences of up to `max_decode_length` tokens.

  A decode=True call on full-length dummy inputs only shapes the cache (its logits are unused,
  so under jit XLA drops that computation).
  """
  dummy_BxL = jnp.zeros((encoded_BxTxH.shape[0], max_decode_length), jnp.int32)
  _, variables = model.apply({"params": params}, encoded_BxTxH, encoder_valid_BxT, dummy_BxL,
                             decode=True, max_decode_length=max_decode_length,
                             mutable=["cache"], method="decode")
  return variables["cache"]


def decode_step(model: nn.Module, params: Params, cache: Cache, encoded_BxTxH: jax.Array,
                encoder_valid_BxT: jax.Array, tokens_B: jax.Array,
                max_decode_length: int) -> tuple[jax.Array, Cache]:
  """One cached decoder step: the previous tokens [B] -> (next-token logits [B, V], cache)."""
  logits_Bx1xV, variables = model.apply(
      {"params": params, "cache": cache}, encoded_BxTxH, encoder_valid_BxT, tokens_B[:, None],
      decode=True, max_decode_length=max_decode_length, mutable=["cache"], method="decode")
  return logits_Bx1xV[:, 0], variables["cache"]


# --------------------------------------------------------------------------------------------
# Greedy decoding and sampling: one loop, two ways of choosing the next token


class _SampleState(NamedTuple):
  step: jax.Array       # scalar: the position being generated
  tokens_BxL: jax.Array
  prev_B: jax.Array     # the token fed to the decoder at `step`
  done_B: jax.Array     # EOS already emitted
  cache: Any
  rng: jax.Array


def filter_logits(logits_BxV: jax.Array, temperature: Scalar = 1.0, top_k: Scalar = 0,
                  top_p: Scalar = 1.0) -> jax.Array:
  """Logits divided by `temperature`, with tokens outside the top-k and the nucleus at -inf.

  Order as transformers' logits warpers: temperature, then top-k (0: off), then top-p (1: off),
  the smallest set of most probable tokens whose mass reaches `top_p` (the best always stays).
  Tokens tied with the last one kept are kept too. All three may be traced.
  """
  logits_BxV = logits_BxV / temperature
  rank_V = jnp.arange(logits_BxV.shape[-1])
  sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
  in_top_k_V = (top_k <= 0) | (rank_V < top_k)
  sorted_BxV = jnp.where(in_top_k_V, sorted_BxV, -jnp.inf)
  probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
  # top_p >= 1 keeps everything exactly (a cumulative sum can round past 1 before the tail).
  keep_BxV = in_top_k_V & ((mass_before_BxV < top_p) | (top_p >= 1.0))
  threshold_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits_BxV < threshold_Bx1, -jnp.inf, logits_BxV)


# Greedy decoding and every sampling setting share one compiled program per shape: the choice
# of token is a traced switch, so sweeping temperature / top-k / top-p never recompiles.
@functools.partial(jax.jit, static_argnames=("model", "max_decode_length", "eos_id"))
def _sample_jit(model: nn.Module, params: Params, encoder_input_tokens_BxT: jax.Array,
                encoder_kwargs: dict[str, Any], rng: jax.Array, greedy: bool,
                temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, *,
                max_decode_length: int, eos_id: int) -> jax.Array:
  encoded, valid = encode(model, params, encoder_input_tokens_BxT, **encoder_kwargs)
  batch = encoder_input_tokens_BxT.shape[0]
  use_argmax = greedy | (temperature <= 0)

  def argmax(logits_BxV: jax.Array, _: jax.Array) -> jax.Array:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

  def sample(logits_BxV: jax.Array, step_rng: jax.Array) -> jax.Array:
    logits_BxV = filter_logits(logits_BxV, temperature, top_k, top_p)
    return jax.random.categorical(step_rng, logits_BxV, axis=-1).astype(jnp.int32)

  def not_finished(s: _SampleState) -> jax.Array:
    return (s.step < max_decode_length) & ~jnp.all(s.done_B)

  def body(s: _SampleState) -> _SampleState:
    logits_BxV, cache = decode_step(model, params, s.cache, encoded, valid, s.prev_B,
                                    max_decode_length)
    rng, step_rng = jax.random.split(s.rng)
    chosen_B = jax.lax.cond(use_argmax, argmax, sample, logits_BxV, step_rng)
    next_B = jnp.where(s.done_B, 0, chosen_B)
    tokens_BxL = jax.lax.dynamic_update_slice(s.tokens_BxL, next_B[:, None], (0, s.step))
    return _SampleState(s.step + 1, tokens_BxL, next_B, s.done_B | (next_B == eos_id), cache,
                        rng)

  init = _SampleState(
      step=jnp.array(0, jnp.int32),
      tokens_BxL=jnp.zeros((batch, max_decode_length), jnp.int32),
      prev_B=jnp.zeros((batch,), jnp.int32),
      done_B=jnp.zeros((batch,), bool),
      cache=init_cache(model, params, encoded, valid, max_decode_length),
      rng=rng)
  return jax.lax.while_loop(not_finished, body, init).tokens_BxL


def _check_length(max_decode_length: int) -> None:
  if not isinstance(max_decode_length, int) or max_decode_length < 1:
    raise ValueError(f"max_decode_length must be a positive int, got {max_decode_length!r}")


def greedy_decode(model: nn.Module, params: Params, encoder_input_tokens_BxT: ArrayLike,
                  max_decode_length: int, eos_id: int = 1, **encoder_kwargs: Any) -> jax.Array:
  """Argmax decoding -> tokens [B, L]; stops early once every sequence has emitted EOS."""
  _check_length(max_decode_length)
  return _sample_jit(model, params, jnp.asarray(encoder_input_tokens_BxT), encoder_kwargs,
                     jax.random.PRNGKey(0), True, jnp.float32(1.0), jnp.int32(0),
                     jnp.float32(1.0), max_decode_length=max_decode_length, eos_id=eos_id)


def sample_decode(model: nn.Module, params: Params, encoder_input_tokens_BxT: ArrayLike,
                  max_decode_length: int, eos_id: int = 1, *, rng: jax.Array,
                  temperature: Scalar = 1.0, top_k: Scalar = 0, top_p: Scalar = 1.0,
                  **encoder_kwargs: Any) -> jax.Array:
  """Ancestral sampling with temperature, top-k (0: off) and nucleus top-p (1: off) -> [B, L].

  temperature 0 is greedy decoding. The settings are traced: changing them does not recompile.
  """
  _check_length(max_decode_length)
  if isinstance(temperature, (int, float)) and temperature < 0:
    raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
  if isinstance(top_k, (int, float)) and (top_k < 0 or top_k != int(top_k)):
    raise ValueError(f"top_k must be an int >= 0 (0 turns it off), got {top_k!r}")
  if isinstance(top_p, (int, float)) and not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1] (1 turns it off), got {top_p}")
  return _sample_jit(model, params, jnp.asarray(encoder_input_tokens_BxT), encoder_kwargs, rng,
                     False, jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p),
                     max_decode_length=max_decode_length, eos_id=eos_id)


# --------------------------------------------------------------------------------------------
# Beam search (t5x semantics: 2K candidates per step, GNMT length penalty on finished beams)


class _BeamState(NamedTuple):
  step: jax.Array
  live_seqs_BxKxL: jax.Array
  live_logp_BxK: jax.Array      # log p of each live prefix; NEG_INF marks an empty slot
  finished_seqs_BxKxL: jax.Array
  finished_scores_BxK: jax.Array  # log p / brevity_penalty, best first
  finished_BxK: jax.Array       # which finished slots hold a real sequence
  cache: Any


def _take_beams(x_BxN: jax.Array, index_BxM: jax.Array) -> jax.Array:
  """x[b, index[b, m]] for every b and m, whatever x's trailing dimensions."""
  index = index_BxM.reshape(index_BxM.shape + (1,) * (x_BxN.ndim - 2))
  return jnp.take_along_axis(x_BxN, index, axis=1)


def _gather_cache(cache: Cache, parent_BxK: jax.Array) -> Cache:
  """Each beam's cache rows copied from its parent beam (rows are b * K + beam)."""
  batch, beams = parent_BxK.shape
  rows_BK = (jnp.arange(batch)[:, None] * beams + parent_BxK).reshape(-1)
  # The scalar cache_index is shared by all rows.
  return jax.tree.map(lambda x: x if x.ndim == 0 else x[rows_BK], cache)


@functools.partial(jax.jit, static_argnames=("model", "max_decode_length", "eos_id",
                                             "num_beams"))
def _beam_jit(model: nn.Module, params: Params, encoder_input_tokens_BxT: jax.Array,
              encoder_kwargs: dict[str, Any], alpha: jax.Array, *, max_decode_length: int,
              eos_id: int, num_beams: int) -> tuple[jax.Array, jax.Array]:
  k, length = num_beams, max_decode_length
  batch = encoder_input_tokens_BxT.shape[0]
  encoded, valid = encode(model, params, encoder_input_tokens_BxT, **encoder_kwargs)
  # Rows b*K .. b*K+K-1 are example b's beams; they all read the same encoder outputs.
  encoded_BKxTxH = jnp.repeat(encoded, k, axis=0)
  valid_BKxT = jnp.repeat(valid, k, axis=0)

  def not_finished(s: _BeamState) -> jax.Array:
    # No live prefix can beat the worst finished beam once its best possible final score
    # (log p only falls; the penalty divisor is largest at one end of the remaining lengths)
    # is below it; with a free finished slot the search always goes on.
    divisor = jnp.maximum(brevity_penalty(alpha, length), brevity_penalty(alpha, s.step + 1))
    best_live_B = jnp.max(s.live_logp_BxK, axis=1) / divisor
    worst_finished_B = jnp.min(jnp.where(s.finished_BxK, s.finished_scores_BxK, NEG_INF), axis=1)
    settled = jnp.all(worst_finished_B > best_live_B)
    return (s.step < length) & ~settled

  def body(s: _BeamState) -> _BeamState:
    last_BxK = jax.lax.dynamic_index_in_dim(s.live_seqs_BxKxL, jnp.maximum(s.step - 1, 0),
                                            axis=2, keepdims=False)
    prev_BxK = jnp.where(s.step == 0, 0, last_BxK)
    logits_BKxV, cache = decode_step(model, params, s.cache, encoded_BKxTxH, valid_BKxT,
                                     prev_BxK.reshape(-1), length)
    vocab = logits_BKxV.shape[-1]
    logp_BxKxV = (jax.nn.log_softmax(logits_BKxV).reshape(batch, k, vocab)
                  + s.live_logp_BxK[:, :, None])
    # 2K candidates, so that K remain live even if K of them end here.
    cand_logp_Bx2K, flat_Bx2K = jax.lax.top_k(logp_BxKxV.reshape(batch, k * vocab), 2 * k)
    parent_Bx2K, token_Bx2K = flat_Bx2K // vocab, flat_Bx2K % vocab
    cand_seqs_Bx2KxL = jax.lax.dynamic_update_slice(
        _take_beams(s.live_seqs_BxKxL, parent_Bx2K), token_Bx2K[:, :, None], (0, 0, s.step))
    ends_Bx2K = token_Bx2K == eos_id

    live_logp_BxK, live_pick_BxK = jax.lax.top_k(jnp.where(ends_Bx2K, NEG_INF, cand_logp_Bx2K), k)
    live_seqs_BxKxL = _take_beams(cand_seqs_Bx2KxL, live_pick_BxK)
    cache = _gather_cache(cache, _take_beams(parent_Bx2K, live_pick_BxK))

    # Candidates grown from empty (NEG_INF) slots are fillers, never finished sequences.
    new_finished_Bx2K = ends_Bx2K & (cand_logp_Bx2K > NEG_INF / 2)
    new_scores_Bx2K = jnp.where(new_finished_Bx2K,
                                cand_logp_Bx2K / brevity_penalty(alpha, s.step + 1), NEG_INF)
    scores_Bx3K = jnp.concatenate([s.finished_scores_BxK, new_scores_Bx2K], axis=1)
    finished_scores_BxK, pick_BxK = jax.lax.top_k(scores_Bx3K, k)
    finished_seqs_BxKxL = _take_beams(
        jnp.concatenate([s.finished_seqs_BxKxL, cand_seqs_Bx2KxL], axis=1), pick_BxK)
    finished_BxK = _take_beams(jnp.concatenate([s.finished_BxK, new_finished_Bx2K], axis=1),
                               pick_BxK)
    return _BeamState(s.step + 1, live_seqs_BxKxL, live_logp_BxK, finished_seqs_BxKxL,
                      finished_scores_BxK, finished_BxK, cache)

  init = _BeamState(
      step=jnp.array(0, jnp.int32),
      live_seqs_BxKxL=jnp.zeros((batch, k, length), jnp.int32),
      # One real (empty) prefix per example; the other slots fill up from it.
      live_logp_BxK=jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (batch, 1)),
      finished_seqs_BxKxL=jnp.zeros((batch, k, length), jnp.int32),
      finished_scores_BxK=jnp.full((batch, k), NEG_INF, jnp.float32),
      finished_BxK=jnp.zeros((batch, k), bool),
      cache=init_cache(model, params, encoded_BKxTxH, valid_BKxT, length))
  s = jax.lax.while_loop(not_finished, body, init)
  # As t5x: an example with no finished beam returns its live beams and their raw log p.
  any_B = jnp.any(s.finished_BxK, axis=1)
  seqs_BxKxL = jnp.where(any_B[:, None, None], s.finished_seqs_BxKxL, s.live_seqs_BxKxL)
  scores_BxK = jnp.where(any_B[:, None], s.finished_scores_BxK, s.live_logp_BxK)
  return seqs_BxKxL, scores_BxK


def beam_search(model: nn.Module, params: Params, encoder_input_tokens_BxT: ArrayLike,
                max_decode_length: int, eos_id: int = 1, *, num_beams: int = 4,
                alpha: Scalar = 0.6, return_all: bool = False, **encoder_kwargs: Any
                ) -> Union[jax.Array, tuple[jax.Array, jax.Array]]:
  """Beam search with t5x's length penalty: a finished beam scores log p / ((5 + len) / 6)**alpha.

  `len` counts the generated tokens including EOS. Returns the best tokens [B, L]; with
  `return_all`, (tokens [B, K, L], scores [B, K]), best first; slots that never held a finished
  beam score NEG_INF. An example with no beam finished within L tokens returns its live beams
  scored by raw log p, as t5x does.
  """
  _check_length(max_decode_length)
  if not isinstance(num_beams, int) or num_beams < 1:
    raise ValueError(f"num_beams must be a positive int, got {num_beams!r}")
  seqs_BxKxL, scores_BxK = _beam_jit(
      model, params, jnp.asarray(encoder_input_tokens_BxT), encoder_kwargs, jnp.float32(alpha),
      max_decode_length=max_decode_length, eos_id=eos_id, num_beams=num_beams)
  if return_all:
    return seqs_BxKxL, scores_BxK
  return seqs_BxKxL[:, 0]


# --------------------------------------------------------------------------------------------
# Teacher-forced scoring and rank classification


def _target_log_likelihood(model: nn.Module, params: Params, encoded_BxTxH: jax.Array,
                           encoder_valid_BxT: jax.Array, target_tokens_BxS: jax.Array
                           ) -> jax.Array:
  logits_BxSxV = model.apply({"params": params}, encoded_BxTxH, encoder_valid_BxT,
                             shift_right(target_tokens_BxS), target_tokens_BxS, method="decode")
  logp_BxSxV = jax.nn.log_softmax(logits_BxSxV.astype(jnp.float32), axis=-1)
  logp_BxS = jnp.take_along_axis(logp_BxSxV, target_tokens_BxS[:, :, None], axis=-1)[:, :, 0]
  return jnp.sum(jnp.where(target_tokens_BxS > 0, logp_BxS, 0.0), axis=-1)


@functools.partial(jax.jit, static_argnames=("model",))
def _score_jit(model: nn.Module, params: Params, encoder_input_tokens_BxT: jax.Array,
               target_tokens_BxS: jax.Array, encoder_kwargs: dict[str, Any]) -> jax.Array:
  encoded, valid = encode(model, params, encoder_input_tokens_BxT, **encoder_kwargs)
  return _target_log_likelihood(model, params, encoded, valid, target_tokens_BxS)


def score(model: nn.Module, params: Params, encoder_input_tokens_BxT: ArrayLike,
          target_tokens_BxS: ArrayLike, **encoder_kwargs: Any) -> jax.Array:
  """log p(targets | inputs) [B], float32: the sum over non-padding (id != 0) target tokens."""
  return _score_jit(model, params, jnp.asarray(encoder_input_tokens_BxT),
                    jnp.asarray(target_tokens_BxS), encoder_kwargs)


@functools.partial(jax.jit, static_argnames=("model",))
def _rank_jit(model: nn.Module, params: Params, encoder_input_tokens_BxT: jax.Array,
              candidates_BxCxS: jax.Array, encoder_kwargs: dict[str, Any]) -> jax.Array:
  batch, num_candidates, length = candidates_BxCxS.shape
  encoded, valid = encode(model, params, encoder_input_tokens_BxT, **encoder_kwargs)
  # The encoder runs once per example; its outputs are shared by the C candidates.
  scores_BC = _target_log_likelihood(model, params, jnp.repeat(encoded, num_candidates, axis=0),
                                     jnp.repeat(valid, num_candidates, axis=0),
                                     candidates_BxCxS.reshape(batch * num_candidates, length))
  return scores_BC.reshape(batch, num_candidates)


def rank_classify(model: nn.Module, params: Params, encoder_input_tokens_BxT: ArrayLike,
                  candidate_target_tokens: ArrayLike, *, return_scores: bool = False,
                  **encoder_kwargs: Any) -> Union[jax.Array, tuple[jax.Array, jax.Array]]:
  """Index [B] of the most likely candidate target (summed log p, as t5x's rank classification).

  Candidates are [C, S] (the same for every example) or [B, C, S]. With `return_scores`, also
  returns the log-likelihoods [B, C].
  """
  tokens_BxT = jnp.asarray(encoder_input_tokens_BxT)
  candidates = jnp.asarray(candidate_target_tokens)
  given_shape = candidates.shape
  if candidates.ndim == 2:
    candidates = jnp.broadcast_to(candidates, (tokens_BxT.shape[0],) + candidates.shape)
  if candidates.ndim != 3 or candidates.shape[0] != tokens_BxT.shape[0]:
    raise ValueError(f"candidate_target_tokens must be [C, S] or [B, C, S] with B = "
                     f"{tokens_BxT.shape[0]}, got shape {given_shape}")
  scores_BxC = _rank_jit(model, params, tokens_BxT, candidates, encoder_kwargs)
  chosen_B = jnp.argmax(scores_BxC, axis=-1)
  return (chosen_B, scores_BxC) if return_scores else chosen_B
