"""Which parameters learn, and how: path-regex labels, partitioning, and the paper's optimizers.

Two layers keep the frozen model frozen. `split_trainable` lets the train step differentiate
with respect to the trainable subtree alone, so no frozen gradient is ever computed; and the optax
transform is `multi_transform` with `set_to_zero` for frozen labels, so the same optimizer code
runs prompt tuning (`.*prompt.*`), model tuning (`.*`) and partial variants, and holds no state
for a frozen weight.
"""

from __future__ import annotations

import re
import weakref
from typing import Callable, Sequence

import optax
from flax.traverse_util import flatten_dict, unflatten_dict

from softprompt_jax import config_checks as cc

TRAINABLE = "trainable"
FROZEN = "frozen"
PROMPT_ONLY = (".*prompt.*",)
MODEL_TUNING = (".*",)


def _compile(patterns: Sequence[str] | str) -> list[re.Pattern]:
  patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
  try:
    return [re.compile(p) for p in patterns]
  except re.error as e:
    raise ValueError(f"trainable pattern {e.pattern!r} is not a valid regex: {e}") from None


def param_labels(params: dict, trainable_patterns: Sequence[str] | str = PROMPT_ONLY) -> dict:
  """'trainable' for each path ('a/b/c') fully matching any pattern (t5x style), else 'frozen'."""
  regexes = _compile(trainable_patterns)
  flat = flatten_dict(params, sep="/")
  labels = {path: TRAINABLE if any(r.fullmatch(path) for r in regexes) else FROZEN
            for path in flat}
  if TRAINABLE not in labels.values():
    raise ValueError(f"no parameter path matches the trainable patterns {list(trainable_patterns)}"
                     f"; paths look like {sorted(labels)[:3]}")
  return unflatten_dict(labels, sep="/")


def split_trainable(params: dict, labels: dict) -> tuple[dict, dict]:
  """(trainable subtree, frozen subtree): two nested dicts that partition `params`."""
  flat, flat_labels = flatten_dict(params), flatten_dict(labels)
  trainable = {k: v for k, v in flat.items() if flat_labels[k] == TRAINABLE}
  frozen = {k: v for k, v in flat.items() if flat_labels[k] == FROZEN}
  return unflatten_dict(trainable), unflatten_dict(frozen)


def merge(trainable: dict, frozen: dict) -> dict:
  """Inverse of `split_trainable`."""
  flat = flatten_dict(frozen)
  flat.update(flatten_dict(trainable))
  return unflatten_dict(flat)


LEARNING_RATE = cc.number(0, low_open=True, schedule=True)
ADAFACTOR_RULES = {
    "learning_rate": LEARNING_RATE, "decay_rate": cc.number(0, 1, low_open=True),
    "weight_decay_rate": cc.number(0, 1, high_open=True, optional=True),
    "clipping_threshold": cc.number(0, low_open=True, optional=True),
    "multiply_by_parameter_scale": cc.boolean(),
    "momentum": cc.number(0, 1, high_open=True, optional=True),
}


# The learning rate of each optimizer made here, by its update function: optax keeps the rate
# inside the transformation, where the run's log (t5x logs `learning_rate`) cannot read it.
_LEARNING_RATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def learning_rate_of(optimizer) -> float | Callable | None:
  """The learning rate (a number or an optax schedule of the update count) `optimizer` was
  made with by adafactor, adam or masked_optimizer; None for one made elsewhere."""
  update = getattr(optimizer, "update", None)
  return _LEARNING_RATES.get(update) if callable(update) else None


def _with_learning_rate(optimizer: optax.GradientTransformation,
                        learning_rate) -> optax.GradientTransformation:
  if learning_rate is not None:
    _LEARNING_RATES[optimizer.update] = learning_rate
  return optimizer


