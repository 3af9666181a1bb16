"""IA3 (methods/ia3.py): the vectors' params and where they multiply, the identity at ones, the
adapter files both ways, and configs/runs/smoke_ia3.gin through the CLI (train -> eval ->
export). Parity with PEFT's IA3 is in test_ia3_peft.py."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from softprompt_jax import optim, partitioning
from softprompt_jax.checkpoints import peft_ia3
from softprompt_jax.checkpoints.checkpoint_reader import CheckpointError
from softprompt_jax.cli import main
from softprompt_jax.errors import ConfigError
from softprompt_jax.methods import METHODS, from_description
from softprompt_jax.methods.ia3 import IA3, IA3_ONLY, IA3T5
from softprompt_jax.run_dir import best_trainable, read_meta
from softprompt_jax.t5 import T5, init_params, logical_axes
from softprompt_jax.t5_config import T5Config, tiny_config

CONFIG = tiny_config(num_decoder_layers=3, dropout_rate=0.0)


@pytest.fixture(scope="module")
def frozen():
  """Random frozen weights, drawn in numpy (T5's own init runs op by op: seconds)."""
  rng = np.random.RandomState(0)
  shapes = jax.eval_shape(lambda: init_params(T5(CONFIG), jax.random.PRNGKey(0))[0])
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.normal(0, 0.5, s.shape).astype(np.float32)), shapes)


def _random_vectors(seed, config=CONFIG):
  rng = np.random.RandomState(seed)
  return unflatten_dict({path: rng.uniform(0.5, 1.5, shape).astype(np.float32)
                         for path, (_, shape) in peft_ia3.ia3_paths(config).items()}, sep="/")


def _batch(seed=0):
  rng = np.random.RandomState(seed)
  enc = rng.randint(2, CONFIG.vocab_size, (2, 9)).astype(np.int32)
  enc[1, 5:] = 0
  dec = rng.randint(2, CONFIG.vocab_size, (2, 5)).astype(np.int32)
  dec[:, 0] = 0
  return jnp.asarray(enc), jnp.asarray(dec)


def test_the_vectors_are_the_modules_params_with_axes_that_partition(frozen):
  net = IA3().model(CONFIG, prompt_length=0, prompt_init=None)
  params = IA3().init_params(net, frozen, jax.random.PRNGKey(1))
  module_params = jax.eval_shape(lambda: init_params(net, jax.random.PRNGKey(0))[0])
  module_shapes = jax.tree_util.tree_map(lambda x: x.shape, module_params)
  ours = flatten_dict(jax.tree_util.tree_map(np.shape, params), sep="/")
  assert ours == flatten_dict(module_shapes, sep="/")
  added = {p: s for p, s in ours.items() if p not in flatten_dict(frozen, sep="/")}
  assert added == {p: s for p, (_, s) in peft_ia3.ia3_paths(CONFIG).items()}
  assert len(added) == 2 * 3 + 3 * 5  # per layer: encoder k, v, mlp; decoder 2 x (k, v), mlp
  assert all(np.all(np.asarray(flatten_dict(params, sep="/")[p]) == 1) for p in added)
  axes = flatten_dict(logical_axes(net), sep="/")
  assert axes["decoder/layers_2/encoder_decoder_attention/ia3_value"] == ("heads", "kv")
  assert axes["encoder/layers_0/mlp/ia3_mlp"] == ("mlp",)
  mesh = partitioning.make_mesh(num_partitions=2)
  shardings = flatten_dict(partitioning.param_shardings(
      net, mesh, partitioning.standard_logical_axis_rules()), sep="/")
  assert tuple(shardings["encoder/layers_1/attention/ia3_key"].spec) == ("model", None)
  assert tuple(shardings["decoder/layers_0/mlp/ia3_mlp"].spec) == ("model",)
  labels = flatten_dict(optim.param_labels(params, IA3_ONLY), sep="/")
  assert {p for p, label in labels.items() if label == optim.TRAINABLE} == set(added)
  assert not any("ia3" in p for p in flatten_dict(logical_axes(T5(CONFIG)), sep="/"))


