"""Prompt initializers, .npy import/export, the released prompts, and nearest-token reading."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softprompt_jax as sj
from softprompt_jax import nearest_tokens, prompts
from softprompt_jax.prompted_t5 import PromptedT5
from softprompt_jax.tokenizers import ByteVocabulary

VOCAB = ByteVocabulary()
EMBEDDING = jax.random.normal(jax.random.PRNGKey(0), (384, 16))


def _row_ids(values, embedding=EMBEDDING):
  """For each row, the id of the embedding row it equals exactly (-1 if none)."""
  table = np.asarray(embedding)
  out = []
  for row in np.asarray(values).reshape(-1, table.shape[1]):
    hits = np.where((table == row).all(axis=1))[0]
    out.append(int(hits[0]) if len(hits) else -1)
  return np.array(out)


def test_random_uniform_is_symmetric_in_half_unit_interval():
  values = np.asarray(prompts.random_uniform()(jax.random.PRNGKey(1), (100, 768)))
  assert values.min() >= -0.5 and values.max() <= 0.5
  assert values.min() < -0.45 and values.max() > 0.45  # both tails, unlike flax's [0, 0.5)
  assert abs(values.mean()) < 0.01
  assert values.std() == pytest.approx(1 / np.sqrt(12), rel=0.02)


def test_sampled_vocab_rows_are_frequent_token_embeddings():
  values = prompts.sampled_vocab(num_tokens=50)(jax.random.PRNGKey(2), (40, 16), EMBEDDING)
  ids = _row_ids(values)
  assert (ids >= prompts.NUM_SPECIAL_IDS).all() and (ids < prompts.NUM_SPECIAL_IDS + 50).all()
  assert len(set(ids)) > 20  # sampled, not one row repeated


def test_class_labels_average_each_label_then_sample():
  labels = ["positive", "negative", "no"]
  values = np.asarray(prompts.class_labels(labels, VOCAB, num_tokens=30)(
      jax.random.PRNGKey(3), (6, 16), EMBEDDING))
  for slot, label in enumerate(labels):
    ids = [b + 3 for b in label.encode("utf-8")]
    np.testing.assert_allclose(values[slot], np.asarray(EMBEDDING)[ids].mean(axis=0), atol=1e-6)
  rest = _row_ids(values[len(labels):])
  assert ((rest >= 3) & (rest < 33)).all()


def test_class_labels_label_order_sets_which_slot_each_label_takes():
  rng, shape = jax.random.PRNGKey(3), (4, 16)
  task_order = np.asarray(prompts.class_labels(["no", "yes"], VOCAB)(rng, shape, EMBEDDING))
  given = np.asarray(prompts.class_labels(["no", "yes"], VOCAB, label_order=["yes", "no"])(
      rng, shape, EMBEDDING))
  np.testing.assert_allclose(given[0], task_order[1])
  np.testing.assert_allclose(given[1], task_order[0])
  with pytest.raises(ValueError, match="must hold the task's labels"):
    prompts.class_labels(["no", "yes"], VOCAB, label_order=["yes", "maybe"])


def test_class_labels_fill_every_prompt_of_a_bank():
  values = np.asarray(prompts.class_labels(["yes", "no"], VOCAB)(
      jax.random.PRNGKey(3), (3, 4, 16), EMBEDDING))
  np.testing.assert_allclose(values[0, :2], values[2, :2])


def test_from_text_uses_the_text_tokens_in_order():
  values = prompts.from_text("sort", VOCAB)(jax.random.PRNGKey(4), (6, 16), EMBEDDING)
  assert list(_row_ids(values[:4])) == [b + 3 for b in b"sort"]


def test_initializer_errors_name_the_problem():
  with pytest.raises(prompts.PromptShapeError, match="3 labels.*length 2"):
    prompts.class_labels(["a", "b", "c"], VOCAB)(jax.random.PRNGKey(0), (2, 16), EMBEDDING)
  with pytest.raises(prompts.PromptShapeError, match="11 tokens.*prompt length is 4"):
    prompts.from_text("hello world", VOCAB)(jax.random.PRNGKey(0), (4, 16), EMBEDDING)
  with pytest.raises(ValueError, match="token embedding"):
    prompts.sampled_vocab()(jax.random.PRNGKey(0), (4, 16), None)
  with pytest.raises(ValueError, match="encode to no tokens"):
    prompts.class_labels(["", "x"], VOCAB)


def test_npy_round_trip_and_errors(tmp_path):
  values = np.random.RandomState(0).randn(7, 16).astype(np.float32)
  prompts.save_npy(tmp_path / "p.npy", values)
  loaded = prompts.from_npy(str(tmp_path / "p.npy"))(None, (7, 16))
  np.testing.assert_array_equal(np.asarray(loaded), values)
  assert np.load(tmp_path / "p.npy").dtype == np.float32
  with pytest.raises(prompts.PromptShapeError, match=r"p\.npy.*\(7, 16\).*\(8, 16\)"):
    prompts.from_npy(str(tmp_path / "p.npy"))(None, (8, 16))
  np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
  with pytest.raises(ValueError, match="pickled objects are refused"):
    prompts.from_npy(str(tmp_path / "obj.npy"))
  with pytest.raises(FileNotFoundError, match="missing.npy"):
    prompts.from_npy(str(tmp_path / "missing.npy"))


def test_released_prompts_load_into_a_base_configuration(testdata):
  model = PromptedT5(sj.t5_config("base"), prompt_length=100)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32),
                          jnp.ones((1, 2), jnp.int32))["params"]
  expected = shapes["prompt"]["prompt"].shape
  assert expected == (100, 768)
  for task in ("sst2", "mrpc", "rte"):
    path = testdata / "released_prompts" / "t5_1_1_lm100k_base" / f"{task}.npy"
    values = np.asarray(prompts.from_npy(str(path))(None, expected))
    assert values.dtype == np.float32 and np.isfinite(values).all()
    assert values.std() > 0
  with pytest.raises(prompts.PromptShapeError, match=r"\(100, 768\).*\(100, 512\)"):
    prompts.from_npy(str(path))(None, (100, 512))


def test_nearest_tokens_agree_with_brute_force():
  rng = np.random.RandomState(1)
  table = rng.randn(50, 8).astype(np.float32)
  prompt = np.concatenate([table[[7, 3]] * 2.5, rng.randn(3, 8).astype(np.float32)])
  ids, sims = nearest_tokens.nearest_tokens(prompt, table, k=4)
  assert ids[0, 0] == 7 and ids[1, 0] == 3
  np.testing.assert_allclose(sims[:2, 0], 1.0, atol=1e-5)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  brute = unit(prompt) @ unit(table).T
  np.testing.assert_array_equal(ids, np.argsort(-brute, axis=1)[:, :4])
  assert (np.diff(sims, axis=1) <= 1e-6).all()
  rows = nearest_tokens.describe(prompt[:1], table, None, k=2)
  assert rows[0]["ids"][0] == 7 and rows[0]["position"] == 0


def test_from_t5x_checkpoint_reads_a_prompt_variable(tmp_path):
  from flax import serialization
  values = np.random.RandomState(2).randn(6, 16).astype(np.float32)
  target = {"encoder": {"prompt": {"prompt": values},
                        "encoder_norm": {"scale": np.ones(16, np.float32)}}}
  ckpt = tmp_path / "checkpoint_10"
  ckpt.mkdir()
  (ckpt / "checkpoint").write_bytes(serialization.msgpack_serialize(
      {"version": 3, "optimizer": {"target": target, "state": {"step": np.int32(10)}}}))
  loaded = prompts.from_t5x_checkpoint(str(ckpt))(None, (6, 16))
  np.testing.assert_array_equal(np.asarray(loaded), values)
  with pytest.raises(prompts.PromptShapeError, match=r"\(6, 16\).*\(5, 16\)"):
    prompts.from_t5x_checkpoint(str(tmp_path))(None, (5, 16))
  with pytest.raises(ValueError, match="no variables match 'decoder/prompt'.*encoder/prompt"):
    prompts.from_t5x_checkpoint(str(ckpt), "decoder/prompt")
