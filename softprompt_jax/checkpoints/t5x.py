"""Readers for t5x checkpoints: the legacy msgpack + tensorstore layout, and t5x's orbax layout.

Legacy (t5x `Checkpointer`): `checkpoint_N/checkpoint` is a flax msgpack file holding
`{'version': 3, 'optimizer': {'target': params, 'state': {...}}}`. A leaf is either an inline
flax ndarray (msgpack ext type 1: msgpack of (shape, dtype name, bytes); ext 3 is a numpy scalar
in the same encoding; arrays over 1 GiB are split into `__msgpack_chunked_array__` dicts) or a
tensorstore spec naming a zarr directory, relative to `checkpoint_N/`, e.g.
`{'driver': 'zarr', 'kvstore': {'driver': 'file', 'path': 'target.encoder.layers_0...'}}`
('gfile' and 'gcs' kvstores name the same relative directory; t5x rereads them locally that way).

Orbax (t5x `OrbaxCheckpointManagerInterface`): a `CheckpointManager` with step prefix
`checkpoint` and an item `state` written by `PyTreeCheckpointHandler(use_ocdbt=True)`, i.e.
`checkpoint_N/state/` holding the train state dict `{'target': params, 'state': {'step': ...,
'param_states': ...}, ['flax_mutables': ...]}`.

Only `target` (the model parameters) is read; optimizer state is never touched.
"""

from __future__ import annotations

import dataclasses
import mmap
import pathlib
import re
from typing import Any, Optional

import msgpack
import numpy as np

from softprompt_jax.checkpoints.checkpoint_reader import (CheckpointError, CheckpointReader,
                                                          ParamPath, ShapeDtype, join_path)
from softprompt_jax.checkpoints.shapes import infer_t5_config
from softprompt_jax.paths import absolute
from softprompt_jax.t5_config import T5Config

MSGPACK_FILE = "checkpoint"
ORBAX_ITEM = "state"
ORBAX_METADATA = "_METADATA"
_STEP_DIR = re.compile(r"checkpoint_(\d+)")


# --------------------------------------------------------------------------------------------
# Finding the checkpoint


def find_t5x_checkpoint(path: pathlib.Path) -> Optional[tuple[str, pathlib.Path]]:
  """('msgpack', checkpoint file) or ('orbax', item directory) for a t5x checkpoint at `path`.

  `path` may be the `checkpoint` file, a `checkpoint_N` directory, an orbax item directory, or a
  model directory holding `checkpoint_N` directories (the highest N is taken). None when `path`
  is none of these.
  """
  if path.is_file():
    if path.name == ORBAX_METADATA:
      return "orbax", path.parent
    if path.name == MSGPACK_FILE or _starts_like_msgpack_map(path):
      return "msgpack", path
    return None
  if not path.is_dir():
    return None
  if (path / ORBAX_ITEM).is_dir():
    return "orbax", path / ORBAX_ITEM
  if (path / ORBAX_METADATA).is_file():
    return "orbax", path
  if (path / MSGPACK_FILE).is_file():
    return "msgpack", path / MSGPACK_FILE
  steps = {int(m.group(1)): child for child in path.iterdir()
           for m in [_STEP_DIR.fullmatch(child.name)] if m and child.is_dir()}
  if steps:
    latest = steps[max(steps)]
    found = find_t5x_checkpoint(latest)
    if found is None:
      raise CheckpointError(f"{latest} (the latest of {len(steps)} checkpoint_N directories in "
                            f"{path}) holds neither a t5x `checkpoint` file nor an orbax "
                            f"`{ORBAX_ITEM}/` directory")
    return found
  return None


def open_t5x(kind: str, where: pathlib.Path) -> CheckpointReader:
  return T5xMsgpackReader(where) if kind == "msgpack" else T5xOrbaxReader(where)


def _starts_like_msgpack_map(path: pathlib.Path) -> bool:
  with open(path, "rb") as f:
    first = f.read(1)
  return bool(first) and (0x80 <= first[0] <= 0x8f or first[0] in (0xde, 0xdf))


# --------------------------------------------------------------------------------------------
# Flax msgpack, parsed without copying array bytes


