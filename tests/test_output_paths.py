"""User-named outputs are written into whatever the path is, never replacing it:
a file atomically, a symlink's target (the link stays), a FIFO or device by
streaming, `-` to stdout; eval prints its metrics before writing them; infer checks every
request line before loading the model."""

import errno
import json
import os
import pathlib
import stat
import threading
import types

import numpy as np
import pytest

from softprompt_jax import output_files, peft_interop, prompts
from softprompt_jax.cli import main
# Imported before any test patches its names (a module imported under a patch keeps them).
import softprompt_jax.inference  # noqa: F401

TASK = "taskless_synthetic_sentiment"
D_MODEL = 32  # configs/models/tiny.gin
INFER = ["infer", "--gin_file", "models/tiny.gin", "--gin_file", "runs/prompt_infer.gin",
         "--gin.infer.input_length=16", "--gin.infer.target_length=4",
         "--gin.infer.batch_size=2"]
EVAL = ["eval", "--gin_file", "models/tiny.gin", "--gin_file", "runs/prompt_eval.gin",
        f"--gin.TASK='{TASK}'"]


@pytest.fixture
def requests_file(tmp_path):
  path = tmp_path / "requests.jsonl"
  path.write_text(json.dumps({"task": TASK, "inputs": "great happy day"}) + "\n"
                  + json.dumps({"task": TASK, "record": {"text": "awful sad"}}) + "\n")
  return path


@pytest.fixture
def bank(tmp_path):
  path = tmp_path / "prompt.npy"
  np.save(path, np.random.RandomState(0).uniform(-0.5, 0.5, (4, D_MODEL)).astype(np.float32))
  return {TASK: str(path)}


@pytest.fixture
def fake_decode(monkeypatch):
  """Predictions without decoding (the output path is under test, not the model): 'p0', 'p1',
  ...; `fake_decode.texts` replaces them."""
  state = types.SimpleNamespace(texts=None)

  def decode(net, params, rows, *args):
    return state.texts if state.texts is not None else [f"p{i}" for i in range(len(rows))]
  monkeypatch.setattr("softprompt_jax.inference._decode_requests", decode)
  return state


def _infer(bank, requests, out, *extra):
  return main([*INFER, f"--gin.PROMPTS={bank!r}", f"--gin.INPUT_FILE='{requests}'",
               f"--gin.OUTPUT_FILE='{out}'", *extra])


def _expected_predictions(texts=("p0", "p1")) -> str:
  inputs = ["great happy day", "awful sad"]
  return "".join(json.dumps({"task": TASK, "inputs": i, "prediction": t}) + "\n"
                 for i, t in zip(inputs, texts))


def _one_error_line(capsys, command) -> str:
  lines = capsys.readouterr().err.splitlines()
  assert len(lines) == 1, lines
  assert lines[0].startswith(f"softprompt-jax {command}: error: "), lines[0]
  return lines[0]


class FifoReader:
  """Reads a FIFO in a thread (a writer's open blocks until a reader has it open)."""

  def __init__(self, path: pathlib.Path):
    self.path, self.data = path, None
    os.mkfifo(path)
    self.thread = threading.Thread(target=self._read, daemon=True)
    self.thread.start()

  def _read(self):
    with open(self.path, "rb") as f:
      self.data = f.read()

  def result(self) -> bytes:
    self.thread.join(timeout=1)
    if self.thread.is_alive():  # the writer never came: release the reader, then fail
      os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
      self.thread.join(timeout=5)
      pytest.fail(f"nothing opened {self.path} for writing")
    return self.data


def _no_temporary_files(directory: pathlib.Path, *keep: str):
  assert sorted(p.name for p in directory.iterdir()) == sorted(keep)


# --------------------------------------------------------------------------------------------
# output_files on its own


def test_a_regular_file_is_replaced_atomically_keeping_its_permissions(tmp_path):
  out = tmp_path / "out.txt"
  out.write_text("old\n")
  out.chmod(0o640)
  with pytest.raises(RuntimeError):
    with output_files.open_output(out) as f:
      f.write("half of the new")
      f.flush()
      raise RuntimeError("stopped mid-write")
  assert out.read_text() == "old\n"
  _no_temporary_files(tmp_path, "out.txt")
  output_files.write_text(out, "new\n")
  assert out.read_text() == "new\n" and stat.S_IMODE(out.stat().st_mode) == 0o640
  _no_temporary_files(tmp_path, "out.txt")
  output_files.write_text(tmp_path / "sub" / "dir" / "new.txt", "x")  # parents are made
  assert (tmp_path / "sub" / "dir" / "new.txt").read_text() == "x"


