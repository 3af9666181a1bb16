"""Per-layer prompts (@methods.per_layer_prompt): the [L, P, H] leaf under layer_prompt/ with
replicated logical axes; 'add' with zero layer prompts is prompt tuning exactly; the hook
touches only the prompt positions (prepend and append, written out by hand); gradients reach
every layer's prompt (and, in 'replace' mode as in the official code, not the overwritten input
prompt); the CLI trains smoke_per_layer.gin, evaluates from the run directory and exports."""

import json

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import softprompt_jax as sj
from softprompt_jax import gin_setup, inference, optim, partitioning, prompt_masks
from softprompt_jax import train_step as ts
from softprompt_jax.cli import main
from softprompt_jax.errors import ConfigError
from softprompt_jax.methods import from_description
from softprompt_jax.methods.per_layer import (LayerPrompt, MaskedPrompt, PerLayerPrompt,
                                              layer_initializer, per_layer_prompt)
from softprompt_jax.prompt_init import random_uniform
from softprompt_jax.prompted_t5 import PromptedT5, append, make_prompted_params, prepend
from softprompt_jax.run_dir import best_trainable

CONFIG = sj.tiny_config(dropout_rate=0.0)
L, H = CONFIG.num_encoder_layers, CONFIG.emb_dim
P = 3


@pytest.fixture(scope="module")
def t5_params():
  return jax.jit(lambda rng: sj.init_params(sj.T5(CONFIG), rng)[0])(jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def batch():
  rng = np.random.RandomState(0)
  enc = rng.randint(2, CONFIG.vocab_size, (2, 7))
  enc[1, 5:] = 0
  return ts.make_batch(enc, rng.randint(2, CONFIG.vocab_size, (2, 3)))


def _net_and_params(method, t5_params, placement="prepend", seed=1):
  net = method.model(CONFIG, prompt_length=P, prompt_init=random_uniform(), placement=placement)
  return net, method.init_params(net, t5_params, jax.random.PRNGKey(seed))


def test_tree_axes_sharding_trainable_and_init(t5_params, batch):
  method = per_layer_prompt()
  net, params = _net_and_params(method, t5_params)
  shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0), batch["encoder_input_tokens"],
                          batch["decoder_input_tokens"])["params"]
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  assert set(flatten_dict(params, sep="/")) - set(flatten_dict(t5_params, sep="/")) == {
      "prompt/prompt", "layer_prompt/prompt"}
  assert params["layer_prompt"]["prompt"].shape == (L, P, H)
  assert not np.any(params["layer_prompt"]["prompt"])  # 'zeros' by default
  # The input prompt is made exactly as prompt tuning makes it from the same seed.
  plain = make_prompted_params(PromptedT5(CONFIG, prompt_length=P), t5_params,
                               jax.random.PRNGKey(1))
  np.testing.assert_array_equal(params["prompt"]["prompt"], plain["prompt"]["prompt"])

  assert sj.logical_axes(net)["layer_prompt"]["prompt"] == ("layers", "prompt", "prompt_embed")
  mesh = partitioning.make_mesh(num_partitions=2)  # 4 x 2 of the 8 simulated devices
  shardings = partitioning.param_shardings(net, mesh, partitioning.standard_logical_axis_rules())
  assert shardings["layer_prompt"]["prompt"].is_fully_replicated
  assert not shardings["token_embedder"]["embedding"].is_fully_replicated  # the mesh splits

  labels = flatten_dict(optim.param_labels(params, method.trainable), sep="/")
  assert {k for k, v in labels.items() if v == optim.TRAINABLE} == {"prompt/prompt",
                                                                     "layer_prompt/prompt"}
  uniform = per_layer_prompt(layer_init="random_uniform", layer_init_scale=0.1)
  values = np.asarray(_net_and_params(uniform, t5_params)[1]["layer_prompt"]["prompt"])
  assert 0 < np.abs(values).max() <= 0.1 and len(np.unique(values)) == values.size


