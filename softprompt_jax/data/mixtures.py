"""A mixture of tasks trained together with a prompt per task (methods.multi_task): task k's
examples carry prompt id k (the pipeline adds `prompt_ids` to every batch of a mixture), and its
metrics are each task's, under `<task>/<metric>`, with their means."""

from __future__ import annotations

import dataclasses

import numpy as np

from softprompt_jax.data.tasks import Task, get_task

# A mixture's default best metric: the mean over its tasks of each one's first metric.
TASKS_MEAN = "tasks_mean"
# Counts that add up over the tasks of a mixture rather than average.
_COUNTS = ("num_examples", "num_truncated_inputs", "num_truncated_targets", "num_skipped_records")


@dataclasses.dataclass(frozen=True)
class TaskMixture:
  """Tasks trained together, each with its own prompt: task k's examples carry prompt id k."""

  tasks: tuple[Task, ...]

  def __iter__(self):
    return iter(self.tasks)

  def __len__(self) -> int:
    return len(self.tasks)

  @property
  def name(self) -> list[str]:
    """The task names, in prompt-id order (a run records this list as its task)."""
    return [task.name for task in self.tasks]

  @property
  def metric_names(self) -> tuple[str, ...]:
    return (TASKS_MEAN,)

  @property
  def choices(self) -> tuple[str, ...] | None:
    """Every task's labels, each once (what class-label init fills the prompt from)."""
    labels = [label for task in self.tasks for label in (task.choices or ())]
    return tuple(dict.fromkeys(labels)) or None

  def metrics(self, per_task: dict[str, dict[str, float]]) -> dict[str, float]:
    """One dict of the tasks' metrics ({task name: metrics}): `<task>/<metric>` for each;
    a metric every task reports, averaged over tasks under its own name; `tasks_mean`, the
    mean of each task's first metric; and the counts (num_examples, ...) summed."""
    out = {f"{name}/{key}": value for name, values in per_task.items()
           for key, value in values.items()}
    shared = set.intersection(*(set(values) for values in per_task.values()))
    for key in sorted(shared):
      values = [per_task[task.name][key] for task in self.tasks]
      out[key] = float(sum(values) if key in _COUNTS else np.mean(values))
    firsts = [per_task[task.name][task.metric_names[0]] for task in self.tasks
              if task.metric_names and task.metric_names[0] in per_task[task.name]]
    if firsts:
      out[TASKS_MEAN] = float(np.mean(firsts))
    return out


def mixture_of(task) -> TaskMixture | None:
  """`task` as a TaskMixture when it is one, or a list or tuple of task names / Tasks; else
  None (one task)."""
  if isinstance(task, TaskMixture):
    return task
  if isinstance(task, (list, tuple)):
    return TaskMixture(tuple(get_task(t) for t in task))
  return None
