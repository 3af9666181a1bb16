"""Paths as users write them: relative with '..', '~', spaces and non-ASCII names work wherever a
path is given (frozen checkpoint, vocabulary, data, run directory); URLs are refused in one line
naming the parameter, and never become a local folder ('gs://bucket/run' -> 'gs:/bucket/run')."""

import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softprompt_jax import paths
from softprompt_jax.checkpoints.checkpoint_reader import CheckpointError
from softprompt_jax.checkpoints.integrity import fingerprint
from softprompt_jax.checkpoints.loading import load_t5
from softprompt_jax.cli import main
from softprompt_jax.data import cache
from softprompt_jax.data.readers import DataError, read_records
from softprompt_jax.model_spec import frozen_model, load_frozen
from softprompt_jax.tokenizers import get_vocabulary

ODD = pathlib.Path("dir with spaces", "ünïcødé")  # where the copies go, below a tmp dir
SMOKE = ["--gin_file", "runs/smoke.gin"]


@pytest.fixture
def odd_tree(tmp_path, testdata, monkeypatch):
  """tmp/odd/<ODD>/ holding the real t5x checkpoint, T5's vocabulary and a data file; the
  working directory a sibling folder (tmp/work) and HOME tmp/odd."""
  home = tmp_path / "odd"
  where = home / ODD
  shutil.copytree(testdata / "t5x_t5_1_1_tiny" / "checkpoint_3", where / "checkpoint_3")
  shutil.copy(testdata / "t5_vocab" / "sentencepiece.model", where / "spm.model")
  (where / "train.jsonl").write_text(json.dumps({"text": "grüße aus köln", "label": 1}) + "\n")
  (tmp_path / "work").mkdir()
  monkeypatch.chdir(tmp_path / "work")
  monkeypatch.setenv("HOME", str(home))
  return where


def _ways(where: pathlib.Path) -> dict:
  """The same place written absolute, relative with '..' (from tmp/work) and with '~'."""
  ways = {"absolute": str(where), "dotdot": os.path.relpath(where),
          "home": str(pathlib.Path("~", where.relative_to(pathlib.Path.home())))}
  assert ways["dotdot"].startswith("../")
  return ways


def _nothing_local_named_like_a_url(root: pathlib.Path) -> None:
  made = [p for p in root.rglob("*") if p.name.endswith(":") or p.name == "~"]
  assert not made, made


def test_local_path_expands_home_keeps_relative_and_refuses_urls(monkeypatch, tmp_path):
  monkeypatch.setenv("HOME", str(tmp_path))
  assert paths.local_path("~/a b/ü", "x") == tmp_path / "a b" / "ü"
  assert paths.local_path("../a", "x") == pathlib.Path("../a")  # the OS resolves '..'
  for url in ["gs://bucket/run", "s3://b/k", "https://host/f.model", "hf://org/model",
              pathlib.Path("gs://bucket/run")]:  # pathlib already folded it to 'gs:/bucket/run'
    with pytest.raises(paths.PathError, match=r"^--model_dir '.*' is a URL; only local paths"):
      paths.local_path(url, "--model_dir")
  with pytest.raises(CheckpointError):
    paths.local_path("gs://b/c", "checkpoint", error=CheckpointError)
  assert not paths.is_url("C:/Users/me") and not paths.is_url("run:1/x")
  assert paths.absolute("~/x/../y") == tmp_path / "y"


@pytest.mark.parametrize("way", ["absolute", "dotdot", "home"])
def test_real_t5x_checkpoint_loads_from_every_spelling(odd_tree, testdata, way):
  # tensorstore's file driver refused '../...' ("Invalid file path") before paths.absolute.
  gold = np.load(testdata / "t5x_t5_1_1_tiny" / "token_embedder_embedding.npy")
  path = _ways(odd_tree / "checkpoint_3")[way]
  _, params = load_t5(path)
  np.testing.assert_array_equal(np.asarray(params["token_embedder"]["embedding"]), gold)
  spec = frozen_model(checkpoint=path)  # what a gin run builds
  assert pathlib.Path(spec.checkpoint).resolve() == odd_tree / "checkpoint_3"
  _, frozen = load_frozen(spec)
  np.testing.assert_array_equal(np.asarray(frozen["token_embedder"]["embedding"]), gold)
  assert fingerprint(path) == fingerprint(odd_tree / "checkpoint_3")


