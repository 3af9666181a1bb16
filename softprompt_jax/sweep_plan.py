"""A sweep's members, as `train.members` gives them: checked, resolved into settings, grouped by
what one compiled step can share, and written down as the `config.gin` that trains one alone.

    train.members = {
        'lr0.1':  {'optim.adafactor.learning_rate': 0.1},
        'seed1':  {'train.seed': 1},
        'p20_rv': {'train.prompt_length': 20, 'train.prompt_init': @prompts.random_uniform},
    }

Each member is the run the rest of the configuration describes, with its bindings applied. A
member may set `train.seed` (its prompt's initial values, its dropout and its data order),
`train.prompt_length`, `train.prompt_init` and any parameter of the run's optimizer
(`optim.adafactor.*` / `optim.adam.*`). Everything else is shared.

Members with the same prompt length (and the same optimizer structure: e.g. momentum on or off)
train in one group, one compiled step vectorised over them; a sweep with several lengths trains
one group after another over the same loaded model. Lengths are not padded to one: extra
prompt positions would be attended to and shift the relative positions, so a padded member
would no longer equal its single run.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Callable, Mapping, Optional

from softprompt_jax import config_checks as cc
from softprompt_jax import optim, prompts
from softprompt_jax.errors import ConfigError

MEMBERS_SUBDIR = "members"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=+-]*")
# The train parameters a member may set, and what each accepts.
TRAIN_KEYS = {"train.seed": cc.SEED, "train.prompt_length": cc.integer(1),
              "train.prompt_init": cc.function("an initializer such as @prompts.class_labels")}


def _is_members(value) -> bool:
  return (isinstance(value, Mapping) and bool(value)
          and all(isinstance(name, str) and _NAME.fullmatch(name) and isinstance(b, Mapping)
                  and all(isinstance(k, str) for k in b) for name, b in value.items()))


MEMBERS_RULE = cc.Rule("a non-empty dict {member name (letters, digits, _.=+-): {gin parameter: "
                       "value}}, e.g. {'lr0.1': {'optim.adafactor.learning_rate': 0.1}}",
                       _is_members, optional=True)


@dataclasses.dataclass
class Member:
  """One member: its name, run directory and the settings that may differ between members."""
  name: str
  run_dir: pathlib.Path
  bindings: dict                     # as given: {gin parameter: value}
  seed: int
  prompt_length: int
  prompt_init: Callable
  optimizer: object                  # the plain optax optimizer a single run of it would use
  optimizer_name: Optional[str]      # 'adafactor' / 'adam' (optim.settings_of), None: other
  optimizer_settings: dict           # its keyword arguments ({} for another optimizer)


def plan(members: Mapping, *, model_dir: pathlib.Path, seed: int, prompt_length: int,
         prompt_init: Callable, optimizer) -> list[Member]:
  """The members in order, each checked (one-line ConfigErrors naming the member)."""
  base = optim.settings_of(optimizer)
  planned = []
  for name, bindings in members.items():
    who = f"train.members[{name!r}]"
    unknown = [k for k in bindings if k not in TRAIN_KEYS and not k.startswith("optim.")]
    if unknown:
      raise ConfigError(f"{who} sets {unknown[0]}; a member may set {', '.join(TRAIN_KEYS)} "
                        "and parameters of the run's optimizer (optim.adafactor.*, optim.adam.*)")
    for key, rule in TRAIN_KEYS.items():
      if key in bindings:
        rule.check(f"{who}: {key}", bindings[key])
    own = {k.split(".", 2)[2]: v for k, v in bindings.items() if k.startswith("optim.")}
    name_used, settings = base if base is not None else (None, {})
    if own:
      _check_optimizer_keys(who, bindings, base)
      try:
        member_optimizer = getattr(optim, name_used)(**{**settings, **own})
      except ConfigError as e:
        raise ConfigError(f"{who}: {e}") from None
      settings = {**settings, **own}
    else:
      member_optimizer = optimizer
    planned.append(Member(
        name=name, run_dir=model_dir / MEMBERS_SUBDIR / name, bindings=dict(bindings),
        seed=bindings.get("train.seed", seed),
        prompt_length=bindings.get("train.prompt_length", prompt_length),
        prompt_init=bindings.get("train.prompt_init", prompt_init), optimizer=member_optimizer,
        optimizer_name=name_used, optimizer_settings=settings))
  return planned


def _check_optimizer_keys(who: str, bindings: Mapping, base) -> None:
  keys = [k for k in bindings if k.startswith("optim.")]
  if base is None:
    raise ConfigError(f"{who} sets {keys[0]}, but train.optimizer was not made by "
                      "@optim.adafactor() or @optim.adam(); a sweep varies only their settings")
  name = base[0]
  for key in keys:
    parts = key.split(".")
    if len(parts) != 3 or parts[1] != name or parts[2] not in optim.OPTIMIZER_RULES[name]:
      raise ConfigError(f"{who} sets {key}, but the run's optimizer is @optim.{name}(); set one "
                        f"of optim.{name}.{{{', '.join(optim.OPTIMIZER_RULES[name])}}}")


def traced_settings(group: list[Member]) -> list[str]:
  """The optimizer settings whose values differ between the group's members (traced, one value
  per member, in the compiled step); the rest are the same plain values a single run uses."""
  first = group[0]
  if first.optimizer_name is None:
    return []
  return [k for k in optim.TRACEABLE[first.optimizer_name]
          if any(m.optimizer_settings[k] != first.optimizer_settings[k] for m in group)]


def group_key(member: Member) -> tuple:
  """Members with equal keys can share a compiled step: the same prompt length, optimizer and
  optimizer structure (a setting outside TRACEABLE, or None / a schedule / a number)."""
  name = member.optimizer_name
  if name is None:
    return (member.prompt_length, id(member.optimizer))
  traceable = optim.TRACEABLE[name]
  shape = tuple((k, v if k not in traceable else type(v).__name__ if v is None or callable(v)
                 else "number") for k, v in sorted(member.optimizer_settings.items()))
  schedules = tuple(id(v) for k, v in sorted(member.optimizer_settings.items()) if callable(v))
  return (member.prompt_length, name, shape, schedules)


def groups(members: list[Member]) -> list[list[Member]]:
  """Members grouped by `group_key`, in the order their groups first appear."""
  found: dict = {}
  for m in members:
    found.setdefault(group_key(m), []).append(m)
  return list(found.values())


def _gin_value(value) -> Optional[str]:
  """`value` as gin writes it; None when gin has no way to (a function not registered here)."""
  if value is None or isinstance(value, (bool, int, float, str)):
    return repr(value)
  if callable(value):
    inner = getattr(value, "__wrapped__", value)  # gin's wrapper of a configurable
    for name, entry in prompts.INITIALIZERS.items():
      if entry.factory is inner:
        return f"@prompts.{name}"
  return None


def member_bindings(member: Member, sweep_dir: pathlib.Path) -> Optional[str]:
  """The lines that turn the sweep's configuration into this member's alone (the sweep off, the
  member's bindings applied); None when a value has no gin spelling."""
  lines = []
  for key, value in member.bindings.items():
    text = _gin_value(value)
    if text is None:
      return None
    lines.append(f"{key} = {text}\n")
  return (f"# Member {member.name!r} of the sweep in {sweep_dir}, alone: train with --model_dir\n"
          f"MODEL_DIR = {str(member.run_dir)!r}\n"
          "train.members = None\n" + "".join(lines))


def member_config(sweep_config: str, member: Member, sweep_dir: pathlib.Path) -> Optional[str]:
  """The sweep's `config.gin` text with `member_bindings` after it: `train` with it (and
  --model_dir) trains the member alone. None when a value has no gin spelling."""
  own = member_bindings(member, sweep_dir)
  return None if own is None else sweep_config.rstrip("\n") + "\n\n" + own