@dataclasses.dataclass(frozen=True)
class InlineArray:
  """A flax msgpack ndarray left in the file: where its bytes are, not the bytes."""
  shape: tuple[int, ...]
  dtype: np.dtype
  offset: int
  nbytes: int


@dataclasses.dataclass(frozen=True)
class ChunkedArray:
  """Flax's split form of an array over 1 GiB: flat chunks to concatenate and reshape."""
  shape: tuple[int, ...]
  chunks: tuple[InlineArray, ...]

  @property
  def dtype(self) -> np.dtype:
    return self.chunks[0].dtype


# Payload sizes of fixed-size scalars, and length-field sizes of the variable-size types.
_FIXED = {0xc0: 0, 0xc2: 0, 0xc3: 0, 0xca: 4, 0xcb: 8, 0xcc: 1, 0xcd: 2, 0xce: 4, 0xcf: 8,
          0xd0: 1, 0xd1: 2, 0xd2: 4, 0xd3: 8}
_BYTES = {0xc4: 1, 0xc5: 2, 0xc6: 4, 0xd9: 1, 0xda: 2, 0xdb: 4}  # bin, str
_EXT = {0xc7: 1, 0xc8: 2, 0xc9: 4}
_FIXEXT = {0xd4: 1, 0xd5: 2, 0xd6: 4, 0xd7: 8, 0xd8: 16}
_ARRAY = {0xdc: 2, 0xdd: 4}
_MAP = {0xde: 2, 0xdf: 4}
_EXT_NDARRAY, _EXT_COMPLEX, _EXT_NPSCALAR = 1, 2, 3


def parse_msgpack(buf) -> Any:
  """The tree of a flax msgpack buffer, with each ndarray as an `InlineArray` (no data copied).

  Maps become dicts, arrays lists, scalars Python values. Walking the structure by hand (rather
  than msgpack.unpackb with an ext hook) keeps multi-gigabyte inline arrays out of memory until
  one is read.
  """
  value, end = _parse(buf, 0)
  if end != len(buf):
    raise ValueError(f"{len(buf) - end} bytes of extra data after the msgpack object")
  return value


def _uint(buf, pos: int, size: int) -> int:
  if pos + size > len(buf):
    raise ValueError("truncated msgpack data")
  return int.from_bytes(buf[pos:pos + size], "big")


def _parse(buf, pos: int) -> tuple[Any, int]:
  if pos >= len(buf):
    raise ValueError("truncated msgpack data")
  b = buf[pos]
  if 0x80 <= b <= 0x8f:
    return _parse_map(buf, pos + 1, b & 0x0f)
  if 0x90 <= b <= 0x9f:
    return _parse_list(buf, pos + 1, b & 0x0f)
  if b in _MAP:
    n = _MAP[b]
    return _parse_map(buf, pos + 1 + n, _uint(buf, pos + 1, n))
  if b in _ARRAY:
    n = _ARRAY[b]
    return _parse_list(buf, pos + 1 + n, _uint(buf, pos + 1, n))
  if b in _EXT or b in _FIXEXT:
    if b in _EXT:
      n = _EXT[b]
      size, code_pos = _uint(buf, pos + 1, n), pos + 1 + n
    else:
      size, code_pos = _FIXEXT[b], pos + 1
    code = _uint(buf, code_pos, 1)
    code = code - 256 if code >= 128 else code
    start = code_pos + 1
    if start + size > len(buf):
      raise ValueError("truncated msgpack data")
    return _ext(buf, code, start, size), start + size
  if b <= 0x7f or b >= 0xe0:
    end = pos + 1
  elif 0xa0 <= b <= 0xbf:
    end = pos + 1 + (b & 0x1f)
  elif b in _FIXED:
    end = pos + 1 + _FIXED[b]
  elif b in _BYTES:
    n = _BYTES[b]
    end = pos + 1 + n + _uint(buf, pos + 1, n)
  else:
    raise ValueError(f"byte 0x{b:02x} at offset {pos} starts no msgpack object")
  if end > len(buf):
    raise ValueError("truncated msgpack data")
  return msgpack.unpackb(buf[pos:end], raw=False), end


