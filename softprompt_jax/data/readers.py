"""Local data files -> records (dicts). Nothing here reads the network.

Formats: JSON Lines, TSV (GLUE style: a header row, tab-separated, no quoting), CSV (a header
row), Parquet, and the directories Hugging Face `datasets` writes with `save_to_disk` (Arrow
stream files, read with pyarrow; `datasets` itself is not needed). Parquet and Arrow need the
optional `pyarrow`. Every error names the file, and the line where the format has lines.

A *source* for one split is a file, a directory, a list of records or a callable(split); a
dict maps split names to sources. A directory holds `<split>.<ext>` files (validation may be
named val or dev, as SuperGLUE and GLUE name it) or a `save_to_disk` dataset (dict).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Iterator, Sequence

# A record with where it came from: "file:line" or "file row N".
Located = tuple[str, dict]
Source = Any  # str | os.PathLike | Sequence[dict] | Callable[[str], Iterable[dict]] | dict


class DataError(ValueError):
  """A data file that cannot be read as records; the message names the file (and line)."""


def _import_pyarrow():
  try:
    import pyarrow
    import pyarrow.ipc  # noqa: F401
    import pyarrow.parquet  # noqa: F401
  except ImportError:
    raise ImportError("reading Parquet files and Hugging Face datasets directories needs "
                      "pyarrow: pip install pyarrow") from None
  return pyarrow


def _lines(path: pathlib.Path) -> Iterator[tuple[int, str]]:
  """(1-based line number, text without the newline), with errors naming file and line."""
  with open(path, "rb") as f:
    for number, raw in enumerate(f, start=1):
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise DataError(f"{path}:{number}: invalid UTF-8 (byte {e.start} of the line)") from None
      if number == 1:
        text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
      yield number, text.rstrip("\r\n")


def _located_jsonl(path: pathlib.Path) -> Iterator[Located]:
  for number, line in _lines(path):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{number}: malformed JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(record, dict):
      raise DataError(f"{path}:{number}: expected a JSON object per line; got "
                      f"{type(record).__name__}")
    yield f"{path}:{number}", record


def _located_tsv(path: pathlib.Path) -> Iterator[Located]:
  # GLUE's TSVs quote nothing: a quote character is text (as TFDS reads them, QUOTE_NONE).
  header = None
  for number, line in _lines(path):
    if not line.strip():
      continue
    cells = line.split("\t")
    if header is None:
      header = cells
      continue
    if len(cells) != len(header):
      raise DataError(f"{path}:{number}: {len(cells)} tab-separated fields, but the header has "
                      f"{len(header)} ({', '.join(header)})")
    yield f"{path}:{number}", dict(zip(header, cells))
  if header is None:
    raise DataError(f"{path}: empty file; a TSV file needs a header row")


def _located_csv(path: pathlib.Path) -> Iterator[Located]:
  import csv
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.reader(f)
    try:
      header = None
      for cells in reader:
        if not cells:
          continue
        if header is None:
          header = cells
          continue
        if len(cells) != len(header):
          raise DataError(f"{path}:{reader.line_num}: {len(cells)} fields, but the header has "
                          f"{len(header)} ({', '.join(header)})")
        yield f"{path}:{reader.line_num}", dict(zip(header, cells))
    except UnicodeDecodeError as e:
      raise DataError(f"{path}:{reader.line_num + 1}: invalid UTF-8 ({e.reason})") from None
    except csv.Error as e:
      raise DataError(f"{path}:{reader.line_num}: malformed CSV: {e}") from None
  if header is None:
    raise DataError(f"{path}: empty file; a CSV file needs a header row")


def _located_table_batches(path: pathlib.Path, batches) -> Iterator[Located]:
  row = 0
  for batch in batches:
    for record in batch.to_pylist():
      yield f"{path} row {row}", record
      row += 1


def _located_parquet(path: pathlib.Path) -> Iterator[Located]:
  pa = _import_pyarrow()
  try:
    batches = pa.parquet.ParquetFile(path).iter_batches()
  except (pa.ArrowException, OSError) as e:
    raise DataError(f"{path}: not a readable Parquet file: {e}") from None
  yield from _located_table_batches(path, batches)


def _located_arrow(path: pathlib.Path) -> Iterator[Located]:
  """One Arrow IPC file: the stream format `datasets` writes, or the random-access format."""
  pa = _import_pyarrow()
  try:
    reader = pa.ipc.open_stream(path)
  except pa.ArrowInvalid:
    try:
      reader = pa.ipc.open_file(path)
      reader = (reader.get_batch(i) for i in range(reader.num_record_batches))
    except pa.ArrowInvalid as e:
      raise DataError(f"{path}: not an Arrow IPC file: {e}") from None
  yield from _located_table_batches(path, reader)


def _saved_dataset_files(directory: pathlib.Path) -> list[pathlib.Path]:
  """The Arrow files of one `save_to_disk` Dataset, in order (state.json lists them)."""
  state_file = directory / "state.json"
  try:
    state = json.loads(state_file.read_text(encoding="utf-8"))
    names = [entry["filename"] for entry in state["_data_files"]]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DataError(f"{state_file}: not a datasets state.json with '_data_files' ({e})") from None
  files = [directory / name for name in names]
  for file in files:
    if not file.is_file():
      raise DataError(f"{state_file} lists {file.name}, which is missing")
  return files


_SPLIT_ALIASES = {"validation": ("val", "dev"), "test": ("test",), "train": ("train",)}
_EXTENSIONS = (".jsonl", ".tsv", ".csv", ".parquet", ".arrow")


def _split_names(split: str) -> list[str]:
  """`split` and what GLUE/SuperGLUE files call it: validation_matched -> dev_matched."""
  names = [split]
  for canonical, aliases in _SPLIT_ALIASES.items():
    if split.startswith(canonical):
      names += [alias + split[len(canonical):] for alias in aliases]
  return list(dict.fromkeys(names))


def _located_directory(directory: pathlib.Path, split: str | None) -> Iterator[Located]:
  if (directory / "state.json").is_file():  # one saved Dataset
    for file in _saved_dataset_files(directory):
      yield from _located_arrow(file)
    return
  if split is None:
    raise DataError(f"{directory} is a directory of splits; name the split to read")
  if (directory / "dataset_dict.json").is_file():  # a saved DatasetDict: one folder per split
    candidates = [directory / name for name in _split_names(split)]
  else:
    candidates = [directory / f"{name}{ext}" for name in _split_names(split)
                  for ext in _EXTENSIONS]
    candidates += [directory / name for name in _split_names(split)]
  for candidate in candidates:
    if candidate.is_file() or (candidate / "state.json").is_file():
      yield from located_records(candidate, split)
      return
  present = sorted(p.name for p in directory.iterdir())[:20]
  raise DataError(f"{directory}: no data for split {split!r} (looked for "
                  f"{', '.join(c.name for c in candidates[:6])}, ...; found {present})")


def located_records(path: str | os.PathLike, split: str | None = None) -> Iterator[Located]:
  """(where, record) for each record of a file or directory, by its file type."""
  path = pathlib.Path(path)
  if path.is_dir():
    yield from _located_directory(path, split)
    return
  if not path.is_file():
    raise DataError(f"{path}: no such file or directory")
  readers = {".jsonl": _located_jsonl, ".tsv": _located_tsv, ".csv": _located_csv,
             ".parquet": _located_parquet, ".arrow": _located_arrow}
  if path.suffix.lower() not in readers:
    raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of "
                    f"{', '.join(readers)} or a Hugging Face save_to_disk directory")
  yield from readers[path.suffix.lower()](path)


def _records(located: Iterator[Located]) -> Iterator[dict]:
  return (record for _, record in located)


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
  return _records(_located_jsonl(pathlib.Path(path)))


def read_tsv(path: str | os.PathLike) -> Iterator[dict]:
  return _records(_located_tsv(pathlib.Path(path)))


def read_csv(path: str | os.PathLike) -> Iterator[dict]:
  return _records(_located_csv(pathlib.Path(path)))


def read_parquet(path: str | os.PathLike) -> Iterator[dict]:
  return _records(_located_parquet(pathlib.Path(path)))


def read_saved_dataset(path: str | os.PathLike, split: str | None = None) -> Iterator[dict]:
  """Records of a `datasets` save_to_disk directory (a Dataset, or a DatasetDict's split)."""
  return _records(_located_directory(pathlib.Path(path), split))


def read_records(path: str | os.PathLike, split: str | None = None) -> Iterator[dict]:
  """Records of any supported file, or of `split` in a directory."""
  return _records(located_records(path, split))


@dataclasses.dataclass
class Split:
  """The records of one split, each with where it came from (for error messages)."""

  records: list[dict]
  locations: list[str]

  def __len__(self) -> int:
    return len(self.records)


def load_split(source: Source, split: str) -> Split:
  """All records of `split` from `source` (see the module docstring for what a source is)."""
  if isinstance(source, dict):
    if split not in source:
      raise DataError(f"no source for split {split!r}; the source has {sorted(source)}")
    return load_split(source[split], split)
  if isinstance(source, (str, os.PathLike)):
    located = list(located_records(source, split))
  elif callable(source):
    name = getattr(source, "__name__", "source")
    located = [(f"{name}({split!r}) record {i}", r) for i, r in enumerate(source(split))]
  elif isinstance(source, Sequence):
    located = [(f"record {i}", r) for i, r in enumerate(source)]
  else:
    raise TypeError(f"a data source is a path, a list of records, a callable(split) or a dict "
                    f"of those by split; got {type(source).__name__}")
  for where, record in located:
    if not isinstance(record, dict):
      raise DataError(f"{where}: a record must be a dict; got {type(record).__name__}")
  return Split(records=[r for _, r in located], locations=[w for w, _ in located])