def test_orbax_checkpoint_loads_from_a_relative_path(odd_tree):
  import orbax.checkpoint as ocp
  _, params = load_t5(odd_tree / "checkpoint_3")
  manager = ocp.CheckpointManager(
      odd_tree / "orbax", item_handlers={"state": ocp.PyTreeCheckpointHandler(use_ocdbt=True)},
      options=ocp.CheckpointManagerOptions(step_prefix="checkpoint", create=True))
  manager.save(3, args=ocp.args.Composite(state=ocp.args.PyTreeSave({"target": params})))
  manager.wait_until_finished()
  manager.close()
  _, again = load_t5(_ways(odd_tree / "orbax")["dotdot"])
  same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params, again)
  assert all(jax.tree.leaves(same))


@pytest.mark.parametrize("way", ["dotdot", "home"])
def test_vocabulary_and_data_from_every_spelling(odd_tree, way):
  vocabulary = get_vocabulary(_ways(odd_tree / "spm.model")[way])
  assert vocabulary.vocab_size == 32100 and vocabulary.encode("Hello") == [8774]
  records = list(read_records(_ways(odd_tree / "train.jsonl")[way]))
  assert records == [{"text": "grüße aus köln", "label": 1}]
  directory = list(read_records(_ways(odd_tree)[way], "train"))  # a directory of splits
  assert directory == records
  # The formatted-examples cache knows the same files by every spelling.
  key = cache.files_key(_ways(odd_tree / "train.jsonl")[way], "train")
  assert key is not None and key == cache.files_key(odd_tree / "train.jsonl", "train")


def test_urls_are_refused_where_each_path_is_given(odd_tree):
  with pytest.raises(CheckpointError, match="checkpoint 'gs://b/ckpt' is a URL"):
    load_t5("gs://b/ckpt")
  with pytest.raises(paths.PathError, match="frozen_model.checkpoint 's3://b/ckpt' is a URL"):
    frozen_model(checkpoint="s3://b/ckpt")
  with pytest.raises(ValueError, match="vocabulary 'https://h/spm.model' is a URL"):
    get_vocabulary("https://h/spm.model")
  with pytest.raises(DataError, match="data source 'gs://b/data' is a URL"):
    list(read_records("gs://b/data", "train"))
  _nothing_local_named_like_a_url(pathlib.Path.cwd())


def test_train_with_a_run_directory_spelled_with_home_dotdot_spaces_and_unicode(odd_tree):
  run = "~/../odd/runs/rün dir"
  assert main(["train", *SMOKE, "--model_dir", run, "--gin.train.num_steps=10"]) == 0
  where = odd_tree.parent.parent / "runs" / "rün dir"
  assert json.loads((where / "summary.json").read_text())["steps"] == 10
  assert (where / "config.gin").is_file() and (where / "prompt.npy").is_file()
  # A rerun finds the finished run in the same place (nothing is trained again).
  assert main(["train", *SMOKE, "--model_dir", run, "--gin.train.num_steps=10"]) == 0
  _nothing_local_named_like_a_url(pathlib.Path.cwd())
  assert os.listdir(".") == []


@pytest.mark.parametrize("args, named", [
    (["--model_dir", "gs://bucket/run"], "--model_dir 'gs://bucket/run'"),
    (["--gin.train.model_dir='s3://bucket/run'"], "train.model_dir 's3://bucket/run'"),
    (["--model_dir", "run", "--gin.frozen_model.checkpoint='gs://b/checkpoint_3'"],
     "frozen_model.checkpoint 'gs://b/checkpoint_3'"),
    (["--model_dir", "run", "--gin.VOCABULARY='https://h/spm.model'"],
     "vocabulary 'https://h/spm.model'"),
])
def test_a_url_stops_train_with_exit_2_and_one_line(odd_tree, capsys, no_expensive_work, args,
                                                     named):
  assert main(["train", *SMOKE, *args]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("softprompt-jax train: error: ") and "\n" not in err, err
  assert named in err and "only local paths are supported" in err, err
  _nothing_local_named_like_a_url(pathlib.Path.cwd())
  assert os.listdir(".") == []  # not even the run directory: nothing was trained