def test_a_symlink_keeps_its_link_and_its_target_is_written(tmp_path):
  target = tmp_path / "target.txt"
  target.write_text("old")
  link = tmp_path / "link.txt"
  link.symlink_to(target)
  output_files.write_text(link, "new")
  assert link.is_symlink() and target.read_text() == "new"
  dangling = tmp_path / "dangling.txt"
  dangling.symlink_to(tmp_path / "made.txt")
  output_files.write_text(dangling, "made")
  assert dangling.is_symlink() and (tmp_path / "made.txt").read_text() == "made"


def test_pipes_and_devices_are_streamed_to_not_replaced(tmp_path):
  reader = FifoReader(tmp_path / "fifo")
  assert output_files.is_stream(reader.path) and not output_files.is_stdout(reader.path)
  output_files.write_bytes(reader.path, b"through the pipe")
  assert reader.result() == b"through the pipe"
  assert stat.S_ISFIFO(os.lstat(reader.path).st_mode)
  output_files.write_text("/dev/null", "discarded")
  assert stat.S_ISCHR(os.lstat("/dev/null").st_mode)


def test_dash_is_stdout(capsys):
  assert output_files.is_stdout("-") and output_files.is_stream("-")
  print("before", end=" ")
  output_files.write_text("-", "data\n")
  assert capsys.readouterr().out == "before data\n"


def test_an_os_error_names_the_output_not_the_temporary_file(tmp_path, monkeypatch):
  def full(fd):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(os, "fsync", full)
  out = tmp_path / "out.txt"
  with pytest.raises(OSError) as raised:
    output_files.write_text(out, "x")
  assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(out)
  _no_temporary_files(tmp_path)


def test_a_failed_write_reports_its_own_error_when_the_temporary_file_cannot_go(tmp_path,
                                                                                monkeypatch):
  monkeypatch.setattr(os, "fsync", _raise_enospc)

  def refused(path, missing_ok=False):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
  monkeypatch.setattr(pathlib.Path, "unlink", refused)
  out = tmp_path / "out.txt"
  with pytest.raises(OSError) as raised:
    output_files.write_text(out, "x")
  assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(out)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)], ids=["022", "027"])
def test_a_new_file_has_the_permissions_the_umask_gives(tmp_path, umask, mode):
  before = os.umask(umask)
  try:
    output_files.write_bytes(tmp_path / "new.bin", b"x")
  finally:
    os.umask(before)
  assert stat.S_IMODE((tmp_path / "new.bin").stat().st_mode) == mode


def test_a_directory_is_no_output_file(tmp_path):
  with pytest.raises(IsADirectoryError, match="is a directory"):
    output_files.write_text(tmp_path, "x")
  (tmp_path / "file").write_text("")
  with pytest.raises(NotADirectoryError, match="is not a directory"):
    output_files.check_output_path(tmp_path / "file" / "out.txt")


# --------------------------------------------------------------------------------------------
# infer


def test_infer_decodes_for_real_into_a_symlinks_target(tmp_path, bank, requests_file):
  target = tmp_path / "kept" / "predictions.jsonl"
  target.parent.mkdir()
  target.write_text("old\n")
  link = tmp_path / "predictions.jsonl"
  link.symlink_to(target)
  assert _infer(bank, requests_file, link) == 0
  assert link.is_symlink() and link.resolve() == target
  rows = [json.loads(line) for line in target.read_text().splitlines()]
  assert [r["inputs"] for r in rows] == ["great happy day", "awful sad"]  # a label-less record
  assert all(isinstance(r["prediction"], str) for r in rows)
  _no_temporary_files(target.parent, "predictions.jsonl")


def test_infer_streams_to_a_fifo(tmp_path, bank, requests_file, fake_decode):
  reader = FifoReader(tmp_path / "predictions.fifo")
  assert _infer(bank, requests_file, reader.path) == 0
  assert reader.result().decode() == _expected_predictions()
  assert stat.S_ISFIFO(os.lstat(reader.path).st_mode)
  assert _infer(bank, requests_file, "/dev/null") == 0
  assert stat.S_ISCHR(os.lstat("/dev/null").st_mode)


