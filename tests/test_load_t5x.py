"""load_t5 on t5x checkpoints: the real legacy fixture, legacy checkpoints written here the way t5x
writes them (flax msgpack + tensorstore), and t5x's orbax layout written with orbax itself."""

import pathlib

import flax.serialization
import jax
import jax.numpy as jnp
import ml_dtypes
import msgpack
import numpy as np
import pytest
import tensorstore as ts
from flax.traverse_util import flatten_dict, unflatten_dict

from softprompt_jax import T5, tiny_config
from softprompt_jax.checkpoints.t5x import InlineArray, parse_msgpack
from softprompt_jax.checkpoints.loading import load_t5

FIXTURE = "t5x_t5_1_1_tiny"


def _flat(params):
  return {"/".join(k): np.asarray(v) for k, v in flatten_dict(params).items()}


def _assert_same_params(ours, reference):
  ours, reference = _flat(ours), _flat(reference)
  assert sorted(ours) == sorted(reference)
  for name, value in reference.items():
    assert ours[name].dtype == np.float32, name
    np.testing.assert_array_equal(ours[name], value.astype(np.float32), err_msg=name)


def _random_params(config, seed):
  """Params of T5(config) with values unlike any initialiser (so a mix-up shows)."""
  tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
  shapes = jax.eval_shape(T5(config).init, jax.random.PRNGKey(0), tokens, tokens)["params"]
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), shapes)


# --------------------------------------------------------------------------------------------
# The real t5x checkpoint


@pytest.fixture(scope="module")
def fixture_dir(testdata) -> pathlib.Path:
  return testdata / FIXTURE


@pytest.fixture(scope="module")
def fixture_loaded(fixture_dir):
  return load_t5(fixture_dir / "checkpoint_3", dropout_rate=0.0)


def test_real_fixture_loads_with_inferred_config(fixture_dir, fixture_loaded):
  model, params = fixture_loaded
  gold = np.load(fixture_dir / "token_embedder_embedding.npy", allow_pickle=False)
  assert gold.shape == (32128, 4)
  embedding = params["token_embedder"]["embedding"]
  assert isinstance(embedding, jax.Array) and embedding.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(embedding), gold)
  # The sizes the fixture's README states, recovered from array shapes alone.
  c = model.config
  assert (c.vocab_size, c.emb_dim, c.num_heads, c.head_dim, c.mlp_dim) == (32128, 4, 2, 2, 8)
  assert (c.num_encoder_layers, c.num_decoder_layers) == (2, 2)
  assert c.relative_attention_num_buckets == 4
  assert c.mlp_activations == ("gelu", "linear") and not c.logits_via_embedding
  assert c.relative_attention_max_distance == 128 and c.dropout_rate == 0.0


def test_real_fixture_forward_pass(fixture_loaded):
  model, params = fixture_loaded
  enc = np.array([[8774, 296, 32099, 3, 226, 1], [37, 1, 0, 0, 0, 0]], np.int32)
  dec = np.array([[0, 32099, 5], [0, 37, 1]], np.int32)
  logits = model.apply({"params": params}, enc, dec)
  assert logits.shape == (2, 3, 32128) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  assert float(jnp.std(logits)) > 0


def test_real_fixture_every_array_matches_an_independent_read(fixture_dir, fixture_loaded):
  """Each target array equals flax's own msgpack decoding, or tensorstore's read of its zarr."""
  ckpt = fixture_dir / "checkpoint_3"
  contents = flax.serialization.msgpack_restore((ckpt / "checkpoint").read_bytes())
  assert contents["version"] == 3
  target = flatten_dict(contents["optimizer"]["target"],
                        is_leaf=lambda _, v: isinstance(v, dict) and "driver" in v)
  n_zarr = 0
  reference = {}
  for path, leaf in target.items():
    if isinstance(leaf, dict):
      n_zarr += 1
      zarr_dir = ckpt / leaf["kvstore"]["path"]
      store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(zarr_dir)}},
                      read=True).result()
      leaf = store.read().result()
    reference[path] = leaf
  assert n_zarr > 0 and n_zarr < len(target)  # both kinds of leaf are exercised
  _assert_same_params(fixture_loaded[1], unflatten_dict(reference))


