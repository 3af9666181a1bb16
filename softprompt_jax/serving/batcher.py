"""The cross-task dynamic batcher: one queue of single examples of any task; a batch is the
oldest waiting example and up to `max_batch - 1` more of the same kind (predict or score),
formed as soon as it is full or the oldest has waited `max_wait_s`. Examples of different tasks
share the batch, each with its own prompt (`mix_tasks=False` keeps one task per batch, as a
server that swaps adapters must). One batch runs at a time, on a worker thread, while the
event loop keeps taking requests."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import time
from typing import Any, Callable, Optional, Sequence


@dataclasses.dataclass
class Example:
  """One example waiting for the model: `kind` is "predict" or "score"; `tokens` its input ids
  (EOS included); `label_ids` the label token ids a score needs. `future` gets the result."""
  kind: str
  task: str
  tokens: list[int]
  future: asyncio.Future
  label_ids: Any = None
  arrived: float = dataclasses.field(default_factory=time.monotonic)


class QueueFull(Exception):
  """The queue holds `max_queue` examples; the request is refused, not queued."""


# Forms the work of one batch on the event loop (reading the prompt bank there) and returns what
# the worker thread runs: a function giving one result per example.
Prepare = Callable[[list[Example]], Callable[[], Sequence[Any]]]


class Batcher:

  def __init__(self, prepare: Prepare, *, max_batch: int, max_wait_s: float, max_queue: int,
               mix_tasks: bool = True, on_batch: Optional[Callable] = None):
    self._prepare, self.max_batch, self.max_wait_s = prepare, max_batch, max_wait_s
    self.max_queue, self.mix_tasks = max_queue, mix_tasks
    self._on_batch = on_batch or (lambda batch, seconds: None)
    self._pending: collections.deque[Example] = collections.deque()
    self._wakeup = asyncio.Event()
    self._stopping = False
    self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")

  @property
  def depth(self) -> int:
    return len(self._pending)

  def submit(self, examples: Sequence[Example]) -> None:
    """Queues all of `examples` or none (QueueFull)."""
    if len(self._pending) + len(examples) > self.max_queue:
      raise QueueFull(f"the queue holds {len(self._pending)} of {self.max_queue} examples")
    self._pending.extend(examples)
    self._wakeup.set()

  def fail(self, which: Callable[[Example], bool], error: Exception) -> None:
    """Answers the waiting examples `which` selects with `error` (a removed task's)."""
    for example in [e for e in self._pending if which(e)]:
      self._pending.remove(example)
      if not example.future.done():
        example.future.set_exception(error)

  async def run(self) -> None:
    """Forms and runs batches until `stop` and the queue is empty."""
    loop = asyncio.get_running_loop()
    while True:
      self._drop_answered()
      if not self._pending:
        if self._stopping:
          break
        self._wakeup.clear()
        await self._wakeup.wait()
        continue
      head = self._pending[0]
      batch = [e for e in self._pending if self._fits(head, e)][:self.max_batch]
      wait = head.arrived + self.max_wait_s - time.monotonic()
      if len(batch) < self.max_batch and wait > 0 and not self._stopping:
        self._wakeup.clear()
        try:
          await asyncio.wait_for(self._wakeup.wait(), wait)
        except asyncio.TimeoutError:
          pass
        continue
      for example in batch:
        self._pending.remove(example)
      await self._run_batch(loop, batch)
    self._worker.shutdown(wait=True)

  async def _run_batch(self, loop, batch: list[Example]) -> None:
    started = time.monotonic()
    try:
      work = self._prepare(batch)
      results = await loop.run_in_executor(self._worker, work)
    except Exception as error:  # the batch's requests learn of it; the server goes on
      for example in batch:
        if not example.future.done():
          example.future.set_exception(error)
      return
    for example, result in zip(batch, results):
      if not example.future.done():  # a request that timed out is not answered again
        if isinstance(result, Exception):
          example.future.set_exception(result)
        else:
          example.future.set_result(result)
    self._on_batch(batch, time.monotonic() - started)

  def _fits(self, head: Example, example: Example) -> bool:
    return example.kind == head.kind and (self.mix_tasks or example.task == head.task)

  def _drop_answered(self) -> None:
    # A request that timed out cancelled its examples; they are not run.
    while self._pending and self._pending[0].future.done():
      self._pending.popleft()
    if any(e.future.done() for e in self._pending):
      self._pending = collections.deque(e for e in self._pending if not e.future.done())

  def stop(self) -> None:
    """Stops once every queued example is answered (a drain: nothing waiting is dropped)."""
    self._stopping = True
    self._wakeup.set()