def _parse_map(buf, pos: int, n: int) -> tuple[dict, int]:
  out = {}
  for _ in range(n):
    key, pos = _parse(buf, pos)
    out[key], pos = _parse(buf, pos)
  return out, pos


def _parse_list(buf, pos: int, n: int) -> tuple[list, int]:
  out = []
  for _ in range(n):
    item, pos = _parse(buf, pos)
    out.append(item)
  return out, pos


def _ext(buf, code: int, start: int, size: int):
  if code == _EXT_COMPLEX:
    real, imag = msgpack.unpackb(buf[start:start + size])
    return complex(real, imag)
  if code not in (_EXT_NDARRAY, _EXT_NPSCALAR):
    raise ValueError(f"msgpack extension type {code} at offset {start} is not a flax type")
  # Payload: msgpack [shape, dtype name, raw bytes].
  if buf[start] != 0x93:
    raise ValueError(f"flax ndarray at offset {start} is not a (shape, dtype, bytes) triple")
  shape, pos = _parse(buf, start + 1)
  dtype_name, pos = _parse(buf, pos)
  if buf[pos] not in (0xc4, 0xc5, 0xc6):
    raise ValueError(f"flax ndarray at offset {start} has no byte buffer")
  n = _BYTES[buf[pos]]
  nbytes = _uint(buf, pos + 1, n)
  offset = pos + 1 + n
  if offset + nbytes > start + size:
    raise ValueError(f"flax ndarray at offset {start} overruns its extension")
  dtype = _dtype(dtype_name.decode() if isinstance(dtype_name, bytes) else dtype_name)
  shape = tuple(int(d) for d in shape)
  if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != nbytes:
    raise ValueError(f"flax ndarray at offset {start}: {nbytes} bytes for shape {shape} {dtype}")
  return InlineArray(shape, dtype, offset, nbytes)


def _dtype(name: str) -> np.dtype:
  import jax.numpy as jnp  # knows bfloat16 and the other ml_dtypes names
  try:
    dtype = np.dtype(jnp.dtype(name))
  except TypeError as e:
    raise ValueError(f"unknown array dtype {name!r} ({e})") from None
  if dtype.hasobject or not (jnp.issubdtype(dtype, jnp.number)
                             or jnp.issubdtype(dtype, jnp.bool_)):
    # Object arrays would be pointers (or pickles); a checkpoint array holds numbers.
    raise ValueError(f"array dtype {name!r} is not numeric; refused")
  return dtype


def _is_ts_spec(node: Any) -> bool:
  return isinstance(node, dict) and "driver" in node and ("kvstore" in node or "path" in node)


def _flatten(tree: Any, prefix: ParamPath = ()) -> dict[ParamPath, Any]:
  """Leaves of a t5x state dict: inline arrays, chunked arrays, tensorstore specs, scalars."""
  if isinstance(tree, dict) and "__msgpack_chunked_array__" in tree:
    shape = tuple(tree["shape"][str(i)] for i in range(len(tree["shape"])))
    chunks = tuple(tree["chunks"][str(i)] for i in range(len(tree["chunks"])))
    return {prefix: ChunkedArray(shape, chunks)}
  if isinstance(tree, dict) and not _is_ts_spec(tree):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, prefix + (str(key),)))
    return out
  return {prefix: tree}


def params_subtree(tree: Any, location: str) -> tuple[Any, ParamPath]:
  """(params, their path in `tree`): t5x keeps them at optimizer/target or target."""
  if not isinstance(tree, dict):
    raise CheckpointError(f"{location}: top level is a {type(tree).__name__}, not a t5x state "
                          "dict")
  if isinstance(tree.get("optimizer"), dict) and "target" in tree["optimizer"]:
    return tree["optimizer"]["target"], ("optimizer", "target")
  if "target" in tree:
    return tree["target"], ("target",)
  if "optimizer" in tree:
    raise CheckpointError(f"{location}: 'optimizer' holds no 'target' parameters")
  return tree, ()  # bare params, as flax.serialization.to_bytes(params) writes them


