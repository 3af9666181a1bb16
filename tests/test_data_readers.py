"""Readers on small files written here: JSONL, TSV, CSV, Parquet, Hugging Face save_to_disk
directories (built with pyarrow in the `datasets` layout), split specs; errors name file,
line and field."""

import json
import sys

import pytest

from softprompt_jax.data import readers
from softprompt_jax.data.readers import DataError, load_split, read_records


@pytest.fixture(scope="module")
def pa():
  """pyarrow (an optional extra): the Parquet and Arrow tests skip without it."""
  pyarrow = pytest.importorskip("pyarrow")
  pytest.importorskip("pyarrow.parquet")
  return pyarrow

ROWS = [{"premise": "A cat sat.", "hypothesis": "A cat is sitting.", "label": 0, "idx": 0},
        {"premise": "Ünïcode “quotes”", "hypothesis": "x", "label": 1, "idx": 1}]


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                  encoding="utf-8")
  return path


def test_jsonl(tmp_path):
  path = tmp_path / "train.jsonl"
  path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1], ensure_ascii=False) + "\n",
                  encoding="utf-8")
  assert list(readers.read_jsonl(path)) == ROWS  # the blank line is skipped


@pytest.mark.parametrize("content, message", [
    (b'{"a": 1}\n{"a": 2,,}\n', r":2: malformed JSON: Expecting property name"),
    (b'{"a": 1}\n{"a": 2}\n{"a": "\xff"}\n', r":3: invalid UTF-8"),
    (b'{"a": 1}\n[1, 2]\n', r":2: expected a JSON object per line; got list"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, content, message):
  path = tmp_path / "bad.jsonl"
  path.write_bytes(content)
  with pytest.raises(DataError, match=str(path).replace("\\", "\\\\") + message):
    list(readers.read_jsonl(path))


def test_tsv_glue_style(tmp_path):
  path = tmp_path / "dev.tsv"
  # GLUE's TSVs do not quote: quote characters are part of the text.
  path.write_text('sentence\tlabel\n"hide new secretions\t0\nit \'s a "charming" film\t1\n',
                  encoding="utf-8")
  assert list(readers.read_tsv(path)) == [
      {"sentence": '"hide new secretions', "label": "0"},
      {"sentence": 'it \'s a "charming" film', "label": "1"}]


def test_tsv_errors(tmp_path):
  path = tmp_path / "train.tsv"
  path.write_text("sentence\tlabel\na\t0\nb\t1\textra\n", encoding="utf-8")
  with pytest.raises(DataError, match=r"train.tsv:3: 3 tab-separated fields, but the header has "
                                      r"2 \(sentence, label\)"):
    list(readers.read_tsv(path))
  empty = tmp_path / "empty.tsv"
  empty.write_text("")
  with pytest.raises(DataError, match="empty file"):
    list(readers.read_tsv(empty))


def test_csv(tmp_path):
  path = tmp_path / "train.csv"
  path.write_text('sentence,label\n"a, quoted ""text""",1\nplain,0\n', encoding="utf-8")
  assert list(readers.read_csv(path)) == [{"sentence": 'a, quoted "text"', "label": "1"},
                                          {"sentence": "plain", "label": "0"}]
  bad = tmp_path / "bad.csv"
  bad.write_text("sentence,label\nx,1\ny\n", encoding="utf-8")
  with pytest.raises(DataError, match=r"bad.csv:3: 1 fields, but the header has 2"):
    list(readers.read_csv(bad))


def test_parquet(tmp_path, pa):
  path = tmp_path / "train.parquet"
  pa.parquet.write_table(pa.Table.from_pylist(ROWS), path)
  assert list(readers.read_parquet(path)) == ROWS
  bad = tmp_path / "bad.parquet"
  bad.write_bytes(b"not parquet")
  with pytest.raises(DataError, match="bad.parquet: not a readable Parquet file"):
    list(readers.read_parquet(bad))


def _save_to_disk(pa, directory, rows, split="train", num_files=1):
  """A `datasets.Dataset.save_to_disk` directory: Arrow *stream* files, state.json,
  dataset_info.json, as datasets 2.x / 3.x write them."""
  directory.mkdir(parents=True)
  table = pa.Table.from_pylist(rows)
  per_file = -(-len(rows) // num_files)
  names = []
  for i in range(num_files):
    name = f"data-{i:05d}-of-{num_files:05d}.arrow"
    with pa.ipc.new_stream(directory / name, table.schema) as writer:
      writer.write_table(table.slice(i * per_file, per_file), max_chunksize=1)
    names.append(name)
  (directory / "state.json").write_text(json.dumps({
      "_data_files": [{"filename": n} for n in names], "_fingerprint": "0123456789abcdef",
      "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
      "_output_all_columns": False, "_split": split}))
  (directory / "dataset_info.json").write_text(json.dumps({"citation": "", "features": {}}))


MULTIRC_FLAT = [
    {"paragraph": "P", "question": "Q", "answer": f"A{i}",
     "idx": {"paragraph": 0, "question": 1, "answer": i}, "label": i % 2} for i in range(5)]


def test_saved_dataset(tmp_path, pa):
  _save_to_disk(pa, tmp_path / "ds", MULTIRC_FLAT, num_files=2)
  # Nested struct columns come back as dicts; row order follows state.json's file list.
  assert list(readers.read_saved_dataset(tmp_path / "ds")) == MULTIRC_FLAT


def test_saved_dataset_dict(tmp_path, pa):
  root = tmp_path / "super_glue_multirc"
  root.mkdir()
  (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation"]}))
  _save_to_disk(pa, root / "train", MULTIRC_FLAT[:3])
  _save_to_disk(pa, root / "validation", MULTIRC_FLAT[3:], split="validation")
  assert list(read_records(root, "validation")) == MULTIRC_FLAT[3:]
  assert len(load_split(root, "train")) == 3
  with pytest.raises(DataError, match="no data for split 'test'"):
    load_split(root, "test")


def test_saved_dataset_missing_arrow_file(tmp_path, pa):
  _save_to_disk(pa, tmp_path / "ds", ROWS)
  (tmp_path / "ds" / "data-00000-of-00001.arrow").unlink()
  with pytest.raises(DataError, match="lists data-00000-of-00001.arrow, which is missing"):
    list(read_records(tmp_path / "ds"))


def test_directory_of_split_files_with_glue_and_superglue_names(tmp_path):
  _write_jsonl(tmp_path / "train.jsonl", ROWS)
  _write_jsonl(tmp_path / "val.jsonl", ROWS[:1])  # SuperGLUE calls validation "val"
  (tmp_path / "dev_matched.tsv").write_text("premise\thypothesis\tlabel\np\th\t0\n")  # MNLI
  assert load_split(tmp_path, "train").records == ROWS
  assert load_split(tmp_path, "validation").records == ROWS[:1]
  assert load_split(tmp_path, "validation_matched").records == [
      {"premise": "p", "hypothesis": "h", "label": "0"}]
  with pytest.raises(DataError, match="no data for split 'test'.*train.jsonl"):
    load_split(tmp_path, "test")


def test_split_specs(tmp_path):
  train = _write_jsonl(tmp_path / "a.jsonl", ROWS)
  spec = {"train": str(train), "validation": [{"x": 1}], "test": lambda split: [{"s": split}]}
  assert load_split(spec, "train").records == ROWS
  assert load_split(spec, "validation").records == [{"x": 1}]
  assert load_split(spec, "test").records == [{"s": "test"}]
  split = load_split(spec, "train")
  assert split.locations == [f"{train}:1", f"{train}:2"]
  with pytest.raises(DataError, match=r"no source for split 'dev'; the source has \['test', "
                                      r"'train', 'validation'\]"):
    load_split(spec, "dev")
  with pytest.raises(DataError, match="no such file or directory"):
    load_split(str(tmp_path / "missing.jsonl"), "train")
  (tmp_path / "data.txt").write_text("x")
  with pytest.raises(DataError, match=r"unsupported file type '.txt'"):
    load_split(tmp_path / "data.txt", "train")


def test_missing_pyarrow_is_a_clear_import_error(tmp_path, monkeypatch, pa):
  path = tmp_path / "train.parquet"
  pa.parquet.write_table(pa.Table.from_pylist(ROWS), path)
  monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` now fails
  with pytest.raises(ImportError, match="pip install pyarrow"):
    list(readers.read_parquet(path))
