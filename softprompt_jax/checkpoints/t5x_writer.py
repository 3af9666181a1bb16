"""Writes a T5 as a t5x checkpoint directory, in the legacy layout of t5x's `Checkpointer`.

That is the layout of the published T5 checkpoints, which every t5x version restores (and
`load_t5` reads, see t5x.py): a flax msgpack file `checkpoint` holding
`{'version': 3, 'optimizer': {'target': params, 'state': {'step': N}}}`, where kernels and
embeddings are tensorstore specs naming gzip zarr directories beside it
(`target.encoder.layers_0.attention.key.kernel`, paths relative to the checkpoint directory, so
it can be moved) and the small scales and relative-position tables sit inline, as in the
checkpoint t5x itself wrote in tests/testdata. There is no optimizer state (`param_states`):
t5x fills it in with `RestoreCheckpointConfig(fallback_to_scratch=True)`, as prompt tuning's
configurations do. Arrays are stored as float32.
"""

from __future__ import annotations

import pathlib
from typing import Mapping

import numpy as np

from softprompt_jax.checkpoints.checkpoint_reader import ParamPath
from softprompt_jax.checkpoints.t5x import MSGPACK_FILE
from softprompt_jax.paths import absolute

# t5x's checkpoint format version (t5x.checkpoints.VERSION).
VERSION = 3
# t5x's target size of one zarr chunk.
_CHUNK_BYTES = 64 * 1024 * 1024
# Leaves written as zarr arrays (t5x's partitioned ones); the others go inline.
_ZARR_LEAVES = ("kernel", "embedding")


class T5xCheckpointWriter:
  """Fills `directory` (existing and empty) one array at a time, so a model is never held in
  memory whole; `finish` writes the msgpack file that makes it a checkpoint."""

  def __init__(self, directory):
    self.directory = pathlib.Path(directory)
    self._leaves: dict[ParamPath, object] = {}

  def add(self, path: ParamPath, array) -> None:
    """Writes the parameter at t5x path `path` (e.g. ('encoder', 'layers_0', ...))."""
    array = np.ascontiguousarray(np.asarray(array, np.float32))
    if path[-1] in _ZARR_LEAVES and array.ndim:
      self._leaves[path] = self._write_zarr(".".join(("target",) + tuple(path)), array)
    else:
      self._leaves[path] = array

  def _write_zarr(self, name: str, array: np.ndarray) -> dict:
    import tensorstore as ts
    rows = max(1, _CHUNK_BYTES // max(1, array[:1].nbytes))
    metadata = {"chunks": [min(array.shape[0], rows), *array.shape[1:]],
                "compressor": {"id": "gzip", "level": 1}, "dtype": "<f4",
                "shape": list(array.shape)}
    # tensorstore's file driver wants an absolute path; the spec kept is relative, as t5x's.
    where = {"driver": "file", "path": str(absolute(self.directory / name)) + "/"}
    store = ts.open({"driver": "zarr", "kvstore": where, "metadata": metadata},
                    create=True).result()
    store.write(array).result()
    return {"driver": "zarr", "kvstore": {"driver": "file", "path": name}, "metadata": metadata}

  def finish(self, step: int = 0) -> pathlib.Path:
    from flax import serialization
    from flax.traverse_util import unflatten_dict
    tree = {"version": VERSION,
            "optimizer": {"target": unflatten_dict(self._leaves),
                          "state": {"step": np.asarray(step, np.int32)}}}
    (self.directory / MSGPACK_FILE).write_bytes(serialization.msgpack_serialize(tree))
    return self.directory


def save_t5x_checkpoint(directory, params: Mapping, step: int = 0) -> pathlib.Path:
  """Writes nested t5x `params` as a checkpoint in `directory` (created if need be)."""
  from flax.traverse_util import flatten_dict
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  writer = T5xCheckpointWriter(directory)
  for path, array in sorted(flatten_dict(dict(params)).items()):
    writer.add(path, array)
  return writer.finish(step)
