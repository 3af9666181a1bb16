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
import io
import json
import os
import pathlib
import re
from typing import Any, Callable, Iterator, Sequence

from softprompt_jax.errors import UserError
from softprompt_jax.paths import local_path

# A record with where it came from: "file:line" or "file row N".
Located = tuple[str, dict]
Source = Any  # str | os.PathLike | Sequence[dict] | Callable[[str], Iterable[dict]] | dict


class DataError(UserError, ValueError):
  """A data file that cannot be read as records; the message names the file (and line).

  `reason` is a short category ("malformed_json", "invalid_utf8", ...) by which skipped
  records are counted; file-level errors (a missing file, no header) have reason "file".
  """

  def __init__(self, message: str, reason: str = "file"):
    super().__init__(message)
    self.reason = reason


# Called with each bad record's error when bad records are skipped (see SkipLog); None: raise.
OnBadRecord = Callable[[ValueError], None] | None


def _bad_record(error: DataError, on_bad: OnBadRecord) -> None:
  """One record that cannot be read: raised, or handed to `on_bad` to count and go on."""
  if on_bad is None:
    raise error
  on_bad(error)


@dataclasses.dataclass
class SkipLog:
  """Bad records skipped instead of raised: counts by reason and the first few messages."""

  num_skipped: int = 0
  by_reason: dict[str, int] = dataclasses.field(default_factory=dict)
  first: list[str] = dataclasses.field(default_factory=list)
  max_first: int = 10

  def __call__(self, error: ValueError) -> None:
    reason = getattr(error, "reason", "invalid_record")
    self.num_skipped += 1
    self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
    if len(self.first) < self.max_first:
      self.first.append(str(error))


def _import_pyarrow():
  try:
    import pyarrow
    import pyarrow.ipc  # noqa: F401
    import pyarrow.parquet  # noqa: F401
  except ImportError:
    raise ImportError("reading Parquet files and Hugging Face datasets directories needs "
                      "pyarrow: pip install pyarrow") from None
  return pyarrow


def _lines(path: pathlib.Path) -> Iterator[tuple[int, str | None, str | None]]:
  """(1-based line number, text without the newline, None), or (number, None, why) for a line
  that is not UTF-8, so that a caller skipping bad lines can go on after it."""
  with open(path, "rb") as f:
    for number, raw in enumerate(f, start=1):
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        yield number, None, f"invalid UTF-8 (byte {e.start} of the line)"
        continue
      if number == 1:
        text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
      yield number, text.rstrip("\r\n"), None


# A JSON escape of a UTF-16 surrogate: pairs are joined into one character, lone ones are not
# text (no tokenizer can encode them), so lines holding any are checked.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _lone_surrogate(value) -> str | None:
  """A lone surrogate character in any string (or key) of a parsed JSON value, else None."""
  if isinstance(value, str):
    found = re.search("[\ud800-\udfff]", value)
    return found.group() if found else None
  if isinstance(value, dict):
    return next((c for item in value.items() for c in map(_lone_surrogate, item) if c), None)
  if isinstance(value, list):
    return next((c for c in map(_lone_surrogate, value) if c), None)
  return None


class DuplicateKey(ValueError):
  """A JSON object that gives one key twice (`key`)."""

  def __init__(self, key: str):
    super().__init__(key)
    self.key = key


def _object_once_per_key(pairs: list[tuple[str, Any]]) -> dict:
  """A JSON object as a dict; a key given twice raises (json.loads would keep the last value
  without a word, so a record would silently lose data)."""
  record = dict(pairs)
  if len(record) != len(pairs):
    seen = set()
    for key, _ in pairs:
      if key in seen:
        raise DuplicateKey(key)
      seen.add(key)
  return record


# One decoder for every line: json.loads with a hook would build a new one per call.
_JSON_DECODER = json.JSONDecoder(object_pairs_hook=_object_once_per_key)


def decode_json(text: str) -> Any:
  """`text` as JSON, where an object that gives a key twice raises DuplicateKey (json.loads
  would keep the last value without a word)."""
  return _JSON_DECODER.decode(text)