def test_infer_to_dash_writes_stdout(bank, requests_file, fake_decode, capsys):
  assert _infer(bank, requests_file, "-") == 0
  out = capsys.readouterr().out
  assert _expected_predictions() in out
  assert not pathlib.Path("-").exists()


def test_infer_to_stdout_holds_only_the_predictions(bank, requests_file, fake_decode, capsys):
  """The CLI's own 'wrote N predictions' goes elsewhere when stdout is the output."""
  assert _infer(bank, requests_file, "-") == 0
  captured = capsys.readouterr()
  assert captured.out == _expected_predictions()
  assert "wrote 2 predictions" in captured.err


def test_infer_failing_mid_write_keeps_the_previous_file(tmp_path, bank, requests_file,
                                                         fake_decode):
  out = tmp_path / "predictions.jsonl"
  out.write_text("previous\n")
  fake_decode.texts = ["p0", object()]  # the second line cannot be written
  with pytest.raises(TypeError):
    _infer(bank, requests_file, out)
  assert out.read_text() == "previous\n"
  _no_temporary_files(tmp_path, "predictions.jsonl", "prompt.npy", "requests.jsonl")


def test_infer_on_a_full_disk_is_one_line_naming_the_output(tmp_path, bank, requests_file,
                                                            fake_decode, monkeypatch, capsys):
  out = tmp_path / "predictions.jsonl"
  out.write_text("previous\n")
  monkeypatch.setattr(os, "fsync", _raise_enospc)
  assert _infer(bank, requests_file, out) == 2
  line = _one_error_line(capsys, "infer")
  assert str(out) in line and "No space left" in line
  assert out.read_text() == "previous\n"


def _raise_enospc(fd):
  raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("line, words", [
    ({"task": TASK, "inputs": 7}, ["field 'inputs' must be a string, got int"]),
    ({"task": TASK, "inputs": ["a", "b"]}, ["field 'inputs' must be a string, got list"]),
    ({"task": TASK, "inputs": None}, ["field 'inputs' must be a string, got null"]),
    ({"task": 3, "inputs": "x"}, ["field 'task' must be a string, got int"]),
    ({"task": "nope", "inputs": "x"}, ["field 'task' is 'nope'", TASK]),
    ({"inputs": "x"}, ["needs field 'task'"]),
    ({"task": TASK}, ["needs field 'inputs'", "'record'"]),
    ({"task": TASK, "record": "text"}, ["field 'record' must be an object, got string"]),
    ({"task": TASK, "record": {"text": 5}}, ["field 'record'", "'text'", "int"]),
])
def test_infer_checks_every_request_before_loading_the_model(tmp_path, bank, no_expensive_work,
                                                             capsys, line, words):
  requests = tmp_path / "in.jsonl"
  good = json.dumps({"task": TASK, "inputs": "fine"})
  requests.write_text(f"{good}\n{good}\n{json.dumps(line)}\n{good}\n")
  out = tmp_path / "out.jsonl"
  assert _infer(bank, requests, out) == 2
  error = _one_error_line(capsys, "infer")
  assert f"{requests}:3: " in error
  for word in words:
    assert word in error
  assert not out.exists()


def test_infer_into_a_directory_is_one_line_before_loading_the_model(
    tmp_path, bank, requests_file, no_expensive_work, capsys):
  assert _infer(bank, requests_file, tmp_path) == 2
  assert f"{tmp_path} is a directory" in _one_error_line(capsys, "infer")


# --------------------------------------------------------------------------------------------
# export


@pytest.fixture
def run_dir(tmp_path):
  """A run directory as export reads it: its best prompt in prompt.npy."""
  run = tmp_path / "run"
  run.mkdir()
  prompts.save_npy(run / "prompt.npy", np.arange(4 * D_MODEL, dtype=np.float32).reshape(4, -1))
  return run


def _export(run, out):
  return main(["export", "--model_dir", str(run), "--out", str(out)])


