"""Data: tasks (T5 text-to-text formats of GLUE, SuperGLUE, synthetic word tasks), local file
readers, and the batch pipeline. Importing this package registers the built-in tasks."""

from softprompt_jax.data import glue, superglue, synthetic  # noqa: F401  (registers tasks)
from softprompt_jax.data.pipeline import (Batch, BatchIterator, Stats, check_splits,
                                          get_batches)
from softprompt_jax.data.readers import DataError, load_split, read_records
from softprompt_jax.data.tasks import (RecordError, Task, UnknownTaskError, get_task, list_tasks,
                                       register_task, taskless)

__all__ = ["Batch", "BatchIterator", "DataError", "RecordError", "Stats", "Task",
           "UnknownTaskError", "check_splits", "get_batches", "get_task", "list_tasks",
           "load_split", "read_records", "register_task", "taskless"]