@pytest.mark.parametrize("where", ["model_dir", "checkpoint_file"])
def test_real_fixture_other_path_forms(fixture_dir, fixture_loaded, where):
  path = fixture_dir if where == "model_dir" else fixture_dir / "checkpoint_3" / "checkpoint"
  _, params = load_t5(path)
  _assert_same_params(params, fixture_loaded[1])


# --------------------------------------------------------------------------------------------
# The msgpack walker against flax's decoder


def test_msgpack_walker_matches_flax():
  rng = np.random.RandomState(0)
  tree = {
      "ints": [0, 1, 127, 128, 255, 256, 65535, 65536, 2**31, 2**40, -1, -32, -33, -200, -40000,
               -2**33],
      "floats": [0.5, -1e300, float("inf")],
      "flags": [True, False, None],
      "strings": ["", "x" * 31, "y" * 32, "z" * 300, "w" * 70000],
      "blob": b"\x00\x01" * 200,
      "wide": {f"k{i}": i for i in range(20)},  # map16
      "long": list(range(20)),  # array16
      "complex": 1 + 2j,
      "scalar": np.float32(1.5),
      "arrays": {
          "f32": rng.standard_normal((3, 5)).astype(np.float32),
          "bf16": rng.standard_normal((4,)).astype(ml_dtypes.bfloat16),
          "i8": np.arange(-3, 3, dtype=np.int8),
          "f16_big": rng.standard_normal((70, 1000)).astype(np.float16),  # bin32 payload
          "empty": np.zeros((0, 3), np.float32),
      },
  }
  data = flax.serialization.msgpack_serialize(tree)
  expected = flax.serialization.msgpack_restore(data)
  parsed = parse_msgpack(data)

  def materialise(node):
    if isinstance(node, InlineArray):
      return np.frombuffer(data[node.offset:node.offset + node.nbytes],
                           node.dtype).reshape(node.shape)
    if isinstance(node, dict):
      return {k: materialise(v) for k, v in node.items()}
    if isinstance(node, list):
      return [materialise(v) for v in node]
    return node

  got = materialise(parsed)
  flat_got = flatten_dict(got)
  flat_expected = flatten_dict(expected)
  assert flat_got.keys() == flat_expected.keys()
  for key, want in flat_expected.items():
    value = flat_got[key]
    if isinstance(want, (np.ndarray, np.generic)):
      assert np.asarray(value).dtype == np.asarray(want).dtype, key
      np.testing.assert_array_equal(np.asarray(value), np.asarray(want), err_msg=str(key))
    else:
      assert value == want, key
  with pytest.raises(ValueError):
    parse_msgpack(data[:-5])
  with pytest.raises(ValueError):
    parse_msgpack(data + msgpack.packb(1))


# --------------------------------------------------------------------------------------------
# Legacy checkpoints written here as t5x writes them


def _write_zarr(directory: pathlib.Path, name: str, array: np.ndarray, kvstore: dict) -> dict:
  """Writes `array` as t5x does and returns the spec t5x keeps in the msgpack file."""
  spec = {"driver": "zarr", "metadata": {"compressor": {"id": "gzip"}}}
  if kvstore["driver"] == "ocdbt":
    write_kv = {"driver": "ocdbt", "base": {"driver": "file", "path": str(directory) + "/"},
                "path": name}
  else:
    write_kv = {"driver": "file", "path": str(directory / name)}
  store = ts.open({**spec, "kvstore": write_kv}, create=True, dtype=array.dtype.name,
                  shape=array.shape).result()
  store.write(array).result()
  return {**spec, "kvstore": {**kvstore, "path": name},
          "metadata": {**spec["metadata"], "shape": list(array.shape)}}


