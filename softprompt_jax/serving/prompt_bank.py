"""The server's prompt bank: a fixed number of slots [capacity, P, H], one per task. Tasks are
added and removed at run time by writing a slot; the bank's shape never changes, so neither do
the compiled programs that read it."""

from __future__ import annotations

import numpy as np

from softprompt_jax.errors import UserError


class BankError(UserError):
  """A task that cannot be added or removed (its name is taken, the bank is full, no such
  task); `status` is the HTTP status that says so."""

  def __init__(self, message: str, status: int):
    super().__init__(message)
    self.status = status


class PromptBank:
  """Slots of prompts, each [P, H] float32, that tasks name. Changed only from the server's
  event loop; `version` counts the changes, so the model side knows when to copy it again."""

  def __init__(self, capacity: int, prompt_shape: tuple[int, int]):
    self.values = np.zeros((capacity,) + tuple(prompt_shape), np.float32)
    self._slots: dict[str, int] = {}
    self._sources: dict[str, str] = {}
    self.version = 0

  @property
  def capacity(self) -> int:
    return self.values.shape[0]

  @property
  def prompt_shape(self) -> tuple[int, int]:
    return tuple(self.values.shape[1:])

  @property
  def names(self) -> list[str]:
    return sorted(self._slots)

  def slot(self, name: str) -> int:
    return self._slots[name]

  def __contains__(self, name: str) -> bool:
    return name in self._slots

  def free_slot(self, name: str) -> int:
    """The slot `name` would get; BankError when the name is taken or no slot is free."""
    if name in self._slots:
      raise BankError(f"task {name!r} is already served (from {self._sources[name]}); DELETE "
                      f"/v1/tasks/{name} first to replace its prompt", 409)
    free = sorted(set(range(self.capacity)) - set(self._slots.values()))
    if not free:
      raise BankError(f"the prompt bank's {self.capacity} slots are all taken "
                      f"({self.names}); DELETE a task first, or restart with a larger "
                      "serve.max_tasks", 409)
    return free[0]

  def add(self, name: str, values: np.ndarray, source: str) -> int:
    """Puts `values` in a free slot under `name`; returns the slot."""
    slot = self.free_slot(name)
    if tuple(values.shape) != self.prompt_shape:
      raise BankError(f"field 'prompt': {source} is {tuple(values.shape)}; this bank's prompts "
                      f"are {self.prompt_shape}", 400)
    self.values[slot] = values
    self._slots[name] = slot
    self._sources[name] = source
    self.version += 1
    return slot

  def remove(self, name: str) -> None:
    if name not in self._slots:
      raise BankError(f"task {name!r} is not served; the prompt bank has {self.names}", 404)
    # The slot's values stay until another task takes it (a batch already formed holds its own
    # copy of the bank).
    del self._slots[name], self._sources[name]
    self.version += 1

  def describe(self) -> list[dict]:
    return [{"name": name, "prompt": self._sources[name], "slot": self._slots[name]}
            for name in self.names]
