"""scripts/plan_memory.py: the sharded train step compiled ahead of time, by XLA:CPU for simulated
devices and by the real TPU compiler (libtpu) for a TPU topology; the last line is JSON."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "plan_memory.py"
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install -e '.[tpu]')")


TPU_F32 = ("--size", "small", "--batch", "8", "--lengths", "64,4", "--prompt_length", "10",
           "--topology", "v3:2x2", "--mesh", "4x2")
PLANS = {
    # The tiny test model where the figures' size does not matter (seconds to compile, not 20).
    "cpu": ("--size", "tiny", "--mesh", "2x2", "--batch", "256", "--lengths", "512,4",
            "--prompt_length", "5"),
    "tpu_float32": TPU_F32,
    "tpu_bfloat16": (*TPU_F32, "--frozen_dtype", "bfloat16"),
    "tpu_too_big": ("--size", "tiny", "--batch", "8192", "--lengths", "2048,8",
                    "--topology", "v3:2x2", "--mesh", "8x1"),
}


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
  """`plan(name)`: (the JSON line, stdout) of the planner run with PLANS[name]. Every plan starts
  at once: each is a compile that uses about one core, so together they take about as long as
  the two slowest, not the sum (the TPU ones only where libtpu is installed)."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  logs = tmp_path_factory.mktemp("plans")
  running = {}
  for name, args in PLANS.items():
    if name.startswith("tpu") and importlib.util.find_spec("libtpu") is None:
      continue
    # Files, not pipes: a pipe nobody reads yet would stall a chatty planner.
    with open(logs / f"{name}.out", "w") as out, open(logs / f"{name}.err", "w") as err:
      running[name] = subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=out,
                                       stderr=err, env=env)

  def result(name) -> tuple[dict, str]:
    assert running[name].wait(timeout=600) == 0, (logs / f"{name}.err").read_text()[-3000:]
    stdout = (logs / f"{name}.out").read_text()
    return json.loads(stdout.strip().splitlines()[-1]), stdout
  yield result
  for process in running.values():
    if process.poll() is None:  # a test that failed early: no planner is left running
      process.kill()
      process.wait()


def test_cpu_plan_is_labelled_an_upper_bound(plan):
  result, text = plan("cpu")
  assert result["compiler"] == "cpu" and result["topology"] is None
  assert result["size"] == "tiny" and result["mesh"] == "2x2" and result["num_devices"] == 4
  assert 0 < result["per_device_gib"] < 16 and result["fits"]
  # The tiny model's weights are kilobytes: the figure is the activations of the batch.
  assert result["per_device_gib"] == pytest.approx(result["temporaries_gib"], abs=2e-3)
  assert "upper bound" in text


@needs_libtpu
def test_tpu_plan_comes_from_the_tpu_compiler_and_bfloat16_halves_the_frozen_weights(plan):
  (f32, _), (bf16, _) = plan("tpu_float32"), plan("tpu_bfloat16")
  for result in (f32, bf16):
    assert result["compiler"] == "tpu" and result["topology"] == "v3:2x2"
    assert result["device_kind"] == "TPU v3" and result["num_devices"] == 8
    assert result["fits"] and 0 < result["per_device_gib"] < 16
    assert result["per_device_gib"] >= result["arguments_gib"] >= result["frozen_gib"]
  # The frozen weights, sharded 2 ways over "model", are most of the arguments; bfloat16 storage
  # halves them and the compiled arguments shrink by exactly that.
  assert bf16["frozen_gib"] == pytest.approx(f32["frozen_gib"] / 2, abs=1e-3)
  assert bf16["frozen_saving_gib"] == pytest.approx(bf16["frozen_gib"], abs=1e-3)
  assert f32["arguments_gib"] - bf16["arguments_gib"] == pytest.approx(
      bf16["frozen_saving_gib"], abs=2e-3)


@needs_libtpu
def test_a_plan_that_exceeds_hbm_is_a_figure_not_a_traceback(plan):
  result, text = plan("tpu_too_big")
  assert result["fits"] is False and result["compiler"] == "tpu"
  assert result["per_device_gib"] > result["hbm_gib"] > 15  # a v3 core's usable HBM
  assert "does not fit" in text and "Traceback" not in text
