"""TensorBoard scalars: one event file (TFRecord-framed `Event` protos), written in the caller's
thread.

tensorboardX's SummaryWriter writes from a thread of its own: a full disk there is a traceback
on stderr while training goes on (and its bounded queue, once the thread is dead, blocks logging
for good). Here a failed write is an OSError where the scalar is logged, naming the file.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from softprompt_jax.output_files import naming


class EventFile:
  """A new event file in `directory`, named by the second, the host and `suffix`. Flushed when
  asked, every `flush_every_s` and on close. `purge_step` starts it as
  SummaryWriter(purge_step=...) does: TensorBoard then drops what an earlier file in the
  directory holds from that step on."""

  def __init__(self, directory: Path, *, purge_step: int, suffix: str,
               flush_every_s: float = 30.0):
    from tensorboardX.proto.event_pb2 import Event, SessionLog  # slow; the primary host's only
    from tensorboardX.record_writer import RecordWriter
    from tensorboardX.summary import scalar
    self._event, self._scalar = Event, scalar
    self._flush_every_s = flush_every_s
    self.path = directory / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}{suffix}"
    with naming(self.path):
      directory.mkdir(parents=True, exist_ok=True)
      self._records = RecordWriter(str(self.path))
      self._write(Event(step=purge_step, file_version="brain.Event:2"))
      self._write(Event(step=purge_step, session_log=SessionLog(status=SessionLog.START)))
      self.flush()

  def add_scalars(self, values: dict[str, float], step: int) -> None:
    with naming(self.path):
      for name, value in values.items():
        self._write(self._event(step=int(step), summary=self._scalar(name, value)))
      if time.monotonic() - self._flushed >= self._flush_every_s:
        self.flush()

  def flush(self) -> None:
    with naming(self.path):
      self._records.flush()  # and fsync
    self._flushed = time.monotonic()

  def close(self) -> None:
    try:
      self.flush()
    finally:
      self._records.close()

  def _write(self, event) -> None:
    event.wall_time = time.time()
    self._records.write(event.SerializeToString())
