"""A full (ENOSPC) or read-only (EROFS) disk under a `train` run: each write of the run fails in
turn — checkpoint, integrity file, metrics, TensorBoard events, summary, prompt, curves, gin
records — and the run stops with one line (exit 2), keeps its last good checkpoint, and once the
disk has room again the same command resumes and ends bit for bit as an uninterrupted run.

The fault is injected where the kernel would raise it (`DiskFault`), so the run's real code path
meets it; tensorstore's C++ writes (orbax's array data) are out of Python's reach, so a real full
file system (a small tmpfs, where this machine lets the test mount one) covers those.
"""

import contextlib
import errno
import fnmatch
import io
import json
import os
import pathlib
import re
import subprocess
import threading
from typing import Callable, Optional

import numpy as np
import pytest

from conftest import unwrapped_gin
from softprompt_jax.checkpoints.state import INTEGRITY_FILE, PromptCheckpoints
from softprompt_jax.cli import main
from softprompt_jax.errors import one_line
from softprompt_jax.run_log import RunLog, read_metrics

SMOKE = ["--gin_file", "runs/smoke.gin", "--gin.train.num_steps=30"]  # checkpoints 10, 20, 30
NO_SPACE = os.strerror(errno.ENOSPC)
READ_ONLY = os.strerror(errno.EROFS)

# --------------------------------------------------------------------------------------------
# The injected fault

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


class DiskFault:
  """The disk under `root` fills up (ENOSPC) or turns read-only (EROFS) at the first write to
  a file matching `pattern` (a glob over the path relative to `root`) once `armed()` holds, and
  stays so, for every file under `root`, until `remove()` — as a disk that filled up stays full.

  Patched: `open` / `io.open` (pathlib, orbax's JSON items through etils, the event files),
  `os.fdopen`, `os.open`, `os.write`, and for a read-only disk the calls that change a directory
  (mkdir, rename, replace, unlink, rmdir). A full disk fails a file's write or flush, naming no
  file, as write(2) does; the file itself is created, as on a real disk. A read-only one fails
  the open, mkdir, rename or unlink, naming the path.
  """

  def __init__(self, root, pattern: str, *, code: int = errno.ENOSPC,
               armed: Callable[[], bool] = lambda: True,
               on_trigger: Optional[Callable[[], None]] = None):
    self.root = os.path.realpath(root)
    self.pattern, self.code, self.armed, self.on_trigger = pattern, code, armed, on_trigger
    self.active = False
    self.triggered_by: Optional[str] = None  # the path whose write found the disk full
    self._lock = threading.Lock()
    self._patch = pytest.MonkeyPatch()
    real_open, real_fdopen, real_os_open, real_write = open, os.fdopen, os.open, os.write

    def fault_open(file, mode="r", *args, **kwargs):
      path = self._path_of(file)
      if path is None or not _writing(mode):
        return real_open(file, mode, *args, **kwargs)
      if self.code == errno.EROFS:
        self._write(path, named=True)
      return _FaultyFile(real_open(file, mode, *args, **kwargs), path, self)

    def fault_fdopen(fd, mode="r", *args, **kwargs):
      path = self._path_of(fd)
      if path is None or not _writing(mode):
        return real_fdopen(fd, mode, *args, **kwargs)
      return _FaultyFile(real_fdopen(fd, mode, *args, **kwargs), path, self)

    def fault_os_open(path, flags, *args, **kwargs):
      if flags & _WRITE_FLAGS and self.code == errno.EROFS and self._under_root(path):
        self._write(os.fsdecode(path), named=True)
      return real_os_open(path, flags, *args, **kwargs)

    def fault_write(fd, data):
      path = self._path_of(fd)
      if path is not None:
        self._write(path)
      return real_write(fd, data)

    self._patch.setattr("builtins.open", fault_open)
    self._patch.setattr(io, "open", fault_open)
    self._patch.setattr(os, "fdopen", fault_fdopen)
    self._patch.setattr(os, "open", fault_os_open)
    self._patch.setattr(os, "write", fault_write)
    if code == errno.EROFS:
      for name in ("mkdir", "rmdir", "unlink", "remove", "rename", "replace"):
        self._patch.setattr(os, name, self._refusing(getattr(os, name)))

  def remove(self) -> None:
    """Space is back (the disk writable again)."""
    self.active = False
    self._patch.undo()

  def _under_root(self, path) -> bool:
    try:
      path = os.path.realpath(os.fsdecode(path))
    except TypeError:
      return False
    return path == self.root or path.startswith(self.root + os.sep)

  def _path_of(self, file) -> Optional[str]:
    """The path under the root that `file` (a path or a descriptor) is; None if elsewhere."""
    if isinstance(file, int):
      try:
        file = os.readlink(f"/proc/self/fd/{file}")
      except OSError:
        return None
    if not isinstance(file, (str, bytes, os.PathLike)) or not self._under_root(file):
      return None
    return os.path.realpath(os.fsdecode(file))

  def _refusing(self, real):
    def refuse(*paths, **kwargs):
      for path in paths:
        if isinstance(path, (str, bytes, os.PathLike)) and self._under_root(path):
          self._write(os.fsdecode(path), named=True)
      return real(*paths, **kwargs)
    return refuse

  def _write(self, path: str, named: bool = False) -> None:
    """A write to `path`: may trigger the fault; raises once it is on."""
    with self._lock:
      if not self.active:
        if not (fnmatch.fnmatch(os.path.relpath(path, self.root), self.pattern)
                and self.armed()):
          return
        self.active, self.triggered_by = True, path
        if self.on_trigger is not None:
          self.on_trigger()
    raise OSError(self.code, os.strerror(self.code), *([path] if named else []))


