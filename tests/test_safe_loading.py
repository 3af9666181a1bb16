"""Safe loading: nothing is unpickled or executed from a file that a user or a
checkpoint supplies. Every loader runs with unpickling made impossible; pickled payloads are
refused by name or by content, and the code inside them never runs."""

import _pickle
import contextlib
import json
import pathlib
import pickle
import pickletools
import re
import sys

import flax.serialization
import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import pytest
import tensorstore as ts
from flax.traverse_util import flatten_dict, unflatten_dict

from softprompt_jax import T5, prompts, tiny_config
from softprompt_jax.checkpoints.hf_writer import save_hf_t5
from softprompt_jax.checkpoints.checkpoint_reader import CheckpointError
from softprompt_jax.checkpoints.state import PromptCheckpoints
from softprompt_jax.cli import main
from softprompt_jax.checkpoints.loading import load_t5, open_checkpoint
from softprompt_jax.peft_interop import load_peft_adapter, save_peft_adapter

CONFIG = tiny_config("t5_1_1", relative_attention_max_distance=20)
SMOKE = ["--gin_file", "runs/smoke.gin"]
TASK = "taskless_synthetic_sentiment"

# --------------------------------------------------------------------------------------------
# Unpickling made impossible


_FORBID = {"active": False, "events": []}


def _audit(event, args):
  # Every unpickler (pickle's, _pickle's, numpy's, any library's) resolves the classes and
  # functions a payload names through find_class, which raises this audit event first.
  if _FORBID["active"] and event == "pickle.find_class":
    _FORBID["events"].append(args)
    raise RuntimeError(f"unpickling {args} while loading")


sys.addaudithook(_audit)  # audit hooks cannot be removed; this one is inert unless active


@contextlib.contextmanager
def unpickling_forbidden():
  """pickle.load/loads/Unpickler (both modules) and numpy's allow_pickle path raise; so does any
  class lookup by an unpickler. Yields the list of attempts (asserted empty on exit)."""
  attempts = []
  monkeypatch = pytest.MonkeyPatch()

  def refuse(name):
    def call(*args, **kwargs):
      attempts.append(name)
      raise AssertionError(f"{name} called while loading")
    return call

  for module in (pickle, _pickle):
    for name in ("load", "loads", "Unpickler"):
      monkeypatch.setattr(module, name, refuse(f"{module.__name__}.{name}"))
  real_np_load = np.load

  def np_load(*args, allow_pickle=False, **kwargs):
    if allow_pickle:
      attempts.append("numpy.load(allow_pickle=True)")
      raise AssertionError("numpy.load with allow_pickle=True while loading")
    return real_np_load(*args, allow_pickle=False, **kwargs)

  monkeypatch.setattr(np, "load", np_load)
  _FORBID["active"], _FORBID["events"] = True, []
  try:
    yield attempts
  finally:
    _FORBID["active"] = False
    monkeypatch.undo()
  assert not attempts and not _FORBID["events"], (
      f"unpickling attempts while loading: {attempts} {_FORBID['events']}")


def test_the_guard_catches_unpickling(tmp_path):
  """The control: with the guard on, every way of unpickling is caught."""
  payload = pickle.dumps({"a": np.ones(2)})
  np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
  with pytest.raises(AssertionError, match="unpickling attempts"):
    with unpickling_forbidden() as attempts:
      for attempt in (lambda: pickle.loads(payload), lambda: _pickle.loads(payload),
                      lambda: np.load(tmp_path / "obj.npy", allow_pickle=True)):
        with pytest.raises(AssertionError):
          attempt()
      assert len(attempts) == 3
  # A reference kept from before the patch (`from pickle import loads`) still trips the audit
  # hook, before any class it names is looked up.
  loads = _pickle.loads
  _FORBID["active"] = True
  try:
    with pytest.raises(RuntimeError, match="unpickling"):
      loads(payload)
  finally:
    _FORBID["active"] = False


# --------------------------------------------------------------------------------------------
# Every loader, built here and read with unpickling forbidden


def _params(config, seed):
  tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
  shapes = jax.eval_shape(T5(config).init, jax.random.PRNGKey(0), tokens, tokens)["params"]
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), shapes)


