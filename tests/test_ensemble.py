"""Prompt ensembling: the vote, and per-prompt predictions equal to each prompt run alone."""

import jax
import numpy as np

import softprompt_jax as sj
from softprompt_jax import decoding, ensemble
from softprompt_jax.prompted_t5 import PromptedT5, make_prompted_params


def test_majority_vote_counts_and_breaks_ties_by_prompt_order():
  votes_KxB = [[1, 2, 0, 5], [1, 3, 4, 6], [2, 3, 4, 7]]
  assert ensemble.majority_vote(votes_KxB) == [1, 3, 4, 5]
  seqs = np.array([[[5, 1, 0]], [[6, 1, 0]], [[6, 1, 0]]])
  np.testing.assert_array_equal(ensemble.majority_vote(seqs)[0], [6, 1, 0])


def test_ensemble_matches_each_prompt_alone():
  config = sj.tiny_config(dropout_rate=0.0)
  t5_params, _ = sj.init_params(sj.T5(config), jax.random.PRNGKey(0))
  bank = PromptedT5(config, prompt_length=3, num_prompts=3)
  params = make_prompted_params(bank, t5_params, jax.random.PRNGKey(1))
  rng = np.random.RandomState(0)
  tokens = rng.randint(2, 128, (4, 7)).astype(np.int32)
  candidates = rng.randint(2, 128, (3, 2)).astype(np.int32)
  voted, per_prompt = ensemble.ensemble_rank_classify(bank, params, tokens, candidates,
                                                      [0, 1, 2])
  single = PromptedT5(config, prompt_length=3)
  for j in range(3):
    alone = {**t5_params, "prompt": {"prompt": params["prompt"]["prompt"][j]}}
    np.testing.assert_array_equal(per_prompt[j],
                                  decoding.rank_classify(single, alone, tokens, candidates))
  np.testing.assert_array_equal(voted, ensemble.majority_vote(per_prompt))

  voted_seq, per_prompt_seq = ensemble.ensemble_greedy_decode(bank, params, tokens, [2, 0], 4)
  alone = {**t5_params, "prompt": {"prompt": params["prompt"]["prompt"][2]}}
  np.testing.assert_array_equal(per_prompt_seq[0],
                                decoding.greedy_decode(single, alone, tokens, 4))
  assert voted_seq.shape == (4, 4)
