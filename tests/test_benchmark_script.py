"""scripts/benchmark.py runs end to end on the tiny model and ends with its JSON summary.

No timing is asserted (speed is the benchmark's business, not the suite's); what is checked is
that every comparison ran, on the same function: our loss equals PEFT's on the same weights and
batch, and our greedy tokens equal transformers' `generate`.
"""

import json
import math
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
KEYS = ("prompt_over_model_tuning_step", "ours_over_peft_step", "mfu",
        "prompt_over_model_tuning_peak_mem", "mixed_over_single_batch")


def test_benchmark_runs_and_prints_json(tmp_path):
  details = tmp_path / "benchmark.json"
  out = subprocess.run(
      [sys.executable, str(SCRIPT), "--quick", "--speed_sizes", "tiny", "--memory_size", "tiny",
       "--reps", "1", "--batch", "8", "--input_len", "12", "--target_len", "4",
       "--prompt_len", "3", "--json_out", str(details)],
      capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  for key in KEYS:
    assert isinstance(summary[key], float) and math.isfinite(summary[key]) and summary[key] > 0, key
  full = json.loads(details.read_text())
  assert full["summary"] == summary
  assert full["speed"]["tiny"]["loss"]["relative_difference"] < 1e-4
  assert full["speed"]["tiny"]["greedy"]["token_agreement"] >= 0.95
  for name in ("prompt_tuning", "model_tuning"):
    assert full["memory"][name]["peak_rss_bytes"] > full["memory"][name]["baseline_rss_bytes"]