def _located_jsonl(path: pathlib.Path, on_bad: OnBadRecord = None) -> Iterator[Located]:
  for number, line, invalid in _lines(path):
    where = f"{path}:{number}"
    if invalid:
      _bad_record(DataError(f"{where}: {invalid}", "invalid_utf8"), on_bad)
      continue
    if not line.strip():
      continue
    try:
      record = decode_json(line)
    except DuplicateKey as e:
      _bad_record(DataError(f"{where}: the key {e.key!r} appears twice in one JSON object; "
                            "keep one (a reader would silently use only the last)",
                            "duplicate_key"), on_bad)
      continue
    except json.JSONDecodeError as e:
      _bad_record(DataError(f"{where}: malformed JSON: {e.msg} (column {e.colno})",
                            "malformed_json"), on_bad)
      continue
    except RecursionError:
      _bad_record(DataError(f"{where}: malformed JSON: nested too deeply to read",
                            "malformed_json"), on_bad)
      continue
    if not isinstance(record, dict):
      _bad_record(DataError(f"{where}: expected a JSON object per line; got "
                            f"{type(record).__name__}", "not_an_object"), on_bad)
      continue
    if _SURROGATE_ESCAPE.search(line) and (char := _lone_surrogate(record)):
      _bad_record(DataError(f"{where}: the JSON escape {ascii(char)} is half of a UTF-16 "
                            "surrogate pair, not text; write the character itself",
                            "invalid_utf8"), on_bad)
      continue
    yield where, record


def _checked_header(names: list[str], where: str, part: str = "header") -> list[str]:
  """The column names of a header row (or schema); a name given twice is an error about the
  whole file, never skipped: every row would keep only the last of the two cells."""
  seen = set()
  for name in names:
    if name in seen and name.strip():  # unnamed columns (trailing tabs) are read by no task
      raise DataError(f"{where}: the column {name!r} appears twice in the {part}; rename one "
                      "(each row would keep only the last of the two)")
    seen.add(name)
  return names


def _located_tsv(path: pathlib.Path, on_bad: OnBadRecord = None) -> Iterator[Located]:
  # GLUE's TSVs quote nothing: a quote character is text (as TFDS reads them, QUOTE_NONE).
  header = None
  for number, line, invalid in _lines(path):
    where = f"{path}:{number}"
    if invalid:
      if header is None:  # without its header no row can be read: never skipped
        raise DataError(f"{where}: {invalid} in the header row")
      _bad_record(DataError(f"{where}: {invalid}", "invalid_utf8"), on_bad)
      continue
    if not line.strip():
      continue
    cells = line.split("\t")
    if header is None:
      header = _checked_header(cells, where)
      continue
    if len(cells) != len(header):
      _bad_record(DataError(f"{where}: {len(cells)} tab-separated fields, but the header has "
                            f"{len(header)} ({', '.join(header)})", "field_count"), on_bad)
      continue
    yield where, dict(zip(header, cells))
  if header is None:
    raise DataError(f"{path}: empty file; a TSV file needs a header row")


def _located_csv(path: pathlib.Path, on_bad: OnBadRecord = None) -> Iterator[Located]:
  import csv
  # Bytes that are not UTF-8 become lone surrogates (surrogateescape), so that the row holding
  # them is found and named by its line; valid UTF-8 never decodes to a surrogate.
  text = path.read_bytes().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
  reader = csv.reader(io.StringIO(text, newline=""))
  header = None
  while True:
    first_line = reader.line_num + 1  # a quoted cell may span lines: name the row's first
    try:
      cells = next(reader)
    except StopIteration:
      break
    except csv.Error as e:  # the parse cannot resume reliably (an open quote): never skipped
      raise DataError(f"{path}:{first_line}: malformed CSV: {e}") from None
    if not cells:
      continue
    where = f"{path}:{first_line}"
    bad_cell = next((i for i, cell in enumerate(cells) if _NOT_UTF8.search(cell)), None)
    if bad_cell is not None:
      if header is None:
        raise DataError(f"{where}: invalid UTF-8 in the header row")
      column = header[bad_cell] if bad_cell < len(header) else f"#{bad_cell + 1}"
      _bad_record(DataError(f"{where}: invalid UTF-8 in field {column!r}", "invalid_utf8"),
                  on_bad)
      continue
    if header is None:
      header = _checked_header(cells, where)
      continue
    if len(cells) != len(header):
      _bad_record(DataError(f"{where}: {len(cells)} fields, but the header has "
                            f"{len(header)} ({', '.join(header)})", "field_count"), on_bad)
      continue
    yield where, dict(zip(header, cells))
  if header is None:
    raise DataError(f"{path}: empty file; a CSV file needs a header row")