def test_ones_are_the_identity_and_vectors_scale_keys_values_and_activations(frozen):
  # Rematerialised layers: the hooks are intercepted inside jax.checkpoint too (the PEFT
  # comparison runs without remat).
  config = CONFIG.replace(remat_policy="full")
  enc, dec = _batch()
  t5_apply = jax.jit(lambda p: T5(config).apply({"params": p}, enc, dec))
  net = IA3T5(config)
  ia3_apply = jax.jit(lambda p: net.apply({"params": p}, enc, dec))
  plain = t5_apply(frozen)
  params = IA3().init_params(net, frozen, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(ia3_apply(params), plain)
  # A vector of c's equals the kernel it follows (value) or precedes (wo) times c.
  flat = flatten_dict(params, sep="/")
  flat["encoder/layers_1/attention/ia3_value"] = jnp.full((2, 8), 3.0)
  flat["decoder/layers_0/mlp/ia3_mlp"] = jnp.full((CONFIG.mlp_dim,), 0.5)
  frozen_flat = dict(flatten_dict(frozen, sep="/"))
  for path, factor in (("encoder/layers_1/attention/value/kernel", 3.0),
                       ("decoder/layers_0/mlp/wo/kernel", 0.5)):  # wo is linear in its input
    frozen_flat[path] = frozen_flat[path] * factor
  scaled = ia3_apply(unflatten_dict(flat, sep="/"))
  folded = t5_apply(unflatten_dict(frozen_flat, sep="/"))
  np.testing.assert_allclose(scaled, folded, atol=1e-5 * float(jnp.abs(folded).max()))
  assert float(jnp.abs(scaled - plain).max()) > 1e-3


def test_a_prompt_length_is_refused_and_the_method_round_trips():
  with pytest.raises(ConfigError, match="train.prompt_length = 0"):
    IA3().model(CONFIG, prompt_length=4, prompt_init=None)
  assert "ia3" in METHODS
  assert from_description(IA3(init_from="/somewhere").describe()) == IA3()


def test_adapter_round_trip_and_init_from(frozen, tmp_path):
  vectors = _random_vectors(3)
  peft_ia3.save_ia3_adapter(tmp_path / "a", vectors, CONFIG, base_model_name_or_path="org/t5")
  written = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
  assert written["peft_type"] == "IA3" and written["feedforward_modules"] == ["wo"]
  assert written["base_model_name_or_path"] == "org/t5"
  read = peft_ia3.load_ia3_adapter(tmp_path / "a", CONFIG)
  jax.tree_util.tree_map(np.testing.assert_array_equal, read, vectors)
  net = IA3T5(CONFIG)
  params = IA3(init_from=str(tmp_path / "a")).init_params(net, frozen, jax.random.PRNGKey(0))
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, optim.merge(vectors, frozen))


def _rewrite(directory, **weights_or_config):
  from safetensors.numpy import load_file, save_file
  path = directory / "adapter_model.safetensors"
  if "weights" in weights_or_config:
    state = weights_or_config["weights"](load_file(str(path)))
    save_file(state, str(path))
  if "config" in weights_or_config:
    (directory / "adapter_config.json").write_text(json.dumps(weights_or_config["config"]))


@pytest.mark.parametrize("change,message", [
    ({"config": {"peft_type": "LORA"}}, "peft_type is 'LORA'"),
    ({"weights": lambda s: {**s, "base_model.model.encoder.block.0.layer.0.SelfAttention.q.ia3_l":
                             np.ones((16, 1), np.float32)}}, "SelfAttention.q.ia3_l"),
    ({"weights": lambda s: {**s, "base_model.model.encoder.block.7.layer.0.SelfAttention.k.ia3_l":
                             np.ones((16, 1), np.float32)}}, "2 encoder and 3 decoder layers"),
    ({"weights": lambda s: {**s, "base_model.model.decoder.block.0.layer.2.DenseReluDense.wo.ia3_l":
                             np.ones((16, 1), np.float32)}}, r"\(16, 1\).*\(1, 32\)"),
])
def test_adapters_this_model_cannot_take_are_refused_naming_what(tmp_path, change, message):
  peft_ia3.save_ia3_adapter(tmp_path, _random_vectors(4), CONFIG)
  _rewrite(tmp_path, **change)
  with pytest.raises(CheckpointError, match=message) as refused:
    peft_ia3.load_ia3_adapter(tmp_path, CONFIG)
  assert "\n" not in str(refused.value)