def test_zero_layer_prompts_in_add_mode_are_prompt_tuning(t5_params, batch):
  net, params = _net_and_params(per_layer_prompt(combine="add"), t5_params)
  args = (batch["encoder_input_tokens"], batch["decoder_input_tokens"])
  logits = jax.jit(net.apply)({"params": params}, *args)
  plain_params = {k: v for k, v in params.items() if k != "layer_prompt"}
  plain = jax.jit(PromptedT5(CONFIG, prompt_length=P).apply)({"params": plain_params}, *args)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(plain), rtol=0, atol=1e-6)
  # ... and the hook is live: non-zero layer prompts change the logits.
  bumped = {**params, "layer_prompt": {"prompt": jnp.full((L, P, H), 0.5)}}
  assert float(jnp.abs(jax.jit(net.apply)({"params": bumped}, *args) - logits).max()) > 1e-3


@pytest.mark.parametrize("placement", ["prepend", "append"])
@pytest.mark.parametrize("combine", ["replace", "add"])
def test_the_hook_changes_only_the_prompt_positions(placement, combine):
  rng = np.random.RandomState(1)
  lengths = [4, 2]  # real tokens per example, then padding
  tokens_BxT = np.zeros((2, 5), np.int32)
  for b, n in enumerate(lengths):
    tokens_BxT[b, :n] = rng.randint(2, 100, n)
  place = {"prepend": prepend, "append": append}[placement]
  x_BxTxH, valid_BxT = place(jnp.asarray(rng.randn(2, 5, H), jnp.float32),
                             jnp.asarray(tokens_BxT > 0),
                             jnp.asarray(rng.randn(2, P, H), jnp.float32))
  layer_prompts = rng.randn(L, P, H).astype(np.float32)
  module = LayerPrompt(L, P, H, combine, placement)
  x = np.asarray(x_BxTxH)
  for i in range(L):
    out = np.asarray(module.apply({"params": {"prompt": jnp.asarray(layer_prompts)}}, i,
                                  x_BxTxH, valid_BxT))
    expected = x.copy()
    for b, n in enumerate(lengths):
      start = 0 if placement == "prepend" else n  # appended: right after the last token
      rows = slice(start, start + P)
      expected[b, rows] = layer_prompts[i] + (x[b, rows] if combine == "add" else 0.0)
    np.testing.assert_array_equal(out, expected)


def _trainable_grads(net, params, trainable, batch):
  labels = optim.param_labels(params, trainable)
  train, frozen = optim.split_trainable(params, labels)
  loss = lambda tr: ts.loss_fn(tr, frozen, batch, None, model=net,
                               loss_config=ts.LossConfig(), enable_dropout=False)[0]
  return jax.jit(jax.grad(loss))(train)


@pytest.mark.parametrize("combine", ["add", "replace"])
def test_gradients_reach_every_layer_prompt(t5_params, batch, combine):
  method = per_layer_prompt(combine=combine, layer_init="random_uniform")
  net, params = _net_and_params(method, t5_params)
  grads = _trainable_grads(net, params, method.trainable, batch)
  norms_LxP = np.linalg.norm(np.asarray(grads["layer_prompt"]["prompt"]), axis=-1)
  assert np.all(norms_LxP > 1e-7), norms_LxP
  input_grad = np.abs(np.asarray(grads["prompt"]["prompt"])).max()
  if combine == "replace":  # overwritten before layer 0: the input prompt learns nothing
    assert input_grad == 0.0
  else:
    assert input_grad > 1e-7


def test_settings_are_checked_and_round_trip_through_the_run_record():
  method = per_layer_prompt(combine="replace", prompt_attention=["prompt->prompt;causal"])
  assert method.prompt_attention == ("input->input", "input->prompt", "prompt->prompt;causal")
  described = json.loads(json.dumps(method.describe()))
  assert from_description(described) == method and isinstance(method, PerLayerPrompt)
  for bad in [dict(combine="concat"), dict(layer_init="ones"), dict(layer_init_scale=0),
              dict(prompt_attention=["prompt->input", "input->void"])]:
    with pytest.raises(ConfigError, match="methods.per_layer_prompt"):
      per_layer_prompt(**bad)


def test_the_run_config_binds_the_method():
  gin_setup.parse(["models/tiny.gin", "runs/per_layer_prompt.gin"],
                  ["TASK='taskless_synthetic_sentiment'"], None)
  try:
    assert gin.query_parameter("train.method").scoped_configurable_fn() == per_layer_prompt()
    assert gin.query_parameter("train.num_steps") == 30000  # prompt_finetune.gin's schedule
  finally:
    gin.clear_config()


