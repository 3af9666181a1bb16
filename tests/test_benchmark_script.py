"""scripts/benchmark.py runs end to end on the tiny model and ends with its JSON summary.

No timing is asserted (speed is the benchmark's business, not the suite's); what is checked is
that every comparison ran, on the same function: our loss and logits equal PEFT's on the same
weights and batch (and, in the same run, a wrong prompt fails that check), our greedy tokens
equal transformers' `generate`; in bfloat16 the frozen weights really are stored in bfloat16
while the prompt and its optimizer state stay float32; and the GPU run's largest size (xl)
builds (traced, never run)."""

import importlib.util
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
TINY = ["--quick", "--speed_sizes", "tiny", "--reps", "1", "--batch", "8", "--input_len", "12",
        "--target_len", "4", "--prompt_len", "3"]


RUNS = {  # the two end-to-end runs: float32 with the memory table, bfloat16 without
    "float32": (*TINY, "--memory_size", "tiny"),
    "bfloat16": (*TINY, "--dtype", "bfloat16", "--skip_memory"),
}


@pytest.fixture(scope="module")
def run_script(tmp_path_factory):
  """`run_script(name)`: (the summary the script printed last, its --json_out file) for RUNS[name].
  Both runs start at once: most of each is compiling and loading, about one core's work, so
  together they take little longer than the slower one. No timing is asserted."""
  where = tmp_path_factory.mktemp("benchmark")
  running = {}
  for name, args in RUNS.items():
    # Files, not pipes: a pipe nobody reads yet would stall the run.
    with open(where / f"{name}.out", "w") as out, open(where / f"{name}.err", "w") as err:
      running[name] = subprocess.Popen(
          [sys.executable, str(SCRIPT), *args, "--json_out", str(where / f"{name}.json")],
          stdout=out, stderr=err)

  def result(name) -> tuple[dict, dict]:
    assert running[name].wait(timeout=600) == 0, (where / f"{name}.err").read_text()[-3000:]
    summary = json.loads((where / f"{name}.out").read_text().strip().splitlines()[-1])
    return summary, json.loads((where / f"{name}.json").read_text())
  yield result
  for process in running.values():
    if process.poll() is None:  # a test that failed early: no run is left behind
      process.kill()
      process.wait()


@pytest.fixture(scope="module")
def bench():
  spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_benchmark_runs_and_prints_json(run_script):
  summary, full = run_script("float32")
  for key in KEYS:
    assert isinstance(summary[key], float) and math.isfinite(summary[key]) and summary[key] > 0, key
  assert full["summary"] == summary
  assert summary["dtype"] == "float32" and summary["same_function"] is True
  loss = full["speed"]["tiny"]["loss"]
  assert loss["relative_difference"] < 1e-4 and loss["logits_relative_difference"] < 1e-3
  assert loss["wrong_prompt_logits_relative_difference"] > 0.2  # the check tells it apart
  assert full["speed"]["tiny"]["greedy"]["token_agreement"] >= 0.95
  assert full["speed"]["tiny"]["storage"]["frozen_dtypes"] == ["float32"]
  assert full["machine"]["torch_device"] == "cpu" and full["machine"]["gpu"] is False
  for name in ("prompt_tuning", "model_tuning", "peft_prompt_tuning"):
    m = full["memory"][name]
    assert m["peak_source"] == "host: VmHWM"
    assert m["peak_bytes"] == m["peak_rss_bytes"] > m["baseline_rss_bytes"]


def test_bfloat16_stores_frozen_weights_in_bfloat16_and_computes_the_same_function(run_script):
  summary, full = run_script("bfloat16")
  assert summary["dtype"] == full["settings"]["dtype"] == "bfloat16"
  assert full["matmul"]["dtype"] == "bfloat16" and full["matmul"]["datasheet"] is None
  loss = full["speed"]["tiny"]["loss"]
  assert loss["passed"] is True and summary["same_function"] is True
  assert loss["precision"] == "bfloat16" and loss["tolerance"] == {"loss": 2e-2, "logits": 1e-1}
  assert loss["peft_loss_dtype"] == "torch.bfloat16"  # PEFT's side really ran in bfloat16
  assert 0 < loss["logits_relative_difference"] <= 1e-1  # not float32's agreement, within bf16's
  assert loss["relative_difference"] <= 2e-2
  # ... and a wrong model is outside it: the script's control, PEFT with a shifted prompt.
  assert loss["wrong_prompt_logits_relative_difference"] > 0.2
  stored = full["speed"]["tiny"]["storage"]
  assert stored["frozen_dtypes"] == summary["frozen_dtypes"] == ["bfloat16"]
  assert stored["frozen_bytes"] == summary["frozen_bytes"] == 2 * stored["frozen_params"]
  assert stored["trainable_dtypes"] == stored["opt_state_dtypes"] == ["float32"]


def test_xl_builds_for_the_gpu_run_traced_only(bench):
  s = dict(bench.SHAPE, dtype="bfloat16")
  t = bench.trace("xl", s)
  assert t["same_param_count"] and 2.8e9 < t["frozen_params"] < 2.9e9
  assert t["frozen_dtypes"] == ["bfloat16"] and t["frozen_bytes"] == 2 * t["frozen_params"]
  assert t["trainable_dtypes"] == t["opt_state_dtypes"] == ["float32"]
  assert t["loss_shape"] == []


def test_datasheet_peaks_match_gpu_names(bench):
  h200 = bench.datasheet_peak("NVIDIA H200", "bfloat16")
  assert h200["flops"] == 989e12 and h200["precision"] == "bf16 dense"
  assert bench.datasheet_peak("NVIDIA H100 80GB HBM3", "bfloat16")["flops"] == 989e12
  assert bench.datasheet_peak("NVIDIA H100 PCIe", "bfloat16")["flops"] == 756e12
  assert bench.datasheet_peak("NVIDIA A100-SXM4-40GB", "float32")["precision"] == "tf32 dense"
  assert bench.datasheet_peak("NVIDIA A100-SXM4-80GB", "bfloat16")["flops"] == 312e12
  assert bench.datasheet_peak("NVIDIA H100 NVL", "bfloat16") is None
  assert bench.datasheet_peak("cpu", "bfloat16") is None
