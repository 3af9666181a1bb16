"""Sharded prompt tuning on 8 simulated CPU devices equals one device; shards follow t5x rules."""

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import softprompt_jax as sj
from softprompt_jax import optim, partitioning
from softprompt_jax import train_step as ts
from softprompt_jax.prompted_t5 import PromptedT5, make_prompted_params

# heads = 8 so that every partitioned dimension divides the 8 devices.
CONFIG = sj.tiny_config(num_heads=8, head_dim=4)
PROMPT_LENGTH = 4
STEPS = 3
MESHES = [(8, 1), (4, 2), (2, 4), (1, 8)]


@pytest.fixture(scope="module")
def setup():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 "
                "(tests/conftest.py sets it before jax is imported)")
  model = PromptedT5(CONFIG, prompt_length=PROMPT_LENGTH)
  t5_params, _ = sj.init_params(sj.T5(CONFIG), jax.random.PRNGKey(0))
  params = make_prompted_params(model, t5_params, jax.random.PRNGKey(1))
  labels = optim.param_labels(params)
  optimizer = optim.masked_optimizer(optim.adafactor(), labels)
  rng = np.random.RandomState(0)
  enc = rng.randint(2, CONFIG.vocab_size, (8, 12))
  enc[3, 7:] = 0
  batch = ts.make_batch(enc, rng.randint(2, CONFIG.vocab_size, (8, 4)))
  state, frozen = ts.init_train_state(params, labels, optimizer)
  train, evaluate = ts.jit_steps(model, optimizer)
  for _ in range(STEPS):
    state, metrics = train(state, frozen, batch, jax.random.PRNGKey(2))
  reference = (float(metrics["loss"]), np.asarray(state.trainable["prompt"]["prompt"]),
               float(evaluate(state, frozen, batch)["loss_sum"]))
  return model, params, labels, optimizer, batch, reference


def _expected_shard(shape, logical, mesh_shape, rules):
  sizes = {"data": mesh_shape[0], "model": mesh_shape[1]}
  mapping = {}
  for name, axis in rules:
    mapping.setdefault(name, axis)
  return tuple(dim // (sizes[mapping[name]] if mapping.get(name) else 1)
               for dim, name in zip(shape, logical))


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_sharded_training_equals_one_device(setup, mesh_shape):
  model, params, labels, optimizer, batch, (ref_loss, ref_prompt, ref_eval) = setup
  partitioner = partitioning.Partitioner.create(mesh_shape=mesh_shape)
  state, frozen = ts.init_train_state(params, labels, optimizer)
  shapes = jax.eval_shape(lambda: (state, frozen))
  train, evaluate, shardings = ts.sharded_steps(model, optimizer, partitioner, *shapes)
  state = jax.device_put(state, shardings["state"])
  frozen = jax.device_put(frozen, shardings["frozen"])
  sharded_batch = partitioner.shard_batch(jax.tree_util.tree_map(np.asarray, batch), 8)
  for _ in range(STEPS):
    state, metrics = train(state, frozen, sharded_batch, jax.random.PRNGKey(2))
  assert abs(float(metrics["loss"]) - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss))
  np.testing.assert_allclose(np.asarray(state.trainable["prompt"]["prompt"]), ref_prompt,
                             atol=1e-5)
  assert abs(float(evaluate(state, frozen, sharded_batch)["loss_sum"]) - ref_eval) <= 1e-4

  # Per-device shards follow the rules: derived here from the rule table, not from the code.
  axes = flatten_dict(sj.logical_axes(model))
  rules = partitioner.rules
  for path, array in flatten_dict(frozen).items():
    expected = _expected_shard(array.shape, axes[path], mesh_shape, rules)
    assert array.addressable_shards[0].data.shape == expected, path
  prompt = state.trainable["prompt"]["prompt"]
  assert prompt.addressable_shards[0].data.shape == (PROMPT_LENGTH, CONFIG.emb_dim)
  assert sharded_batch["encoder_input_tokens"].addressable_shards[0].data.shape[0] == (
      8 // mesh_shape[0])


def test_rules_match_t5x_tables():
  one = dict(partitioning.standard_logical_axis_rules())
  assert one["batch"] == "data" and one["vocab"] == "model" and one["embed"] is None
  assert one["joined_kv"] == "model" and one["mlp"] == "model" and one["prompt"] is None
  two = partitioning.standard_logical_axis_rules(2, 2)
  assert [a for n, a in two if n == "embed"] == ["model", "data"]
  extra = partitioning.standard_logical_axis_rules(additional_rules=[("my_axis", "model")])
  assert extra[-1] == ("my_axis", "model")
  with pytest.raises(ValueError, match="each must be 1 or 2"):
    partitioning.standard_logical_axis_rules(3, 1)


def test_mesh_errors_say_what_to_do():
  with pytest.raises(ValueError, match="does not divide the 8 devices"):
    partitioning.make_mesh(num_partitions=3)
  with pytest.raises(ValueError, match=r"product must be 8"):
    partitioning.make_mesh(mesh_shape=(3, 2))
  with pytest.raises(ValueError, match="DATAxMODEL"):
    partitioning.parse_mesh("4by2")
  assert partitioning.make_mesh(num_partitions=2).shape == {"data": 4, "model": 2}


def test_load_t5_places_arrays_straight_into_shards(tmp_path):
  from softprompt_jax.checkpoints.hf_writer import save_hf_t5
  t5_params, _ = sj.init_params(sj.T5(CONFIG), jax.random.PRNGKey(3))
  save_hf_t5(tmp_path, t5_params, CONFIG)
  partitioner = partitioning.Partitioner.create(mesh_shape=(2, 4))
  shardings = partitioner.param_shardings(sj.T5(CONFIG))
  _, loaded = sj.load_t5(tmp_path, place=partitioner.place(shardings))
  kernel = loaded["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
  assert kernel.sharding == flatten_dict(shardings)[("encoder", "layers_0", "mlp", "wi_0",
                                                     "kernel")]
  assert kernel.addressable_shards[0].data.shape == (16, 32 // 4)
  np.testing.assert_array_equal(np.asarray(kernel),
                                np.asarray(t5_params["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]))


def test_process_rows_on_one_host_cover_the_batch():
  partitioner = partitioning.Partitioner.create(mesh_shape=(4, 2))
  assert partitioner.process_rows(16) == slice(0, 16)