SMOKE = ["--gin_file", "runs/smoke_per_layer.gin"]
TASK = "taskless_synthetic_sentiment"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  run = tmp_path_factory.mktemp("per_layer_run")
  assert main(["train", *SMOKE, "--model_dir", str(run)]) == 0
  return run


def test_cli_trains_evaluates_from_the_run_and_exports(trained, tmp_path, capsys):
  meta_config = json.loads((trained / "summary.json").read_text())
  method = inference.run_method(trained)
  assert method == per_layer_prompt(combine="replace", layer_init="random_uniform")

  assert main(["eval", "--gin_file", "models/tiny.gin", "--gin_file", "runs/prompt_eval.gin",
               f"--gin.TASK='{TASK}'", "--gin.evaluate.input_length=64",
               "--gin.evaluate.target_length=10", "--gin.evaluate.max_examples=16",
               "--model_dir", str(trained)]) == 0
  evaluated = json.loads((trained / "eval_validation.json").read_text())
  if meta_config["best_step"] == 20:  # the run's last evaluation, rebuilt from its directory
    assert evaluated["metrics"]["accuracy"] == meta_config["final_eval"]["accuracy"]

  out = tmp_path / "per_layer.npz"
  assert main(["export", "--model_dir", str(trained), "--out", str(out)]) == 0
  with np.load(out, allow_pickle=False) as archive:
    exported = {name: archive[name] for name in archive.files}
  best = best_trainable(trained)
  np.testing.assert_array_equal(exported["prompt"], best["prompt"]["prompt"])
  np.testing.assert_array_equal(exported["layer_prompts"], best["layer_prompt"]["prompt"])
  np.testing.assert_array_equal(exported["prompt"], np.load(trained / "prompt.npy"))
  layers = exported["layer_prompts"]
  assert layers.dtype == np.float32 and layers.shape[1:] == exported["prompt"].shape
  assert str(exported["method"]) == "per_layer_prompt" and str(exported["combine"]) == "replace"
  assert str(exported["placement"]) == "prepend"
  assert tuple(exported["prompt_attention"]) == prompt_masks.FULL
  # Trained: the layer prompts left their initial values (random_uniform, seed 0).
  start = layer_initializer("random_uniform", 0.5)(jax.random.fold_in(jax.random.PRNGKey(0), 1),
                                                   layers.shape)
  assert np.abs(layers - np.asarray(start)).max() > 1e-4

  capsys.readouterr()
  assert main(["export", "--model_dir", str(trained), "--out", str(tmp_path / "adapter")]) == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and ".npz" in err[0], err
  assert main(["interpret", "--model_dir", str(trained)]) == 0  # the input prompt's tokens
  # Its input prompt alone would be another model: as a prompt file, the run is refused.
  capsys.readouterr()
  assert main(["eval", "--gin_file", "models/tiny.gin", "--gin_file", "runs/prompt_eval.gin",
               f"--gin.TASK='{TASK}'", f"--gin.PROMPT_FILE='{trained}'"]) == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and "learned more than a prompt" in err[0], err


def test_cli_masked_prompt_run_records_and_exports_its_mask(tmp_path):
  run = tmp_path / "masked"
  assert main(["train", "--gin_file", "runs/smoke_masked_prompt.gin", "--model_dir", str(run),
               "--gin.train.num_steps=10", "--gin.train.eval_every=10"]) == 0
  assert inference.run_method(run) == MaskedPrompt(prompt_attention=("prompt->prompt;causal",))
  out = tmp_path / "masked.npz"
  assert main(["export", "--model_dir", str(run), "--out", str(out)]) == 0
  with np.load(out, allow_pickle=False) as archive:
    assert sorted(archive.files) == ["method", "placement", "prompt", "prompt_attention"]
    assert tuple(archive["prompt_attention"]) == (
        "input->input", "input->prompt", "prompt->prompt;causal")
    np.testing.assert_array_equal(archive["prompt"], np.load(run / "prompt.npy"))