def _writing(mode: str) -> bool:
  return any(c in mode for c in "wax+")


class _FaultyFile:
  """A file whose writes go through the fault first; everything else is the real file's."""

  def __init__(self, file, path: str, fault: DiskFault):
    self._file, self._path, self._fault = file, path, fault
    self._dirty = False  # written since the last flush

  def write(self, data):
    self._fault._write(self._path)
    self._dirty = True
    return self._file.write(data)

  def writelines(self, lines):
    self._fault._write(self._path)
    self._dirty = True
    return self._file.writelines(lines)

  def flush(self):
    if self._dirty and self._fault.active:
      self._fault._write(self._path)
    self._dirty = False
    return self._file.flush()

  def close(self):
    try:
      if self._dirty and self._fault.active and not self._file.closed:
        self._dirty = False
        self._fault._write(self._path)  # the final flush of what is buffered
    finally:
      self._file.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()

  def __iter__(self):
    return iter(self._file)

  def __getattr__(self, name):
    return getattr(self._file, name)


# --------------------------------------------------------------------------------------------
# Runs


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run: what every interrupted one must end with, bit for bit."""
  run = tmp_path_factory.mktemp("uninterrupted") / "run"
  assert main(["train", *SMOKE, "--model_dir", str(run)]) == 0
  return run


@pytest.fixture
def faults():
  """DiskFault(...) makers; every fault is removed at the end of the test, whatever happens."""
  made = []

  def make(*args, **kwargs):
    made.append(DiskFault(*args, **kwargs))
    return made[-1]
  yield make
  for fault in made:
    fault.remove()


def _train(run, capsys) -> tuple[int, list[str]]:
  """Runs `train` in this process: (exit status, the lines it printed on stderr)."""
  capsys.readouterr()
  status = main(["train", *SMOKE, "--model_dir", str(run)])
  return status, capsys.readouterr().err.splitlines()


def _complete_steps(run) -> dict[int, dict[str, bytes]]:
  """The checkpoints saved and verified (with their checksums): step -> {file: contents}."""
  directory = run / "checkpoints"
  steps = {}
  for step_dir in directory.iterdir() if directory.is_dir() else []:
    if step_dir.name.isdigit() and (step_dir / INTEGRITY_FILE).is_file():
      steps[int(step_dir.name)] = {str(p.relative_to(step_dir)): p.read_bytes()
                                   for p in sorted(step_dir.rglob("*")) if p.is_file()}
  return steps


def _after_checkpoint(run, step: int) -> Callable[[], bool]:
  return lambda: (run / "checkpoints" / str(step) / INTEGRITY_FILE).is_file()


def _assert_stopped_in_one_line(status, err, run, strerror: str, named: str) -> None:
  """Exit 2; no traceback; the last line, the only error line, names the file (a glob relative
  to the run) and what to do."""
  assert status == 2, err[-20:]
  assert not any("Traceback" in line for line in err), "\n".join(err)
  errors = [line for line in err if line.startswith("softprompt-jax train: error: ")]
  assert errors == [err[-1]], err[-20:]
  found = re.fullmatch(r"softprompt-jax train: error: cannot write (\S+): (.+); free space or "
                       r"make it writable .*then run the same command again \(train resumes "
                       r"from its last checkpoint\)", err[-1])
  assert found, err[-1]
  path, reason = found.groups()
  assert reason == strerror, err[-1]
  assert fnmatch.fnmatch(os.path.relpath(path, run), named), (path, named)


def _assert_checkpoints_kept(run, before: dict[int, dict[str, bytes]]) -> list[int]:
  """Every checkpoint verified before the fault is there as it was; nothing partial or
  temporary is left among them; each one listed verifies. Returns the steps listed."""
  directory = run / "checkpoints"
  entries = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
  assert all(name.isdigit() for name in entries), entries  # no *.orbax-checkpoint-tmp, damaged-
  after = _complete_steps(run)
  for step, files in before.items():
    assert after.get(step) == files, f"checkpoint {step} changed or went missing"
  if not entries:
    return []
  checkpoints = PromptCheckpoints(directory)
  try:
    steps = checkpoints.steps()
    assert steps == sorted(int(name) for name in entries)
    for step in steps:
      assert checkpoints.damage(step) is None, step
      assert not list((directory / str(step)).glob("*.tmp"))
  finally:
    checkpoints.close()
  return steps


def _assert_resumes_to_the_reference(run, reference, capsys, steps: list[int]) -> None:
  """The same command, once the disk has room: it resumes from the last checkpoint (or, when
  only the gin record was left to write, completes the record) and ends as the reference."""
  finished = (run / "summary.json").is_file() and (run / "operative_config.gin").is_file()
  status, err = _train(run, capsys)
  assert status == 0, err[-20:]
  assert not any("damaged" in line or "Traceback" in line for line in err), err
  resumed = [line for line in err if line.startswith("resumed from ")]
  if steps and not finished:
    assert resumed == [f"resumed from {run / 'checkpoints' / str(steps[-1])} at step "
                       f"{steps[-1]}"], err
  else:
    assert not resumed, resumed
  if finished:
    assert f"{run}: already complete at step 30; nothing to do" in err
  assert np.array_equal(np.load(run / "prompt.npy"), np.load(reference / "prompt.npy"))
  summary, expected = (json.loads((r / "summary.json").read_text()) for r in (run, reference))
  for key in ("steps", "best_step", "best_value", "final_eval", "final_loss"):
    assert summary[key] == expected[key], key
  assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  for name in ("config.gin", "operative_config.gin"):  # gin wraps long paths where they fall
    assert unwrapped_gin((run / name).read_text()) == \
        unwrapped_gin((reference / name).read_text().replace(str(reference), str(run))), name
  # The log reads as one run: what the stopped run logged past its checkpoint is superseded.
  logged = [[(r["split"], r["step"], r.get("loss"), r.get("accuracy")) for r in read_metrics(d)]
            for d in (run, reference)]
  assert logged[0] == logged[1]
  assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in reference.iterdir())


# (where the disk fills up: the first write to PATTERN once the checkpoint of step ARMED is
# complete; the file the one line names)
FULL_DISK = [
    # orbax's JSON item, written from one of its background threads
    pytest.param("checkpoints/20.orbax-checkpoint-tmp/meta.orbax-checkpoint-tmp/*", 10,
                 "checkpoints/20", id="checkpoint"),
    pytest.param("checkpoints/20.orbax-checkpoint-tmp/_CHECKPOINT_METADATA", 10,
                 "checkpoints/20", id="checkpoint-metadata"),
    pytest.param(f"checkpoints/20/.{INTEGRITY_FILE}.*", 10, f"checkpoints/20/{INTEGRITY_FILE}",
                 id="integrity-file"),
    pytest.param("metrics.jsonl", 10, "metrics.jsonl", id="metrics"),
    pytest.param("tensorboard/train/*", 10, "tensorboard/train/events.out.tfevents.*",
                 id="tensorboard-events"),
    pytest.param("tensorboard/validation/*", None, "tensorboard/validation/events.out.tfevents.*",
                 id="events-before-any-checkpoint"),
    pytest.param(".prompt.npy.*", 30, "prompt.npy", id="prompt"),
    pytest.param(".curves.png.*", 30, "curves.png", id="plots"),
    pytest.param(".summary.json.*", 30, "summary.json", id="summary"),
    pytest.param(".config.gin.*", None, "config.gin", id="config"),
    pytest.param(".operative_config.gin.*", 30, "operative_config.gin", id="operative-config"),
]


@pytest.mark.parametrize("pattern, armed_at, named", FULL_DISK)
def test_a_full_disk_stops_the_run_in_one_line_and_the_same_command_resumes_it_exactly(
    reference, faults, capsys, tmp_path, pattern, armed_at, named):
  run = tmp_path / "run"
  before = {}
  fault = faults(run, pattern, armed=_after_checkpoint(run, armed_at) if armed_at else
                 lambda: True, on_trigger=lambda: before.update(_complete_steps(run)))
  threads = set(threading.enumerate())
  status, err = _train(run, capsys)
  assert fault.triggered_by is not None, "the run never wrote where the fault was set"
  _assert_stopped_in_one_line(status, err, run, NO_SPACE, named)
  # No background write of a failed checkpoint goes on after the error is reported.
  assert set(threading.enumerate()) <= threads
  if armed_at:
    assert max(before) == armed_at  # the last good checkpoint (the fault came after it)...
  steps = _assert_checkpoints_kept(run, before)  # ... is kept, as is every earlier one
  if pattern == ".config.gin.*":  # stopped before anything: the directory is left as found
    assert not run.exists()
  fault.remove()
  _assert_resumes_to_the_reference(run, reference, capsys, steps)


def test_a_read_only_run_directory_stops_in_one_line_and_changes_nothing(reference, faults,
                                                                          capsys, tmp_path):
  run = tmp_path / "run"
  assert main(["train", *SMOKE, "--model_dir", str(run), "--gin.train.stop_after_steps=15"]) == 0
  files = {str(p.relative_to(run)): (p.read_bytes(), p.stat().st_mtime_ns)
           for p in sorted(run.rglob("*")) if p.is_file()}
  fault = faults(run, "*", code=errno.EROFS)
  status, err = _train(run, capsys)
  assert fault.triggered_by is not None
  _assert_stopped_in_one_line(status, err, run, READ_ONLY, ".lock")
  assert {str(p.relative_to(run)): (p.read_bytes(), p.stat().st_mtime_ns)
          for p in sorted(run.rglob("*")) if p.is_file()} == files
  fault.remove()
  _assert_resumes_to_the_reference(run, reference, capsys, [10])


def test_a_disk_turning_read_only_mid_run_keeps_the_last_checkpoint(reference, faults, capsys,
                                                                    tmp_path):
  """As a file system remounted read-only after an I/O error: the save of step 20 cannot even
  create its directory, nor can anything else be written or removed from then on."""
  run = tmp_path / "run"
  before = {}
  fault = faults(run, "checkpoints/20.orbax-checkpoint-tmp*", code=errno.EROFS,
                 on_trigger=lambda: before.update(_complete_steps(run)))
  status, err = _train(run, capsys)
  assert fault.triggered_by is not None
  _assert_stopped_in_one_line(status, err, run, READ_ONLY, "checkpoints/20.orbax-checkpoint-tmp")
  assert list(before) == [10]
  steps = _assert_checkpoints_kept(run, before)
  fault.remove()
  _assert_resumes_to_the_reference(run, reference, capsys, steps)


def test_a_run_log_closes_every_file_and_keeps_the_error_that_stopped_the_run(faults, tmp_path):
  full = []
  faults(tmp_path, "*", armed=lambda: bool(full))
  log = RunLog(tmp_path, 10, stream=io.StringIO())
  log.log_train(1, {"loss": 1.0}, 10)
  log.log_eval(1, {"accuracy": 0.5})
  log.log_train(2, {"loss": 0.7}, 10)  # buffered in the event file
  full.append(True)  # the disk is full from the next write on
  with pytest.raises(OSError, match=f"No space left on device: '{tmp_path}/metrics.jsonl'"):
    log.log_train(2, {"loss": 0.5}, 10)
  with pytest.raises(ValueError, match="what stopped the run"):
    try:
      raise ValueError("what stopped the run")
    finally:
      log.close()  # its own failures (the buffered scalars) do not replace that error
  assert all(writer._records._writer.closed for writer in log._writers.values())
  assert log._jsonl.closed


def test_tensorstores_report_of_a_full_disk_names_the_step_and_other_errors_pass(tmp_path,
                                                                                   monkeypatch):
  """Tensorstore (orbax's array writer) reports a full disk as a ValueError whose message ends
  in the errno (this one is from a real run); anything else a save raises is left as it is."""
  checkpoints = PromptCheckpoints(tmp_path / "checkpoints")
  partial = tmp_path / "checkpoints" / "20.orbax-checkpoint-tmp" / "state.orbax-checkpoint-tmp"
  raised = []

  def save(*args, **kwargs):
    raise raised[-1]
  monkeypatch.setattr(checkpoints._manager, "save", save)
  raised.append(ValueError(
      f'RESOURCE_EXHAUSTED: Error writing local file "{partial}/_sharding": Failed writing: '
      f'"{partial}/_sharding.__lock": Failed to write 1761 bytes to file 22: No space left on '
      "device [os_error_code='28']"))
  with pytest.raises(OSError) as full:
    checkpoints.save(20, {"x": np.zeros(2)}, {}, {})
  assert full.value.errno == errno.ENOSPC
  assert full.value.__cause__ is raised[-1]  # what tensorstore said, for --traceback
  assert one_line(full.value).startswith(
      f"cannot write {tmp_path / 'checkpoints' / '20'}: No space left on device; free space")
  raised.append(ValueError("a bug, not a disk"))
  with pytest.raises(ValueError, match="a bug, not a disk"):
    checkpoints.save(20, {"x": np.zeros(2)}, {}, {})
  checkpoints.close()


# --------------------------------------------------------------------------------------------
# A real full disk, tensorstore's writes included


@pytest.fixture
def small_disk(tmp_path):
  """A 16 MiB tmpfs: only where this process may mount one (root with CAP_SYS_ADMIN)."""
  mount = tmp_path / "disk"
  mount.mkdir()
  done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
                        capture_output=True, text=True)
  if done.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
  try:
    yield mount
  finally:
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: pathlib.Path, leave: int) -> pathlib.Path:
  """Writes a file until the disk is full, then frees `leave` bytes of it; removing the file
  gives the space back."""
  filler = disk / "filler"
  with open(filler, "wb", buffering=0) as f:
    with contextlib.suppress(OSError):
      while True:
        f.write(b"\0" * 4096)
  os.truncate(filler, filler.stat().st_size - leave)
  return filler


def test_a_really_full_disk_during_a_checkpoint_save(reference, small_disk, capsys, monkeypatch):
  """Nothing injected: the disk fills up just before step 20 is saved, all but 16 KiB, which
  orbax's small JSON files mostly get, so that its array writes (tensorstore: C++, background
  threads) mostly meet the kernel's ENOSPC themselves. Which write fails first varies."""
  run = small_disk / "run"
  save = PromptCheckpoints.save
  filled = []

  def save_on_a_full_disk(self, step, *args, **kwargs):
    if step == 20 and not filled:
      before.update(_complete_steps(run))
      filled.append(_fill(small_disk, leave=16 * 1024))
    return save(self, step, *args, **kwargs)
  monkeypatch.setattr(PromptCheckpoints, "save", save_on_a_full_disk)
  before = {}
  status, err = _train(run, capsys)
  assert filled, "the run never got to save step 20"
  _assert_stopped_in_one_line(status, err, run, NO_SPACE, "checkpoints/20*")
  assert list(before) == [10]
  steps = _assert_checkpoints_kept(run, before)
  monkeypatch.undo()
  filled[0].unlink()
  _assert_resumes_to_the_reference(run, reference, capsys, steps)
