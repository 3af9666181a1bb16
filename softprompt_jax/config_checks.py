"""Type and range checks of the values a run is configured with, made when a configurable is
called (so before it reads or loads anything).

Each gin-bound function declares one `Rule` per parameter beside its definition and calls
`check(name, locals(), RULES)` first thing; a value out of range is a `ConfigError` naming the
parameter as gin spells it and what it accepts:

    train.batch_size=0: expected an integer >= 1
    optim.adafactor.learning_rate='0.3': expected a number > 0 or an optax schedule (this is a
    string: write a number without quotes)

Gin passes what a file wrote, so a quoted number arrives as a string and a list as a list; the
rules accept exactly what the function can use (an int for a float, never a bool for a number).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, Mapping, Optional

from softprompt_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Rule:
  """What a parameter accepts: `test(value)` is True for a valid value; `accepts` says it in
  words for the message."""
  accepts: str
  test: Callable[[Any], bool]
  optional: bool = False  # None is accepted too

  def check(self, name: str, value) -> None:
    if value is None and self.optional:
      return
    try:
      valid = bool(self.test(value))
    except (TypeError, ValueError, OverflowError):
      valid = False
    if not valid:
      accepts = self.accepts + (" or None" if self.optional else "")
      raise ConfigError(f"{name}={_shown(value)}: expected {accepts}{_hint(value)}")


def _hint(value) -> str:
  if isinstance(value, str):
    try:
      float(value)
      return " (this is a string: write a number without quotes)"
    except ValueError:
      pass
  if isinstance(value, bool):
    return " (True/False is not a number)"
  return ""


def _shown(value) -> str:
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _range_words(low, high, low_open: bool, high_open: bool) -> str:
  parts = []
  if low is not None:
    parts.append(f"{'>' if low_open else '>='} {low}")
  if high is not None:
    parts.append(f"{'<' if high_open else '<='} {high}")
  return " and ".join(parts)


def _in_range(value, low, high, low_open: bool, high_open: bool) -> bool:
  if low is not None and (value <= low if low_open else value < low):
    return False
  if high is not None and (value >= high if high_open else value > high):
    return False
  return True


def integer(low: Optional[int] = None, high: Optional[int] = None, *,
            optional: bool = False) -> Rule:
  words = _range_words(low, high, False, False)
  return Rule(f"an integer {words}".rstrip(),
              lambda v: _is_int(v) and _in_range(v, low, high, False, False), optional)


def number(low: Optional[float] = None, high: Optional[float] = None, *, low_open: bool = False,
           high_open: bool = False, optional: bool = False, schedule: bool = False) -> Rule:
  """A real number in range (an int is fine, NaN is not); `schedule`: an optax schedule, a
  function of the step, is accepted too."""
  words = f"a number {_range_words(low, high, low_open, high_open)}".rstrip()
  if schedule:
    words += " or an optax schedule"

  def test(value) -> bool:
    if schedule and callable(value):
      return True
    return (_is_real(value) and value == value
            and _in_range(float(value), low, high, low_open, high_open))
  return Rule(words, test, optional)


def one_of(*choices, optional: bool = False) -> Rule:
  return Rule(f"one of {list(choices)}", lambda v: isinstance(v, str) and v in choices, optional)


def text(*, optional: bool = False) -> Rule:
  return Rule("a non-empty string", lambda v: isinstance(v, str) and bool(v.strip()), optional)


def path(*, optional: bool = False) -> Rule:
  """A file or directory name (the file itself is checked where it is read)."""
  return Rule("a path (a non-empty string)",
              lambda v: isinstance(v, str) and bool(v.strip()) and "\0" not in v, optional)


def boolean() -> Rule:
  return Rule("True or False", lambda v: isinstance(v, bool))


def texts(*, optional: bool = False) -> Rule:
  """A string or a non-empty list of strings (regex patterns, names)."""
  def test(value) -> bool:
    if isinstance(value, str):
      return bool(value)
    return (isinstance(value, (list, tuple)) and bool(value)
            and all(isinstance(v, str) and v for v in value))
  return Rule("a string or a non-empty list of strings", test, optional=optional)


def integers(low: int = 1, *, optional: bool = False) -> Rule:
  return Rule(f"a non-empty list of integers >= {low}",
              lambda v: (isinstance(v, (list, tuple)) and bool(v)
                         and all(_is_int(x) and x >= low for x in v)), optional)


def string_mapping() -> Rule:
  """{name: string}, e.g. a prompt bank's task -> prompt path."""
  return Rule("a non-empty dict of name -> path",
              lambda v: (isinstance(v, Mapping) and bool(v)
                         and all(isinstance(k, str) and k and isinstance(x, str) and x
                                 for k, x in v.items())))


