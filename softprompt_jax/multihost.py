"""The processes of a multi-host run: joining them (`join`) and watching them (`PeerWatch`), so
that a wrong setting is one line and one lost process stops them all.

A process that dies mid-run leaves the others waiting in a collective that never completes (gloo
on CPU does not notice a dead peer; JAX's coordination service notices a silent one after its
heartbeat timeout and aborts the rest with a C++ stack trace). `PeerWatch` makes that end short
and legible: a thread in every process meets the others at a coordination-service barrier every
second; when a process misses it for `timeout_s`, the rest print one line naming it and exit
with `PEER_LOST_STATUS`. A process that fails with an error tells the others through the
service's key-value store (they stop within about a second, quoting it), and one that finishes
says so, so that neither counts as lost.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading
import time
from typing import Optional

from softprompt_jax import partitioning
from softprompt_jax.errors import UserError

# EX_TEMPFAIL (sysexits.h): a temporary failure; rerunning every process resumes the run.
PEER_LOST_STATUS = 75
_BARRIER = "softprompt_jax/alive"
_FAILED = "softprompt_jax/failed/"
_DONE = "softprompt_jax/done/"


class DistributedError(UserError, RuntimeError):
  """The processes of a multi-host run could not find each other, or were told inconsistently
  how to (a user error: one line, exit status 2)."""


def join(command: str, *, coordinator_address: Optional[str] = None,
         num_processes: Optional[int] = None, process_id: Optional[int] = None,
         peer_timeout_s: float = 60, initialization_timeout_s: int = 300):
  """Joins the other processes when the arguments, the environment (JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES, JAX_PROCESS_ID) or a TPU pod say there are others; returns their
  `PeerWatch`, or None for a run of one process. Call it before anything touches a device."""
  address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  num_processes = _int_setting(num_processes, "--num_processes", "JAX_NUM_PROCESSES")
  process_id = _int_setting(process_id, "--process_id", "JAX_PROCESS_ID")
  if address and None in (num_processes, process_id):
    missing = [name for name, value in [("--num_processes (JAX_NUM_PROCESSES)", num_processes),
                                        ("--process_id (JAX_PROCESS_ID)", process_id)]
               if value is None]
    raise DistributedError(f"a multi-process run needs {' and '.join(missing)} too, on every "
                           "process")
  if not address and (num_processes is not None or process_id is not None):
    raise DistributedError("--num_processes and --process_id need --coordinator_address (or "
                           "JAX_COORDINATOR_ADDRESS): the host:port of process 0")
  if peer_timeout_s <= 0:
    raise DistributedError(f"--peer_timeout_s must be positive, got {peer_timeout_s}")
  if address:  # JAX aborts with a bare DEADLINE_EXCEEDED when the others never come
    print(f"{command}: joining {num_processes} processes at {address} as process {process_id} "
          f"(waiting up to {initialization_timeout_s} s for the others)", file=sys.stderr,
          flush=True)
    if process_id != 0:
      _wait_for_coordinator(address, initialization_timeout_s)
  try:
    # JAX's own heartbeat check stays as a backstop behind the watch.
    joined = partitioning.initialize_distributed(
        address, num_processes, process_id, heartbeat_timeout_s=int(peer_timeout_s) + 30,
        initialization_timeout_s=initialization_timeout_s)
  except Exception as e:  # e.g. a process id out of range
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DistributedError(f"could not join the run's processes at {address} ({first}); start "
                           "every process with the same coordinator address and "
                           "--num_processes, each with its own --process_id") from e
  import jax
  if not joined or jax.process_count() == 1:
    return None
  print(f"{command}: process {jax.process_index()} of {jax.process_count()} "
        f"({jax.local_device_count()} of {jax.device_count()} devices); if a process is lost "
        f"for {peer_timeout_s:g} s the others stop", file=sys.stderr, flush=True)
  return PeerWatch(peer_timeout_s, command=command)


def _int_setting(value, flag: str, variable: str):
  """`value`, else the environment variable's (as int), else None."""
  if value is not None:
    return value
  text = os.environ.get(variable)
  if not text:
    return None
  try:
    return int(text)
  except ValueError:
    raise DistributedError(f"{variable}={text!r} is not a whole number ({flag})") from None


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Returns once process 0's coordinator accepts connections; a DistributedError after
  `timeout_s` (JAX's own wait would end in an abort without saying what it waited for)."""
  import socket
  host, _, port = address.rpartition(":")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
      return
    except (OSError, ValueError) as e:
      if isinstance(e, ValueError) or time.monotonic() >= deadline:
        raise DistributedError(
            f"could not reach the coordinator at {address} within {timeout_s:g} s ({e}); start "
            "process 0 with the same --coordinator_address (it serves it), and check the host "
            "and port") from None
      time.sleep(0.5)


def _client():
  from jax._src import distributed  # the client jax.distributed.initialize made
  return distributed.global_state.client


class PeerWatch:
  """Started after `jax.distributed.initialize`; `done()` or `failed(message)` when the command
  ends in this process (before JAX shuts down)."""

  def __init__(self, timeout_s: float, command: str = "softprompt-jax", interval_s: float = 1.0):
    import jax
    self.timeout_s, self.command, self.interval_s = timeout_s, command, interval_s
    self.process, self.count = jax.process_index(), jax.process_count()
    self._client = _client()
    self._stop = threading.Event()
    self._ended = False  # this process has said done or failed
    self._linger_until = float("inf")
    self._thread = threading.Thread(target=self._watch, name="peer-watch", daemon=True)
    self._thread.start()

  def done(self) -> None:
    if not self._ended:
      self._ended = True
      self._set(_DONE, "")
      self._stop.set()

  def failed(self, message: str) -> None:
    """Tells the other processes, which stop quoting `message`. This process keeps meeting them
    at the barrier a few rounds more, so that they get past it and read the message."""
    if not self._ended:
      self._ended = True
      self._set(_FAILED, message or "an error")
      self._linger_until = time.monotonic() + 3 * self.interval_s

  def _set(self, prefix: str, value: str) -> None:
    try:
      self._client.key_value_set(f"{prefix}{self.process}", value, allow_overwrite=True)
    except Exception:  # the service is gone: the others learn of it from JAX itself
      pass

  def _watch(self) -> None:
    while not self._stop.is_set() and time.monotonic() < self._linger_until:
      failure = self._failure()
      if failure:
        self._exit(failure)
      try:
        self._client.wait_at_barrier(_BARRIER, int(self.timeout_s * 1000))
      except Exception as error:  # a timeout names the late processes; else no coordinator
        if self._ended:
          return
        failure = self._failure()
        if failure:
          self._exit(failure)
        text = str(error)
        if "timed out" not in text.lower():
          self._exit(self._lost_message([], text))
        others = [p for p in range(self.count) if p != self.process]
        missing = [p for p in _timed_out(text) or others if not self._finished(p)]
        if not missing:
          return  # the others have finished; nothing left to watch for
        self._exit(self._lost_message(missing, text))
      self._stop.wait(self.interval_s)

  def _failure(self) -> Optional[str]:
    try:
      failed = self._client.key_value_dir_get(_FAILED)
    except Exception:
      return None
    for key, message in sorted(failed):
      process = int(key.rsplit("/", 1)[-1])
      if process != self.process:
        return (f"process {process} of {self.count} stopped with an error ({message}); "
                f"stopping process {self.process} too")
    return None

  def _finished(self, process: int) -> bool:
    try:
      self._client.key_value_try_get(f"{_DONE}{process}")
      return True
    except Exception:
      return False

  def _lost_message(self, missing: list[int], error: str) -> str:
    restart = (f"restart all {self.count} processes with the same command to resume from the "
               "last checkpoint")
    if missing:
      names = ", ".join(str(p) for p in missing)
      return (f"lost process {names} of {self.count}: no sign of life for {self.timeout_s:g} s "
              f"(killed, crashed or hung: see its log); stopping process {self.process}; "
              f"{restart}")
    first = error.strip().splitlines()[0] if error.strip() else "no answer"
    return (f"lost the coordinator (process 0) of the run ({first}); stopping process "
            f"{self.process}; {restart}")

  def _exit(self, message: str) -> None:
    """Ends this process now: its main thread may be waiting on a collective forever."""
    print(f"{self.command}: error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(PEER_LOST_STATUS)


def _timed_out(message: str) -> list[int]:
  """The process ids a coordination-service barrier timeout lists ("Some timed out task names:"
  then one id or task name a line)."""
  if "timed out" not in message.lower():
    return []
  tail = message.split("timed out task names:", 1)[-1] if "task names:" in message else ""
  ids = []
  for line in tail.strip().splitlines():
    match = re.fullmatch(r"\s*(?:/job:\w+/replica:\d+/task:)?(\d+)\s*", line)
    if not match:
      break
    ids.append(int(match.group(1)))
  return ids


def add_flags(parser: argparse.ArgumentParser) -> None:
  """The command-line flags of `join` (train, eval and infer take them)."""
  group = parser.add_argument_group(
      "multi-host", "one process per host, each started with the same command; not needed on "
      "TPU pods, where JAX finds the other hosts itself")
  group.add_argument("--coordinator_address", help="host:port of process 0 (also "
                     "JAX_COORDINATOR_ADDRESS)")
  group.add_argument("--num_processes", type=int, help="how many processes (also "
                     "JAX_NUM_PROCESSES)")
  group.add_argument("--process_id", type=int, help="this process, 0 .. num_processes-1 (also "
                     "JAX_PROCESS_ID)")
  group.add_argument("--peer_timeout_s", type=float, default=60,
                     help="a process silent this long counts as lost: the others stop, naming "
                     f"it, with exit status {PEER_LOST_STATUS}")
  group.add_argument("--initialization_timeout_s", type=int, default=300,
                     help="how long to wait for every process to join")
