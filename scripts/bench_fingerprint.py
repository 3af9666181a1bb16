"""Times the frozen checkpoint's fingerprint (taken at every `train` start): the older content
hash (copied here as it was) against `integrity.fingerprint` (names, sizes, times, metadata).

  python scripts/bench_fingerprint.py [--gib 1] [--repeats 5] [--dir /tmp]

Two synthetic checkpoints of --gib GiB each, written with real (zero) blocks, not sparse:
't5x' (a msgpack `checkpoint` file and zarr-like directories of 4 MiB chunk files, which the old
hash read in full) and 'hf' (config.json and one model.safetensors, of which the old hash read the
first and last 16 MiB). 'cold' evicts the files from the page cache before each repetition
(posix_fadvise DONTNEED, no root needed); 'warm' reads them from memory. Medians of --repeats.
The last line is JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import platform
import statistics
import tempfile
import time

from softprompt_jax.checkpoints.integrity import fingerprint

_MIB = 2 ** 20
_FULL_HASH_LIMIT, _BLOCK = 64 * _MIB, 16 * _MIB  # the old function's constants


def old_fingerprint(path) -> str:
  """The fingerprint before this change (integrity.py as of 39377c3), verbatim."""
  path = pathlib.Path(path)
  files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
  digest = hashlib.sha256()
  for file in files:
    size = file.stat().st_size
    digest.update(f"{file.relative_to(path) if file != path else file.name}:{size}\n".encode())
    with open(file, "rb") as f:
      if size <= _FULL_HASH_LIMIT:
        digest.update(f.read())
      else:
        digest.update(f.read(_BLOCK))
        f.seek(size - _BLOCK)
        digest.update(f.read(_BLOCK))
  return digest.hexdigest()


def _write(path: pathlib.Path, size: int) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  block = bytes(min(size, 16 * _MIB))
  with open(path, "wb") as f:
    left = size
    while left:
      left -= f.write(block[:min(left, len(block))])
    f.flush()
    os.fsync(f.fileno())  # clean pages, so that eviction works


def make_t5x(root: pathlib.Path, total: int) -> pathlib.Path:
  checkpoint = root / "checkpoint_3"
  _write(checkpoint / "checkpoint", 200 * 1024)  # the msgpack tree of tensorstore specs
  chunk, per_array = 4 * _MIB, 4
  for i in range(total // (chunk * per_array)):
    array = checkpoint / f"target.encoder.layers_{i}.mlp.wi.kernel"
    _write(array / ".zarray", 300)
    for j in range(per_array):
      _write(array / f"{j}.0", chunk)
  return checkpoint


def make_hf(root: pathlib.Path, total: int) -> pathlib.Path:
  directory = root / "hf"
  _write(directory / "config.json", 1500)
  _write(directory / "model.safetensors", total)
  return directory


def _evict(directory: pathlib.Path) -> None:
  for file in directory.rglob("*"):
    if file.is_file():
      fd = os.open(file, os.O_RDONLY)
      try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
      finally:
        os.close(fd)


def _median_s(fn, directory: pathlib.Path, repeats: int, cold: bool) -> float:
  fn(directory)  # warm-up (and fills the page cache for the warm case)
  times = []
  for _ in range(repeats):
    if cold:
      _evict(directory)
    start = time.perf_counter()
    fn(directory)
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--gib", type=float, default=1.0)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dir", default=None, help="where the checkpoints are written (removed)")
  args = parser.parse_args()
  total = int(args.gib * 2 ** 30)
  rows = []
  with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
    for layout, make in (("t5x", make_t5x), ("hf", make_hf)):
      directory = make(pathlib.Path(tmp) / layout, total)
      files = [p for p in directory.rglob("*") if p.is_file()]
      size = sum(p.stat().st_size for p in files)
      for cache in ("cold", "warm"):
        old = _median_s(old_fingerprint, directory, args.repeats, cache == "cold")
        new = _median_s(fingerprint, directory, args.repeats, cache == "cold")
        rows.append({"layout": layout, "files": len(files), "gib": round(size / 2 ** 30, 3),
                     "cache": cache, "old_s": round(old, 4), "new_s": round(new, 6),
                     "speedup": round(old / new, 1)})
  machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
             "python": platform.python_version(), "system": platform.platform()}
  print(f"machine: {machine}; medians of {args.repeats}")
  print("| layout | files | GiB | page cache | old (content hash) s | new (stat + metadata) s "
        "| speed-up |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for r in rows:
    print(f"| {r['layout']} | {r['files']} | {r['gib']} | {r['cache']} | {r['old_s']} | "
          f"{r['new_s']} | {r['speedup']}x |")
  print(json.dumps({"machine": machine, "rows": rows}))


if __name__ == "__main__":
  main()