def test_export_to_a_symlink_writes_its_target(tmp_path, run_dir):
  target = tmp_path / "target.npy"
  target.write_bytes(b"old")
  link = tmp_path / "link.npy"
  link.symlink_to(target)
  assert _export(run_dir, link) == 0
  assert link.is_symlink()
  np.testing.assert_array_equal(np.load(target), np.load(run_dir / "prompt.npy"))


def test_export_streams_npy_to_a_fifo_and_dev_null(tmp_path, run_dir):
  reader = FifoReader(tmp_path / "prompt_pipe")  # no .npy suffix: a stream still gets the .npy
  assert _export(run_dir, reader.path) == 0
  (tmp_path / "got.npy").write_bytes(reader.result())
  np.testing.assert_array_equal(np.load(tmp_path / "got.npy"), np.load(run_dir / "prompt.npy"))
  assert stat.S_ISFIFO(os.lstat(reader.path).st_mode)
  assert _export(run_dir, "/dev/null") == 0
  assert stat.S_ISCHR(os.lstat("/dev/null").st_mode)


def test_export_to_dash_writes_the_npy_bytes_to_stdout(tmp_path, run_dir, capfdbinary):
  assert _export(run_dir, "-") == 0
  out = capfdbinary.readouterr().out
  assert out == (run_dir / "prompt.npy").read_bytes()  # nothing but the .npy
  assert not pathlib.Path("-").exists()


def test_export_into_a_directory_or_a_file_is_one_line(tmp_path, run_dir, capsys):
  (tmp_path / "dir.npy").mkdir()
  assert _export(run_dir, tmp_path / "dir.npy") == 2
  assert "dir.npy is a directory" in _one_error_line(capsys, "export")
  adapter = tmp_path / "adapter"
  adapter.write_text("a file")
  with pytest.raises(NotADirectoryError, match="a PEFT adapter is a directory"):
    peft_interop.save_peft_adapter(adapter, np.ones((4, D_MODEL)), num_layers=2, num_heads=4)
  assert adapter.read_text() == "a file"


def test_a_peft_adapter_is_written_through_a_symlinked_directory(tmp_path):
  real = tmp_path / "real_adapter"
  real.mkdir()
  (real / peft_interop.ADAPTER_CONFIG).write_text("{}")
  link = tmp_path / "adapter"
  link.symlink_to(real, target_is_directory=True)
  values = np.random.RandomState(1).randn(4, D_MODEL).astype(np.float32)
  peft_interop.save_peft_adapter(link, values, num_layers=2, num_heads=4)
  assert link.is_symlink()
  np.testing.assert_array_equal(peft_interop.load_peft_adapter(real), values)
  _no_temporary_files(real, peft_interop.ADAPTER_CONFIG, peft_interop.ADAPTER_WEIGHTS)


# --------------------------------------------------------------------------------------------
# eval


@pytest.fixture
def fake_eval(monkeypatch):
  """Metrics without a model (what eval does with them is under test)."""
  metrics = {"accuracy": 62.5}
  monkeypatch.setattr("softprompt_jax.inference.setup_run",
                      lambda **kwargs: types.SimpleNamespace(task=types.SimpleNamespace(name=TASK),
                                                             params=None))
  monkeypatch.setattr("softprompt_jax.inference.run_eval", lambda *args, **kwargs: metrics)
  return metrics


def test_eval_prints_its_metrics_before_a_full_disk_refuses_the_file(run_dir, fake_eval,
                                                                      monkeypatch, capsys):
  monkeypatch.setattr(os, "fsync", _raise_enospc)
  assert main([*EVAL, "--model_dir", str(run_dir)]) == 2
  captured = capsys.readouterr()
  assert json.loads(captured.out) == fake_eval
  lines = captured.err.splitlines()
  assert len(lines) == 1 and lines[0].startswith("softprompt-jax eval: error: "), lines
  assert str(run_dir / "eval_validation.json") in lines[0] and "No space left" in lines[0]
  _no_temporary_files(run_dir, "prompt.npy")


def test_eval_writes_its_file_through_a_symlink(tmp_path, run_dir, fake_eval, capsys):
  target = tmp_path / "eval_kept.json"
  (run_dir / "eval_validation.json").symlink_to(target)
  assert main([*EVAL, "--model_dir", str(run_dir)]) == 0
  assert (run_dir / "eval_validation.json").is_symlink()
  assert json.loads(target.read_text())["metrics"] == fake_eval
