"""The names of what a run directory holds, in one place (every module that reads or writes a
run uses these):

    <model_dir>/
      config.gin, operative_config.gin   the configuration given, and every value it used
      checkpoints/<step>/                prompt-only checkpoints (state, data position, meta)
      prompt.npy                         the best prompt, float32 [prompt_length, d_model]
      summary.json                       written last: its presence marks a finished run
      metrics.jsonl, train/, <split>/    logs and TensorBoard events
      curves.png, eval_<split>.json, interpretation.json
      .lock                              held while a train runs
"""

CONFIG_FILE = "config.gin"
OPERATIVE_CONFIG_FILE = "operative_config.gin"
CHECKPOINT_SUBDIR = "checkpoints"
PROMPT_FILE = "prompt.npy"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
INTERPRETATION_FILE = "interpretation.json"
LOCK_FILE = ".lock"


def eval_file(split: str) -> str:
  """Where `eval` writes the metrics of `split`."""
  return f"eval_{split}.json"
