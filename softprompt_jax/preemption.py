"""Preemption: SIGTERM or SIGINT ends `train` at a step every process agrees on, after saving.

TPU VMs and Kubernetes send SIGTERM some seconds before they evict a job. While `StopSignals`
is active the first such signal only sets a flag; the training loop asks `should_stop()` after
every step, saves a checkpoint at the step it answers True, and raises `Preempted` (the CLI
prints one line and exits with 128 + the signal's number, as a shell reports a process the
signal ended). A second signal ends the process at once.

Across processes the flag is combined by a one-element-per-device max on the devices, dispatched
after every step and read one step later: every process reads the same value after the same
step, so all stop at one step whichever processes were signalled, and no process waits on a
host-side barrier while another waits on a device collective. (JAX's own preemption service,
`reached_preemption_sync_point`, agrees on "max step + 1" in a background thread, which a fast
loop can pass before the agreement arrives; it also listens to SIGTERM only.)
"""

from __future__ import annotations

import signal
import threading
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """`train` stopped on a signal after saving a checkpoint at `step`; rerun to resume."""

  def __init__(self, step: int, signal_number: int, checkpoint):
    self.step, self.signal_number, self.checkpoint = step, signal_number, checkpoint
    name = signal.Signals(signal_number).name
    super().__init__(f"preempted ({name}) at step {step}: saved checkpoint {checkpoint}; rerun "
                     "the same command to resume")

  @property
  def exit_status(self) -> int:
    return 128 + self.signal_number


class Interrupted(BaseException):
  """SIGTERM or SIGINT where no checkpoint can be made (before a train loop, or in another
  command): the command ends at once, with what it had written undone or left whole."""

  def __init__(self, signal_number: int):
    self.signal_number = signal_number
    super().__init__(f"interrupted ({signal.Signals(signal_number).name})")

  @property
  def exit_status(self) -> int:
    return 128 + self.signal_number


class _SignalHandlers:
  """A context that routes SIGTERM and SIGINT to `self._handle` and restores the previous
  handlers on exit (handlers can only be set from the main thread: elsewhere it does nothing)."""

  def __init__(self):
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # Python's rule for handlers
      for number in SIGNALS:
        self._previous[number] = signal.signal(number, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for number, handler in self._previous.items():
      signal.signal(number, handler if handler is not None else signal.SIG_DFL)
    self._previous.clear()

  def _handle(self, number, frame) -> None:
    raise NotImplementedError


class SignalsAsExceptions(_SignalHandlers):
  """A context in which SIGTERM and SIGINT raise `Interrupted`, so the command's cleanup runs
  and it ends with one line (a train loop's `StopSignals` takes over inside it)."""

  def _handle(self, number, frame) -> None:
    raise Interrupted(number)


class StopSignals(_SignalHandlers):
  """A context in which SIGTERM / SIGINT request a stop instead of ending the process."""

  def __init__(self):
    super().__init__()
    self.signal_number: Optional[int] = None  # of the first signal received, here
    self._agreed: Optional[int] = None  # the signal every process stops for
    self._pending = None  # the device max dispatched after the previous step
    self._combine = self._sharding = None

  def _handle(self, number, frame) -> None:
    if self.signal_number is None:
      self.signal_number = number
      return
    self.__exit__()  # a second signal: stop now, without the checkpoint
    raise Interrupted(number)

  def request(self, number: int = signal.SIGTERM) -> None:
    """As if `number` had arrived (tests, or a caller with its own notice of eviction)."""
    if self.signal_number is None:
      self.signal_number = number

  @property
  def stop_signal(self) -> Optional[int]:
    """The signal the processes agreed to stop for (after `should_stop()` said True)."""
    return self._agreed

  def should_stop(self) -> bool:
    """Whether every process stops after the step just dispatched; call it once per step, in
    every process. One process: the flag itself. Several: the max over processes of the flags
    each contributed after the previous step, so the answer is the same everywhere."""
    if jax.process_count() == 1:
      self._agreed = self.signal_number
      return self._agreed is not None
    previous, self._pending = self._pending, self._dispatch(self.signal_number or 0)
    if previous is None:
      return False
    agreed = int(previous)  # blocks until every process has dispatched the previous step
    if agreed:
      self._agreed = agreed
    return bool(agreed)

  def _dispatch(self, value: int):
    if self._combine is None:
      by_process = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
      mesh = Mesh(np.array(by_process), ("processes",))  # each process's flags contiguous
      self._sharding = NamedSharding(mesh, PartitionSpec("processes"))
      self._combine = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, PartitionSpec()))
    local = np.full((jax.local_device_count(),), value, np.int32)
    flags = jax.make_array_from_process_local_data(self._sharding, local,
                                                   (jax.device_count(),))
    return self._combine(flags)