def _write_legacy(directory: pathlib.Path, params: dict, step: int) -> dict:
  """A t5x checkpoint_N with every kind of leaf; returns the values it holds."""
  ckpt = directory / f"checkpoint_{step}"
  ckpt.mkdir(parents=True)
  written, stored = {}, {}
  kinds = ["inline", "file", "gfile", "gcs", "ocdbt"]  # cycled over the 2-D arrays
  n_2d = 0
  for path, value in sorted(flatten_dict(params).items()):
    name = "target." + ".".join(path)
    kind = "inline"
    if path == ("token_embedder", "embedding"):
      value, kind = value.astype(ml_dtypes.bfloat16), "file"  # a bfloat16 zarr leaf
    elif path == ("encoder", "encoder_norm", "scale"):
      value = value.astype(ml_dtypes.bfloat16)  # a bfloat16 inline leaf
    elif value.ndim == 2:
      kind, n_2d = kinds[n_2d % len(kinds)], n_2d + 1
    if kind == "inline":
      written[path] = value
    else:
      kv = {"driver": kind, "bucket": "t5x-dummy-bucket"} if kind == "gcs" else {"driver": kind}
      written[path] = _write_zarr(ckpt, name, value, kv)
    stored[path] = value
  state = {"step": np.int32(step),
           "param_states": {"decoder": {"decoder_norm": {"scale": {"v": np.ones(3, np.float32)}}}}}
  contents = {"version": 3, "optimizer": {"target": unflatten_dict(written), "state": state}}
  (ckpt / "checkpoint").write_bytes(flax.serialization.msgpack_serialize(contents))
  return unflatten_dict(stored)


def test_legacy_t5_1_0_round_trip(tmp_path, monkeypatch):
  """Relu MLP, tied logits, encoder and decoder depths differ: all inferred; latest step used."""
  config = tiny_config("t5_1_0", num_decoder_layers=3, relative_attention_max_distance=20,
                       dropout_rate=0.0)
  # Arrays over this many bytes are split into flax's chunked form (normally 1 GiB): here the
  # inline MLP kernels (2 KiB) are, the attention kernels (1 KiB) are not.
  monkeypatch.setattr(flax.serialization, "MAX_CHUNK_SIZE", 1500)
  older = _write_legacy(tmp_path, _random_params(config, 1), step=2)
  stored = _write_legacy(tmp_path, _random_params(config, 2), step=10)
  (tmp_path / "checkpoint_11.tmp-1700000000").mkdir()  # an unfinished save, ignored
  raw = (tmp_path / "checkpoint_10" / "checkpoint").read_bytes()
  for marker in (b"__msgpack_chunked_array__", b"ocdbt", b"gfile", b"gcs", b"bfloat16"):
    assert marker in raw, marker

  model, params = load_t5(tmp_path, relative_attention_max_distance=20, dropout_rate=0.0)
  assert model.config == config
  _assert_same_params(params, stored)
  assert not np.array_equal(np.asarray(params["decoder"]["decoder_norm"]["scale"]),
                            older["decoder"]["decoder_norm"]["scale"])


# --------------------------------------------------------------------------------------------
# t5x's orbax layout


def _save_like_t5x_orbax(model_dir: pathlib.Path, state: dict, step: int):
  """What t5x's OrbaxCheckpointManagerInterface.save does: a CheckpointManager with step prefix
  'checkpoint' whose item 'state' is the train state dict, saved by an ocdbt PyTree handler."""
  import orbax.checkpoint as ocp
  manager = ocp.CheckpointManager(
      model_dir, item_handlers={"state": ocp.PyTreeCheckpointHandler(use_ocdbt=True)},
      options=ocp.CheckpointManagerOptions(step_prefix="checkpoint", create=True))
  manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state)), force=True)
  manager.wait_until_finished()
  manager.close()


def test_orbax_round_trip(tmp_path):
  config = tiny_config("t5_1_1", relative_attention_max_distance=20)
  stored = _random_params(config, 3)
  target = jax.tree.map(jnp.asarray, stored)
  target["decoder"]["logits_dense"]["kernel"] = target["decoder"]["logits_dense"]["kernel"].astype(
      jnp.bfloat16)
  stored["decoder"]["logits_dense"]["kernel"] = np.asarray(
      target["decoder"]["logits_dense"]["kernel"])
  adafactor = jax.tree.map(lambda p: {"v_row": np.ones(p.shape[:1], np.float32)}, stored)
  state = {"target": target, "state": {"step": np.int32(4), "param_states": adafactor}}
  _save_like_t5x_orbax(tmp_path, state, step=4)
  item = tmp_path / "checkpoint_4" / "state"
  assert (item / "manifest.ocdbt").is_file() and not (tmp_path / "checkpoint_4" /
                                                       "checkpoint").exists()

  model, params = load_t5(tmp_path, relative_attention_max_distance=20)
  assert model.config == config
  _assert_same_params(params, stored)
  for path in (tmp_path / "checkpoint_4", item):
    _, again = load_t5(path)
    _assert_same_params(again, stored)