def _assert_same(ours, reference):
  ours, reference = flatten_dict(ours), flatten_dict(reference)
  assert sorted(ours) == sorted(reference)
  for path, value in reference.items():
    np.testing.assert_array_equal(np.asarray(ours[path]), np.asarray(value, np.float32))


def _write_t5x_legacy(directory: pathlib.Path, params: dict) -> pathlib.Path:
  """checkpoint_1/ as t5x writes it: msgpack with inline arrays, and zarr arrays in 'file' and
  'ocdbt' kvstores beside it."""
  ckpt = directory / "checkpoint_1"
  ckpt.mkdir(parents=True)
  written = {}
  for i, (path, value) in enumerate(sorted(flatten_dict(params).items())):
    kind = ("inline", "file", "ocdbt")[i % 3] if value.ndim == 2 else "inline"
    if kind == "inline":
      written[path] = value
      continue
    name = "target." + ".".join(path)
    spec = {"driver": "zarr", "metadata": {"compressor": {"id": "gzip"}}}
    write_kv = ({"driver": "ocdbt", "base": {"driver": "file", "path": str(ckpt) + "/"},
                 "path": name} if kind == "ocdbt" else
                {"driver": "file", "path": str(ckpt / name)})
    store = ts.open({**spec, "kvstore": write_kv}, create=True, dtype=value.dtype.name,
                    shape=value.shape).result()
    store.write(value).result()
    written[path] = {**spec, "kvstore": {"driver": kind, "path": name}}
  contents = {"version": 3, "optimizer": {"target": unflatten_dict(written),
                                          "state": {"step": np.int32(1)}}}
  (ckpt / "checkpoint").write_bytes(flax.serialization.msgpack_serialize(contents))
  return ckpt


def _write_t5x_orbax(directory: pathlib.Path, params: dict) -> pathlib.Path:
  """t5x's orbax layout: checkpoint_N/state/ saved by an ocdbt PyTree handler."""
  import orbax.checkpoint as ocp
  manager = ocp.CheckpointManager(
      directory, item_handlers={"state": ocp.PyTreeCheckpointHandler(use_ocdbt=True)},
      options=ocp.CheckpointManagerOptions(step_prefix="checkpoint", create=True))
  state = {"target": jax.tree.map(jnp.asarray, params), "state": {"step": np.int32(2)}}
  manager.save(2, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state)), force=True)
  manager.wait_until_finished()
  manager.close()
  return directory / "checkpoint_2"


def test_checkpoint_loaders_never_unpickle(tmp_path):
  params = _params(CONFIG, 1)
  hf = save_hf_t5(tmp_path / "hf", params, CONFIG)
  legacy = _write_t5x_legacy(tmp_path / "legacy", params)
  orbax_ckpt = _write_t5x_orbax(tmp_path / "orbax", params)
  raw = (legacy / "checkpoint").read_bytes()
  assert b"ocdbt" in raw and b"zarr" in raw  # every kind of leaf is exercised

  with unpickling_forbidden():
    for path in (hf, legacy, orbax_ckpt):
      model, loaded = load_t5(path, relative_attention_max_distance=20)
      assert model.config.emb_dim == CONFIG.emb_dim
      _assert_same(loaded, params)