# --------------------------------------------------------------------------------------------
# Tensorstore specs


def local_ts_spec(spec: dict, checkpoint_dir: pathlib.Path, name: str) -> dict:
  """A tensorstore spec reading `spec`'s array from beside the checkpoint file.

  t5x writes kvstore paths relative to `checkpoint_N/` ('file', 'gfile' or 'gcs' drivers, the
  last with a placeholder bucket); an 'ocdbt' kvstore is rebased on `checkpoint_N/`, where its
  manifest sits.
  """
  kvstore = spec.get("kvstore") or {}
  if not isinstance(kvstore, dict):
    raise CheckpointError(f"{name}: kvstore {kvstore!r} is not a spec this reader understands")
  # tensorstore < 0.1.14 wrote the path beside the kvstore rather than inside it.
  relative = kvstore.get("path", spec.get("path"))
  driver = kvstore.get("driver", "file")
  if relative is None:
    raise CheckpointError(f"{name}: tensorstore spec {spec} names no path")
  if driver in ("file", "gfile", "gcs"):
    array_dir = checkpoint_dir / relative
    if not array_dir.is_dir():
      origin = " (written to Google Cloud Storage; copy the whole checkpoint directory)" if (
          driver == "gcs") else ""
      raise CheckpointError(f"{name}: array directory {array_dir} is missing{origin}")
    # tensorstore's file driver wants an absolute path without '..' segments.
    new_kvstore = {"driver": "file", "path": str(absolute(array_dir)) + "/"}
  elif driver == "ocdbt":
    if not (checkpoint_dir / "manifest.ocdbt").is_file():
      raise CheckpointError(f"{name}: an ocdbt array, but {checkpoint_dir} has no manifest.ocdbt")
    new_kvstore = {"driver": "ocdbt", "path": relative,
                   "base": {"driver": "file", "path": str(absolute(checkpoint_dir)) + "/"}}
  else:
    raise CheckpointError(f"{name}: tensorstore kvstore driver {driver!r} is not supported "
                          "(local 'file', 'gfile', 'gcs' copies and 'ocdbt' are)")
  if spec.get("driver") not in ("zarr", "zarr3", "n5"):
    raise CheckpointError(f"{name}: tensorstore driver {spec.get('driver')!r} is not supported")
  return {"driver": spec["driver"], "kvstore": new_kvstore}


# --------------------------------------------------------------------------------------------
# Readers