def instance(kind: type | tuple, words: str, *, optional: bool = False) -> Rule:
  return Rule(words, lambda v: isinstance(v, kind), optional)


def function(words: str) -> Rule:
  return Rule(words, callable)


def data_source() -> Rule:
  """Where records come from (readers.load_split): a path, a list of records, a callable of
  the split, or a dict of those by split (or, for a mixture, by task); None: the task's own."""
  import os

  def is_source(value) -> bool:
    if isinstance(value, (str, os.PathLike)):
      return bool(str(value).strip())
    if isinstance(value, dict):
      return bool(value) and all(isinstance(k, str) and is_source(v) for k, v in value.items())
    return callable(value) or isinstance(value, (list, tuple))
  return Rule("a path, a list of records or a dict of paths by split", is_source, optional=True)


def anything() -> Rule:
  """A value checked where it is used (a data source: a path, a dict of paths, records)."""
  return Rule("anything", lambda v: True)


SEED = integer(0, 2**32 - 1)  # numpy's and JAX's generators take a 32-bit seed
POSITIVE = integer(1)


def check(configurable: str, values: Mapping, rules: Mapping[str, Rule]) -> None:
  """ConfigError for the first of `values` that its rule refuses (only parameters that `rules`
  names are looked at: pass `locals()` as the first line of a function)."""
  for name, rule in rules.items():
    if name in values:
      rule.check(f"{configurable}.{name}", values[name])


def device_memory_bytes(device) -> Optional[int]:
  """What one device can hold: an accelerator's memory limit, or the host's RAM for a CPU
  device; None when it cannot be told."""
  try:
    stats = device.memory_stats() or {}
  except Exception:  # CPU devices and some backends report nothing
    stats = {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  if device.platform == "cpu":
    import os
    try:
      return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
      return None
  return None


def check_activations_fit(config, *, who: str, examples_per_device: int, prompt_length: int,
                          input_length: int, target_length: int, device) -> None:
  """ConfigError when one activation of a forward pass alone exceeds the device's memory: the
  encoder's attention scores [B, heads, P+T, P+T], the cross-attention's [B, heads, L, P+T] or
  the logits [B, L, vocab]. A lower bound of what a step needs, so it never refuses a run that
  fits; it catches the lengths and batches that could only fail after loading (a prompt of
  100,000 would try to allocate terabytes)."""
  limit = device_memory_bytes(device)
  if limit is None:
    return
  import numpy as np
  width = np.dtype(config.dtype).itemsize if config.dtype != "bfloat16" else 2
  sequence = prompt_length + input_length
  largest = {
      "the encoder's attention scores": (examples_per_device * config.num_heads * sequence**2
                                         * width),
      "the cross-attention scores": (examples_per_device * config.num_heads * target_length
                                     * sequence * width),
      "the logits": examples_per_device * target_length * config.vocab_size * 4,
  }
  what, need = max(largest.items(), key=lambda item: item[1])
  if need > limit:
    raise ConfigError(
        f"{who}: {what} alone need {need / 2**30:.1f} GiB per device ({examples_per_device} "
        f"examples a device, prompt_length {prompt_length} + input_length {input_length} = "
        f"{sequence} positions, target_length {target_length}), more than the "
        f"{limit / 2**30:.1f} GiB a {device.platform} device has; use a shorter prompt (the "
        "paper's are 1..150), shorter inputs or a smaller batch")