_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of a non-UTF-8 byte


def _located_table_batches(path: pathlib.Path, batches) -> Iterator[Located]:
  row = 0
  for batch in batches:
    if row == 0:
      _checked_header(batch.schema.names, str(path), "schema")
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


def _located_directory(directory: pathlib.Path, split: str | None,
                       on_bad: OnBadRecord = None) -> Iterator[Located]:
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
      yield from located_records(candidate, split, on_bad)
      return
  present = sorted(p.name for p in directory.iterdir())[:20]
  raise DataError(f"{directory}: no data for split {split!r} (looked for "
                  f"{', '.join(c.name for c in candidates[:6])}, ...; found {present})")


def located_records(path: str | os.PathLike, split: str | None = None,
                    on_bad: OnBadRecord = None) -> Iterator[Located]:
  """(where, record) for each record of a file or directory, by its file type.

  A bad line (malformed JSON, invalid UTF-8, a wrong number of fields) raises a DataError
  naming file and line, or, with `on_bad` (e.g. a SkipLog), is handed to it and skipped.
  """
  path = _local(path)
  if path.is_dir():
    yield from _located_directory(path, split, on_bad)
    return
  if not path.is_file():
    raise DataError(f"{path}: no such file or directory")
  readers = {".jsonl": _located_jsonl, ".tsv": _located_tsv, ".csv": _located_csv,
             ".parquet": _located_parquet, ".arrow": _located_arrow}
  if path.suffix.lower() not in readers:
    raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of "
                    f"{', '.join(readers)} or a Hugging Face save_to_disk directory")
  if path.suffix.lower() in (".jsonl", ".tsv", ".csv"):  # the formats with bad lines
    yield from readers[path.suffix.lower()](path, on_bad)
  else:
    yield from readers[path.suffix.lower()](path)


def _local(path: str | os.PathLike) -> pathlib.Path:
  """A data path with `~` expanded; a URL is refused (never read as a local 'gs:/...')."""
  return local_path(path, "data source", error=DataError,
                    advice="copy the data to a local file or directory first")


def _records(located: Iterator[Located]) -> Iterator[dict]:
  return (record for _, record in located)


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
  return _records(_located_jsonl(_local(path)))


def read_tsv(path: str | os.PathLike) -> Iterator[dict]:
  return _records(_located_tsv(_local(path)))


def read_csv(path: str | os.PathLike) -> Iterator[dict]:
  return _records(_located_csv(_local(path)))


def read_parquet(path: str | os.PathLike) -> Iterator[dict]:
  return _records(_located_parquet(_local(path)))


def read_saved_dataset(path: str | os.PathLike, split: str | None = None) -> Iterator[dict]:
  """Records of a `datasets` save_to_disk directory (a Dataset, or a DatasetDict's split)."""
  return _records(_located_directory(_local(path), split))


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


def load_split(source: Source, split: str, on_bad: OnBadRecord = None) -> Split:
  """All records of `split` from `source` (see the module docstring for what a source is).

  Bad records raise a DataError naming where they are, or, with `on_bad`, are handed to it
  and left out.
  """
  if isinstance(source, dict):
    if split not in source:
      raise DataError(f"no source for split {split!r}; the source has {sorted(source)}")
    return load_split(source[split], split, on_bad)
  if isinstance(source, (str, os.PathLike)):
    located = list(located_records(source, split, on_bad))
  elif callable(source):
    name = getattr(source, "__name__", "source")
    located = [(f"{name}({split!r}) record {i}", r) for i, r in enumerate(source(split))]
  elif isinstance(source, Sequence):
    located = [(f"record {i}", r) for i, r in enumerate(source)]
  else:
    raise DataError(f"a data source is a path, a list of records, a callable(split) or a dict "
                    f"of those by split; got {type(source).__name__} {source!r:.60}")
  kept = []
  for where, record in located:
    if isinstance(record, dict):
      kept.append((where, record))
    else:
      _bad_record(DataError(f"{where}: a record must be a dict; got {type(record).__name__}",
                            "not_an_object"), on_bad)
  return Split(records=[r for _, r in kept], locations=[w for w, _ in kept])