class T5xMsgpackReader(CheckpointReader):
  """A legacy t5x checkpoint: the msgpack `checkpoint` file and the zarr arrays beside it."""

  def __init__(self, checkpoint_file: pathlib.Path):
    self.location = str(checkpoint_file)
    self._dir = checkpoint_file.parent
    self._stores: dict[ParamPath, Any] = {}
    self._file = open(checkpoint_file, "rb")
    try:
      if self._file.seek(0, 2) == 0:
        raise CheckpointError(f"{checkpoint_file}: empty file, not a t5x checkpoint")
      # Mapped, not read: inline array bytes stay on disk until `read` copies one out.
      self._buf = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
      try:
        tree = parse_msgpack(self._buf)
      except (ValueError, IndexError, msgpack.UnpackException) as e:
        raise CheckpointError(f"{checkpoint_file}: not a flax msgpack checkpoint ({e})") from e
      target, _ = params_subtree(tree, self.location)
      self._leaves = _flatten(target)
    except BaseException:
      self.close()
      raise

  def _store(self, path: ParamPath):
    if path not in self._stores:
      import tensorstore as ts
      spec = local_ts_spec(self._leaves[path], self._dir, join_path(path))
      try:
        self._stores[path] = ts.open(spec, read=True).result()
      except Exception as e:  # tensorstore raises ValueError / its own errors
        raise CheckpointError(f"{self.location}: cannot open array {join_path(path)} "
                              f"({spec['kvstore']}): {e}") from e
    return self._stores[path]

  def shapes(self) -> dict[ParamPath, ShapeDtype]:
    out = {}
    for path, leaf in self._leaves.items():
      if isinstance(leaf, (InlineArray, ChunkedArray)):
        out[path] = (leaf.shape, leaf.dtype)
      elif _is_ts_spec(leaf):
        store = self._store(path)
        out[path] = (tuple(store.shape), np.dtype(store.dtype.numpy_dtype))
      else:
        value = np.asarray(leaf)
        out[path] = (value.shape, value.dtype)
    return out

  def read(self, path: ParamPath) -> np.ndarray:
    leaf = self._leaves[path]
    if isinstance(leaf, InlineArray):
      return self._read_inline(leaf)
    if isinstance(leaf, ChunkedArray):
      # Filled chunk by chunk, so the array is never held twice.
      out = np.empty(leaf.shape, leaf.dtype)
      flat, start = out.reshape(-1), 0
      for chunk in leaf.chunks:
        size = int(np.prod(chunk.shape, dtype=np.int64))
        flat[start:start + size] = self._read_inline(chunk).reshape(-1)
        start += size
      if start != flat.size:
        raise CheckpointError(f"{self.location}: chunks of {join_path(path)} hold {start} "
                              f"values for shape {leaf.shape}")
      return out
    if _is_ts_spec(leaf):
      try:
        return np.asarray(self._store(path).read().result())
      except CheckpointError:
        raise
      except Exception as e:
        raise CheckpointError(f"{self.location}: cannot read array {join_path(path)}: {e}") from e
    return np.asarray(leaf)

  def _read_inline(self, leaf: InlineArray) -> np.ndarray:
    # Slicing an mmap copies just this array, so it outlives the mapping.
    data = self._buf[leaf.offset:leaf.offset + leaf.nbytes]
    return np.frombuffer(data, dtype=leaf.dtype).reshape(leaf.shape)

  def config(self, **overrides) -> T5Config:
    shapes = {p: s for p, (s, _) in self.shapes().items()}
    return infer_t5_config(shapes, overrides, location=self.location)

  def close(self) -> None:
    if getattr(self, "_buf", None) is not None:
      self._buf.close()
      self._buf = None
    self._file.close()
    self._stores = {}


class T5xOrbaxReader(CheckpointReader):
  """t5x's orbax checkpoint item (`checkpoint_N/state/`), read one array per orbax restore."""

  def __init__(self, item_dir: pathlib.Path):
    import orbax.checkpoint as ocp
    from etils import epath
    self.location = str(item_dir)
    self._dir = epath.Path(absolute(item_dir))  # orbax, like tensorstore, wants it absolute
    self._handler = ocp.PyTreeCheckpointHandler()
    try:
      tree = self._handler.metadata(self._dir).tree
    except Exception as e:  # orbax raises many kinds (FileNotFoundError, ValueError, ...)
      raise CheckpointError(f"{item_dir}: not a readable orbax PyTree checkpoint ({e})") from e
    target, self._prefix = params_subtree(tree, self.location)
    self._meta = _flatten(target)

  def shapes(self) -> dict[ParamPath, ShapeDtype]:
    out = {}
    for path, meta in self._meta.items():
      # Array and scalar metadata carry shape and dtype; anything else (strings) is no array.
      dtype = getattr(meta, "dtype", None)
      out[path] = (tuple(getattr(meta, "shape", ())), np.dtype(object if dtype is None else dtype))
    return out

  def read(self, path: ParamPath) -> np.ndarray:
    import orbax.checkpoint as ocp
    from flax.traverse_util import unflatten_dict
    full = self._prefix + path
    item = unflatten_dict({full: 0})
    restore_args = unflatten_dict({full: ocp.RestoreArgs(restore_type=np.ndarray)})
    try:
      restored = self._handler.restore(self._dir, args=ocp.args.PyTreeRestore(
          item=item, restore_args=restore_args, partial_restore=True))
    except Exception as e:
      raise CheckpointError(f"{self.location}: cannot read array {join_path(path)}: {e}") from e
    for key in full:
      restored = restored[key]
    return np.asarray(restored)

  def config(self, **overrides) -> T5Config:
    shapes = {p: s for p, (s, _) in self.shapes().items()}
    return infer_t5_config(shapes, overrides, location=self.location)

  def close(self) -> None:
    self._handler.close()
