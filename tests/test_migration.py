"""The README's migration table: prompt-tuning's sst2-demo.sh, translated flag by flag, runs.

The README's command is for T5 1.1 LM-adapted Base; this test runs the same flags on the tiny
real t5x checkpoint in tests/testdata (its own path, vocabulary, lengths and a short run), and
checks that every flag the README's command sets is one this run sets too."""

import json
import pathlib
import re

import numpy as np

from softprompt_jax.cli import main

ROOT = pathlib.Path(__file__).parent.parent
TESTDATA = pathlib.Path(__file__).parent / "testdata"


def _readme_command() -> str:
  text = (ROOT / "README.md").read_text()
  block = text.split("<!-- sst2-demo translated -->", 1)[1].split("```bash", 1)[1]
  return block.split("```", 1)[0]


def _sst2_files(directory: pathlib.Path) -> None:
  rows = [("a great and moving film", 1), ("dull and lifeless", 0), ("wonderful acting", 1),
          ("a boring mess", 0)] * 2
  directory.mkdir()
  for split in ("train", "validation"):
    with open(directory / f"{split}.jsonl", "w") as f:
      for i, (sentence, label) in enumerate(rows):
        f.write(json.dumps({"sentence": sentence, "label": label, "idx": i}) + "\n")


def test_the_translated_sst2_demo_trains(tmp_path):
  data = tmp_path / "glue sst2"  # a space, as people's paths have
  _sst2_files(data)
  run = tmp_path / "run"
  checkpoint = TESTDATA / "t5x_t5_1_1_tiny" / "checkpoint_3"  # step 3, as t5x names it
  argv = [
      "train",
      "--gin_file=models/t5_1_1_lm100k.gin",
      "--gin_file=prompts/class_labels.gin",
      "--gin_file=runs/prompt_finetune.gin",
      "--gin.CLASS_LABELS=['positive', 'negative']",
      f"--gin.MODEL_DIR='{run}'",
      "--gin.MIXTURE_OR_TASK_NAME='taskless_glue_sst2_v200_examples'",
      "--gin.MIXTURE_OR_TASK_MODULE='prompt_tuning.data.glue'",
      "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 4}",
      f"--gin.INITIAL_CHECKPOINT_PATH='{checkpoint}'",
      "--gin.TRAIN_STEPS=5",  # t5x counts the checkpoint's 3 steps: this run trains 2
      "--gin.USE_CACHED_TASKS=False",
      f"--gin.VOCABULARY='{TESTDATA / 't5_vocab' / 'sentencepiece.model'}'",
      f"--gin.DATA='{data}'",
      "--gin.BATCH_SIZE=8", "--gin.PROMPT_LENGTH=4",  # tiny-run sizes
  ]
  readme_flags = set(re.findall(r"(--[\w.]+)=", _readme_command()))
  ours = {arg.split("=")[0] for arg in argv[1:]}
  assert readme_flags and readme_flags <= ours, readme_flags - ours

  assert main(argv) == 0
  operative = (run / "operative_config.gin").read_text()
  assert "train.num_steps = 2" in operative
  assert "label_order = ['positive', 'negative']" in operative
  summary = json.loads((run / "summary.json").read_text())
  assert summary["steps"] == 2
  prompt = np.load(run / "prompt.npy")
  assert prompt.shape[0] == 4 and np.all(np.isfinite(prompt))