def test_prompt_loaders_never_unpickle(tmp_path):
  from softprompt_jax.inference import _prompt_values
  from softprompt_jax.run_dir import best_prompt
  values = np.random.RandomState(3).randn(4, 16).astype(np.float32)
  prompts.save_npy(tmp_path / "p.npy", values)
  save_peft_adapter(tmp_path / "adapter", values, num_layers=2, num_heads=2)
  ckpt = tmp_path / "t5x" / "checkpoint_3"
  ckpt.mkdir(parents=True)
  (ckpt / "checkpoint").write_bytes(flax.serialization.msgpack_serialize(
      {"version": 3, "optimizer": {"target": {"encoder": {"prompt": {"prompt": values}}}}}))
  run = tmp_path / "run"  # a run's prompt checkpoints, as train writes them
  saved = PromptCheckpoints(run / "checkpoints", best_metric="accuracy")
  state = {"step": np.int32(5), "trainable": {"prompt": {"prompt": values}}}
  saved.save(5, state, {"position": 5}, {"task": TASK, "best_metric": "accuracy",
                                         "best_mode": "max"}, {"accuracy": 50.0})
  saved.close()

  with unpickling_forbidden():
    loaded = {
        "npy": prompts.load_npy(tmp_path / "p.npy"),
        "from_npy": prompts.from_npy(str(tmp_path / "p.npy"))(None, (4, 16)),
        "peft": load_peft_adapter(tmp_path / "adapter"),
        "from_peft_adapter": prompts.from_peft_adapter(str(tmp_path / "adapter"))(None, (4, 16)),
        "t5x": prompts.from_t5x_checkpoint(str(ckpt))(None, (4, 16)),
        "run_checkpoint": best_prompt(run),
        "prompt_values_run": _prompt_values(run),
        "prompt_values_peft": _prompt_values(tmp_path / "adapter"),
    }
    reread = PromptCheckpoints(run / "checkpoints")
    assert reread.restore_meta(5)["task"] == TASK
    reread.close()
  for name, got in loaded.items():
    np.testing.assert_array_equal(np.asarray(got), values, err_msg=name)


def test_shipped_model_and_data_files_never_unpickle(tmp_path):
  from softprompt_jax.data.readers import located_records
  from softprompt_jax.pretrained import load_tiny
  (tmp_path / "d.jsonl").write_text(json.dumps({"text": "a", "label": 1}) + "\n")
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet  # noqa: F401
  pa.parquet.write_table(pa.table({"text": ["b"], "label": [0]}), tmp_path / "d.parquet")
  with unpickling_forbidden():
    model, params = load_tiny()
    assert params["token_embedder"]["embedding"].shape[0] == model.config.vocab_size
    records = [r for name in ("d.jsonl", "d.parquet")
               for _, r in located_records(tmp_path / name)]
  assert records == [{"text": "a", "label": 1}, {"text": "b", "label": 0}]


def test_real_fixtures_never_unpickle(testdata):
  """The released prompts, the T5 SentencePiece model and the real t5x checkpoint."""
  from softprompt_jax.tokenizers import get_vocabulary
  with unpickling_forbidden():
    prompt = prompts.load_npy(testdata / "released_prompts" / "t5_1_1_lm100k_base" /
                              "rte.npy")
    vocab = get_vocabulary(testdata / "t5_vocab" / "sentencepiece.model")
    model, _ = load_t5(testdata / "t5x_t5_1_1_tiny" / "checkpoint_3")
  assert prompt.shape == (100, 768) and vocab.vocab_size > 32000
  assert model.config.vocab_size == 32128


# --------------------------------------------------------------------------------------------
# Pickled payloads: refused, and their code never runs