def adafactor(learning_rate: float = 0.3, decay_rate: float = 0.8,
              weight_decay_rate: float | None = 1e-5, clipping_threshold: float | None = 1.0,
              multiply_by_parameter_scale: bool = False,
              momentum: float | None = None) -> optax.GradientTransformation:
  """Adafactor as the paper ran it: constant lr 0.3, decay 0.8, wd 1e-5, no parameter scaling.

  optax's adafactor applies weight decay as t5x does, `(1 - wd) * param - lr * update`, not
  scaled by the learning rate.
  """
  cc.check("optim.adafactor", locals(), ADAFACTOR_RULES)
  settings = dict(locals())
  return _remember("adafactor", settings, _with_learning_rate(optax.adafactor(
      learning_rate=learning_rate, decay_rate=decay_rate, weight_decay_rate=weight_decay_rate,
      clipping_threshold=clipping_threshold,
      multiply_by_parameter_scale=multiply_by_parameter_scale, momentum=momentum), learning_rate))


ADAM_RULES = {
    "learning_rate": LEARNING_RATE, "b1": cc.number(0, 1, high_open=True),
    "b2": cc.number(0, 1, high_open=True), "eps": cc.number(0, low_open=True),
    "weight_decay": cc.number(0),
}


def adam(learning_rate: float = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
         weight_decay: float = 0.0) -> optax.GradientTransformation:
  """Adam (AdamW when weight_decay > 0)."""
  cc.check("optim.adam", locals(), ADAM_RULES)
  settings = dict(locals())
  if weight_decay:
    return _remember("adam", settings, _with_learning_rate(optax.adamw(
        learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay), learning_rate))
  return _remember("adam", settings, _with_learning_rate(
      optax.adam(learning_rate, b1=b1, b2=b2, eps=eps), learning_rate))


def masked_optimizer(base: optax.GradientTransformation,
                     labels: dict) -> optax.GradientTransformation:
  """`base` for trainable leaves, `set_to_zero` (stateless) for frozen ones."""
  return _with_learning_rate(optax.multi_transform({TRAINABLE: base, FROZEN: optax.set_to_zero()},
                                                   labels), learning_rate_of(base))


# What each optimizer made here was made from, by its update function: (name, settings). A sweep
# (sweep.py) rebuilds it per member with that member's hyperparameters.
_SETTINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
OPTIMIZER_RULES = {"adafactor": ADAFACTOR_RULES, "adam": ADAM_RULES}
# The settings a transformation can take as traced values (one per member under jax.vmap);
# the others change the transformation's structure and must be plain Python values.
TRACEABLE = {"adafactor": ("learning_rate", "decay_rate", "weight_decay_rate",
                           "clipping_threshold", "momentum"),
             "adam": ("learning_rate", "b1", "b2", "eps")}


def _remember(name: str, settings: dict,
              optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
  _SETTINGS[optimizer.update] = (name, settings)
  return optimizer


def settings_of(optimizer) -> tuple[str, dict] | None:
  """(name, keyword arguments) of an optimizer made by `adafactor` or `adam`; None otherwise."""
  update = getattr(optimizer, "update", None)
  found = _SETTINGS.get(update) if callable(update) else None
  return None if found is None else (found[0], dict(found[1]))


def transformation(name: str, settings: dict) -> optax.GradientTransformation:
  """The optax transformation `adafactor` or `adam` makes from `settings`, without the checks,
  so that the values of TRACEABLE[name] may be traced arrays (a sweep's per-member
  hyperparameters under jax.vmap); with plain values it is the same computation."""
  if name == "adafactor":
    return optax.adafactor(**settings)
  if name == "adam":
    kwargs = {k: settings[k] for k in ("b1", "b2", "eps")}
    if settings["weight_decay"]:
      return optax.adamw(settings["learning_rate"], weight_decay=settings["weight_decay"],
                         **kwargs)
    return optax.adam(settings["learning_rate"], **kwargs)
  raise ValueError(f"unknown optimizer {name!r}; known: {sorted(OPTIMIZER_RULES)}")
