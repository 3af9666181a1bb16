"""`integrity.fingerprint`: a frozen checkpoint known by its files' names, sizes and modification
times and its small metadata, so that `train` starts in milliseconds on a 40 GB checkpoint; runs
that recorded the older content-hash fingerprint still resume."""

import builtins
import io
import os
import shutil

import pytest

from softprompt_jax.checkpoints import integrity
from softprompt_jax.checkpoints.integrity import FINGERPRINT_PREFIX, fingerprint, same_model
from softprompt_jax.errors import ConfigError
from softprompt_jax.run_setup import check_same_run

BIG = 3 * 2 ** 30  # sparse: costs no disk, but reading it would take seconds


@pytest.fixture
def checkpoint(tmp_path):
  """A Hugging Face-like directory: config.json, one big (sparse) weight file, one small."""
  directory = tmp_path / "ckpt"
  (directory / "sub").mkdir(parents=True)
  (directory / "config.json").write_text('{"d_model": 4}')
  with open(directory / "model.safetensors", "wb") as f:
    f.truncate(BIG)
  (directory / "sub" / "small.bin").write_bytes(b"\1" * 100)
  return directory


def _set_mtime(path, ns):
  os.utime(path, ns=(ns, ns))


def test_same_files_same_fingerprint_and_a_time_keeping_copy_keeps_it(checkpoint, tmp_path):
  first = fingerprint(checkpoint)
  assert first.startswith(FINGERPRINT_PREFIX) and first == fingerprint(checkpoint)
  copy = shutil.copytree(checkpoint, tmp_path / "copy", copy_function=_copy2_keeping_holes)
  assert fingerprint(copy) == first


def _copy2_keeping_holes(src, dst):
  """shutil.copy2 (contents, modification times), except that a file of holes alone (the
  sparse weights) is copied as `cp --sparse=always` would: the same bytes, none of them
  written (copy2 would write 3 GiB of zeros: seconds)."""
  if os.stat(src).st_blocks:
    return shutil.copy2(src, dst)
  with open(dst, "wb") as f:
    f.truncate(os.path.getsize(src))
  shutil.copystat(src, dst)
  return dst


@pytest.mark.parametrize("change", ["touch", "rewrite_same_size", "grow", "rename", "add",
                                    "remove", "metadata_same_size_and_time"])
def test_a_changed_checkpoint_changes_it(checkpoint, change):
  before = fingerprint(checkpoint)
  weights, small, config = (checkpoint / "model.safetensors", checkpoint / "sub" / "small.bin",
                            checkpoint / "config.json")
  if change == "touch":
    _set_mtime(weights, weights.stat().st_mtime_ns + 1000)
  elif change == "rewrite_same_size":
    stat = small.stat()
    small.write_bytes(b"\2" * 100)
    _set_mtime(small, stat.st_mtime_ns + 1)
  elif change == "grow":
    with open(weights, "r+b") as f:
      f.truncate(BIG + 1)
  elif change == "rename":
    small.rename(small.with_name("other.bin"))
  elif change == "add":
    (checkpoint / "extra.json").write_text("{}")
  elif change == "remove":
    small.unlink()
  else:  # metadata is hashed: an edit that keeps size and time still shows
    stat = config.stat()
    config.write_text('{"d_model": 8}')
    _set_mtime(config, stat.st_mtime_ns)
  assert fingerprint(checkpoint) != before


def test_it_reads_no_weights(checkpoint, monkeypatch):
  opened, hashed = [], []
  real_open, real_sha256 = io.open, integrity.hashlib.sha256

  def recording_open(file, *args, **kwargs):
    opened.append(os.fspath(file))
    return real_open(file, *args, **kwargs)

  class CountingSha256:
    def __init__(self):
      self._digest = real_sha256()

    def update(self, data):
      hashed.append(len(data))
      self._digest.update(data)

    def hexdigest(self):
      return self._digest.hexdigest()

  monkeypatch.setattr(builtins, "open", recording_open)
  monkeypatch.setattr(io, "open", recording_open)  # pathlib opens through io.open
  monkeypatch.setattr(integrity.hashlib, "sha256", CountingSha256)
  fingerprint(checkpoint)
  assert not any(name.endswith(("model.safetensors", "small.bin")) for name in opened), opened
  assert 0 < sum(hashed) < 1000, hashed


def test_one_file_checkpoint_and_home(checkpoint, monkeypatch):
  monkeypatch.setenv("HOME", str(checkpoint.parent))
  assert fingerprint("~/ckpt") == fingerprint(checkpoint)
  weights = checkpoint / "model.safetensors"
  assert fingerprint(weights) == fingerprint("~/ckpt/model.safetensors") != fingerprint(checkpoint)


def test_resume_accepts_the_older_content_hash_and_compares_the_new_kind(checkpoint):
  legacy = "0f" * 32  # what runs saved before: a bare sha256 of the contents
  new = fingerprint(checkpoint)
  assert same_model(legacy, new) and same_model(new, new) and same_model(None, None)
  assert not same_model(new, FINGERPRINT_PREFIX + "0" * 64)
  assert not same_model(legacy, None) and not same_model(None, new)
  saved = {"task": "t", "prompt_length": 4, "trainable": [".*prompt.*"]}
  check_same_run({**saved, "model_fingerprint": legacy}, {**saved, "model_fingerprint": new},
                 "run")
  (checkpoint / "config.json").write_text('{"d_model": 8}')
  with pytest.raises(ConfigError, match="run: this run directory was trained with another "
                     "frozen model .*modification times"):
    check_same_run({**saved, "model_fingerprint": new},
                   {**saved, "model_fingerprint": fingerprint(checkpoint)}, "run")
