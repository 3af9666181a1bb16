"""`curves.png`: the training loss and the evaluation curves of a run, read from its metrics."""

from __future__ import annotations

import io
from pathlib import Path

from softprompt_jax import output_files
from softprompt_jax.run_layout import CURVES_FILE
from softprompt_jax.run_log import RECORD_FIELDS, TRAIN, is_finite, read_metrics


def plot_curves(run_dir, png_path=None, metric: str | None = None, *,
                train_metric: str = "loss") -> Path:
  """A PNG of the training loss (left) and evaluation curves (right) over steps.

  `metric` picks the evaluation metric plotted for every eval split; None plots all of them.
  Renders with Agg on a bare Figure, so no display is needed and pyplot's global state (and the
  caller's backend) is left alone.
  """
  # Imported here: matplotlib is slow to import and only the end of a run draws.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  run_dir = Path(run_dir)
  png_path = Path(png_path) if png_path is not None else run_dir / CURVES_FILE
  records = read_metrics(run_dir)
  train = [r for r in records if r["split"] == TRAIN and is_finite(r.get(train_metric))]
  evals = [r for r in records if r["split"] != TRAIN]
  names = _eval_metric_names(evals)
  if metric is not None:
    if evals and metric not in names:
      raise ValueError(f"no evaluation logged {metric!r}; logged metrics: {names}")
    names = [metric]

  figure = Figure(figsize=(11, 4), layout="constrained")
  FigureCanvasAgg(figure)
  train_axes, eval_axes = figure.subplots(1, 2)
  train_axes.plot([r["step"] for r in train], [r[train_metric] for r in train], linewidth=1)
  train_axes.set(title=f"train {train_metric}", xlabel="step")
  for split in dict.fromkeys(r["split"] for r in evals):
    for name in names:
      points = [(r["step"], r[name]) for r in evals
                if r["split"] == split and is_finite(r.get(name))]
      if points:
        eval_axes.plot(*zip(*points), marker="o", markersize=3, label=f"{split} {name}")
  eval_axes.set(title="evaluation", xlabel="step")
  if eval_axes.lines:
    eval_axes.legend()
  else:
    eval_axes.text(0.5, 0.5, "no evaluations yet", ha="center", va="center",
                   transform=eval_axes.transAxes)
  for axes in (train_axes, eval_axes):
    axes.grid(alpha=0.3)

  image = io.BytesIO()
  figure.savefig(image, format="png", dpi=100)
  output_files.write_bytes(png_path, image.getvalue())  # a viewer never sees half an image
  return png_path


def _eval_metric_names(records: list[dict]) -> list[str]:
  names = []
  for record in records:
    for name, value in record.items():
      # Counts (num_examples, num_truncated_inputs, …) describe the data, not the prompt.
      if (name not in RECORD_FIELDS and not name.startswith("num_") and is_finite(value)
          and name not in names):
        names.append(name)
  return names