class _Payload:
  """Pickles to a program that creates `marker` when unpickled."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (open, (self.marker, "w"))


def _live_pickle(marker) -> bytes:
  payload = pickle.dumps(_Payload(marker))
  # A live payload (it calls `open` on load), checked without running it.
  assert any(op.name in ("REDUCE", "STACK_GLOBAL") for op, _, _ in pickletools.genops(payload))
  return payload


def _object_npy(path: pathlib.Path, marker) -> pathlib.Path:
  np.save(path, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
  assert path.read_bytes()[:6] == b"\x93NUMPY"  # a genuine .npy header, pickled body
  return path


def test_object_npy_prompt_is_refused_and_not_run(tmp_path, capsys):
  marker = tmp_path / "ran.marker"
  evil = _object_npy(tmp_path / "evil.npy", marker)
  disguised = tmp_path / "disguised.npy"  # a raw pickle named .npy
  disguised.write_bytes(_live_pickle(marker))
  with unpickling_forbidden():
    with pytest.raises(prompts.PromptFileError, match=r"evil\.npy.*pickled objects are refused"):
      prompts.load_npy(evil)
    with pytest.raises(prompts.PromptFileError, match=r"disguised\.npy: a pickle, refused"):
      prompts.from_npy(str(disguised))
    # Through the CLI, for training and for evaluation: one line naming the file.
    for argv in (["train", *SMOKE, "--model_dir", str(tmp_path / "run"), "--gin_file",
                  "prompts/from_file.gin", f"--gin.PROMPT_FILE='{evil}'"],
                 ["eval", "--gin_file", "models/tiny.gin", "--gin_file", "runs/prompt_eval.gin",
                  f"--gin.TASK='{TASK}'", f"--gin.PROMPT_FILE='{evil}'"]):
      capsys.readouterr()
      assert main(argv) == 2
      err = capsys.readouterr().err.splitlines()
      assert len(err) == 1 and str(evil) in err[0] and "pickled objects are refused" in err[0]
  assert not marker.exists()
  assert not (tmp_path / "run").exists()


def test_pickle_prompt_files_are_refused_by_name(tmp_path, capsys):
  from softprompt_jax.inference import _prompt_values
  marker = tmp_path / "ran.marker"
  (tmp_path / "prompt.pt").write_bytes(_live_pickle(marker))
  adapter = tmp_path / "adapter"
  adapter.mkdir()
  (adapter / "adapter_config.json").write_text(json.dumps(
      {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}))
  (adapter / "adapter_model.bin").write_bytes(_live_pickle(marker))
  with unpickling_forbidden():
    with pytest.raises(CheckpointError, match=r"prompt\.pt is a pickle; refusing.*safetensors"):
      _prompt_values(tmp_path / "prompt.pt")
    with pytest.raises(CheckpointError, match=r"adapter_model\.bin is a PyTorch pickle.*"
                       r"safe_serialization=True"):
      load_peft_adapter(adapter)
    capsys.readouterr()
    assert main(["eval", "--gin_file", "models/tiny.gin", "--gin_file", "runs/prompt_eval.gin",
                 f"--gin.TASK='{TASK}'", f"--gin.PROMPT_FILE='{adapter}'"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "adapter_model.bin" in err[0]
  assert not marker.exists()


def test_pytorch_only_model_directory_is_refused(tmp_path, capsys):
  marker = tmp_path / "ran.marker"
  directory = tmp_path / "hf_torch"
  directory.mkdir()
  (directory / "pytorch_model.bin").write_bytes(_live_pickle(marker))
  with unpickling_forbidden():
    with pytest.raises(CheckpointError) as info:
      load_t5(directory)
    message = str(info.value)
    assert "pytorch_model.bin" in message and "refusing" in message
    assert "convert" in message.lower() and "safetensors" in message
    capsys.readouterr()
    assert main(["train", *SMOKE, "--model_dir", str(tmp_path / "run"),
                 f"--gin.frozen_model.checkpoint='{directory}'"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "pytorch_model.bin" in err[0] and "safetensors" in err[0]
  assert not marker.exists()


def test_a_pickle_named_like_a_t5x_checkpoint_is_not_unpickled(tmp_path):
  """A pickle starts with 0x80, which msgpack reads as a map: it is parsed as msgpack (no code
  runs) and refused as malformed."""
  marker = tmp_path / "ran.marker"
  ckpt = tmp_path / "checkpoint_4"
  ckpt.mkdir()
  (ckpt / "checkpoint").write_bytes(_live_pickle(marker))
  with unpickling_forbidden():
    with pytest.raises(CheckpointError, match=re.escape(str(ckpt / "checkpoint"))):
      load_t5(ckpt)
  assert not marker.exists()


def test_object_dtype_in_a_t5x_msgpack_is_refused(tmp_path):
  """A flax ndarray extension claiming dtype 'object' would be raw pointers; it is refused."""
  array = msgpack.ExtType(1, msgpack.packb([[2], "object", b"\x00" * 16]))
  ckpt = tmp_path / "checkpoint_1"
  ckpt.mkdir()
  (ckpt / "checkpoint").write_bytes(msgpack.packb({"target": {"x": array}}))
  with unpickling_forbidden():
    with pytest.raises(CheckpointError, match="not numeric|unknown array dtype"):
      open_checkpoint(ckpt)