def test_a_pickled_adapter_is_refused_unread(tmp_path):
  peft_ia3.save_ia3_adapter(tmp_path, _random_vectors(5), CONFIG)
  (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
  with pytest.raises(CheckpointError, match="pickle; refusing"):
    peft_ia3.load_ia3_adapter(tmp_path, CONFIG)
  (tmp_path / "adapter_model.bin").unlink()
  with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
    peft_ia3.load_ia3_adapter(tmp_path, CONFIG)


TASK = "taskless_synthetic_sentiment"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  run = tmp_path_factory.mktemp("ia3_run")
  assert main(["train", "--gin_file", "runs/smoke_ia3.gin", "--model_dir", str(run)]) == 0
  return run


def test_smoke_ia3_trains_evaluates_and_exports_an_adapter(trained, tmp_path, capsys):
  summary = json.loads((trained / "summary.json").read_text())
  assert summary["steps"] == 20 and summary["best_step"] in (10, 20)
  assert not (trained / "prompt.npy").exists()
  meta = read_meta(trained)
  assert meta["method"] == {"name": "ia3"} and meta["prompt_length"] == 0
  vectors = flatten_dict(best_trainable(trained), sep="/")
  assert set(vectors) == set(peft_ia3.ia3_paths(_run_config(meta)))
  assert any(np.abs(v - 1).max() > 0 for v in vectors.values())  # trained away from ones

  assert main(["eval", "--gin_file", "models/tiny.gin", "--gin_file", "runs/prompt_eval.gin",
               f"--gin.TASK='{TASK}'", "--gin.evaluate.input_length=64",
               "--gin.evaluate.target_length=10", "--gin.evaluate.max_examples=16",
               "--model_dir", str(trained)]) == 0
  evaluated = json.loads((trained / "eval_validation.json").read_text())
  if summary["best_step"] == 20:  # the vectors evaluated are those of the last evaluation
    assert evaluated["metrics"]["accuracy"] == summary["final_eval"]["accuracy"]

  adapter = tmp_path / "adapter"
  assert main(["export", "--model_dir", str(trained), "--out", str(adapter)]) == 0
  assert "base_model_name_or_path null" in capsys.readouterr().err  # a random model: no HF dir
  read = flatten_dict(peft_ia3.load_ia3_adapter(adapter, _run_config(meta)), sep="/")
  assert read.keys() == vectors.keys()
  for path in read:
    np.testing.assert_array_equal(read[path], vectors[path])
  assert main(["export", "--model_dir", str(trained), "--out", str(tmp_path / "x.npy")]) == 2
  assert "exports a PEFT adapter directory" in capsys.readouterr().err
  # No prompt to read: interpret (and a prompt file, a bank entry) refuse it in one line.
  assert main(["interpret", "--model_dir", str(trained)]) == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and "has no prompt" in err[0], err


def _run_config(meta):
  return T5Config.from_dict(meta["config"])


@pytest.mark.parametrize("binding,message", [
    ("train.prompt_length=4", "set train.prompt_length = 0"),
    ("methods.ia3.init_from='{tmp}'", "adapter_config.json not found"),
])
def test_a_wrong_ia3_setting_stops_the_run_in_one_line_before_the_weights(
    no_expensive_work, tmp_path, capsys, binding, message):
  assert main(["train", "--gin_file", "runs/smoke_ia3.gin", "--model_dir", str(tmp_path / "r"),
               "--gin." + binding.format(tmp=tmp_path)]) == 2
  err = capsys.readouterr().err
  assert message in err and len(err.strip().splitlines()) == 1, err
  assert not (tmp_path / "r").exists()
