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


def _plan(*args) -> tuple[dict, str]:
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  out = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                       env=env, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1]), out.stdout


def test_cpu_plan_is_labelled_an_upper_bound():
  result, text = _plan("--size", "small", "--mesh", "2x2", "--batch", "4", "--lengths", "32,4",
                       "--prompt_length", "5")
  assert result["compiler"] == "cpu" and result["topology"] is None
  assert result["size"] == "small" and result["mesh"] == "2x2"
  assert 0 < result["per_device_gib"] < 16 and result["fits"]
  # Each device holds at most its shards of the 77M float32 params (~0.29 GiB unsharded).
  assert result["arguments_gib"] < 0.29
  assert "upper bound" in text


@needs_libtpu
def test_tpu_plan_comes_from_the_tpu_compiler_and_bfloat16_halves_the_frozen_weights():
  args = ("--size", "small", "--batch", "8", "--lengths", "64,4", "--prompt_length", "10",
          "--topology", "v3:2x2", "--mesh", "4x2")
  f32, _ = _plan(*args)
  bf16, _ = _plan(*args, "--frozen_dtype", "bfloat16")
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
def test_a_plan_that_exceeds_hbm_is_a_figure_not_a_traceback():
  result, text = _plan("--size", "small", "--batch", "1024", "--lengths", "512,8",
                       "--topology", "v3:2x2", "--mesh", "8x1")
  assert result["fits"] is False and result["compiler"] == "tpu"
  assert result["per_device_gib"] > result["hbm_gib"] > 15  # a v3 core's usable HBM
  assert "does not fit" in text and "Traceback" not in text
