"""Shape-counted FLOPs against XLA's own count of the compiled programs (an independent oracle)."""

import jax
import jax.numpy as jnp
import pytest

from softprompt_jax import flops, optim, train_step
from softprompt_jax.prompted_t5 import PromptedT5
from softprompt_jax.t5 import init_params
from softprompt_jax.t5_config import tiny_config

# Wide enough that matmuls dominate, as at real sizes; XLA also counts elementwise work.
CONFIG = tiny_config(emb_dim=128, num_heads=4, head_dim=32, mlp_dim=512, vocab_size=512,
                     dropout_rate=0.0)
P, T, S, B = 8, 24, 8, 2


@pytest.fixture(scope="module")
def setup():
  model = PromptedT5(CONFIG, prompt_length=P)
  params, _ = init_params(model, jax.random.PRNGKey(0), B, T, S)
  batch = train_step.make_batch(jnp.full((B, T), 3, jnp.int32), jnp.full((B, S), 4, jnp.int32))
  return model, params, batch, flops.forward_flops(CONFIG, B, T + P, S)


def _xla_flops(jitted, *args):
  return jitted.lower(*args).compile().cost_analysis()["flops"]


def test_forward_flops_match_xla(setup):
  model, params, batch, counted = setup
  forward = jax.jit(lambda p, b: model.apply({"params": p}, b["encoder_input_tokens"],
                                             b["decoder_input_tokens"]))
  xla = _xla_flops(forward, params, batch)
  assert 0.95 * xla <= counted.forward <= xla


@pytest.mark.parametrize("patterns", [optim.PROMPT_ONLY, optim.MODEL_TUNING])
def test_train_step_flops_match_xla(setup, patterns):
  model, params, batch, counted = setup
  labels = optim.param_labels(params, patterns)
  optimizer = optim.masked_optimizer(optim.adafactor(), labels)
  state, frozen = train_step.init_train_state(params, labels, optimizer)
  step, _ = train_step.jit_steps(model, optimizer)
  xla = _xla_flops(step, state, frozen, batch, jax.random.PRNGKey(0))
  expected = counted.prompt_tuning if patterns == optim.PROMPT_ONLY else counted.model_tuning
  # Model tuning adds the optimizer's elementwise work over every weight, which is not a matmul.
  lower = 0.95 if patterns == optim.PROMPT_ONLY else 0.85
  assert lower * xla <= expected <= xla
  assert counted.prompt_tuning / counted.model_tuning < 0.7
