"""scripts/plan_memory.py compiles for a simulated mesh and ends with its JSON line."""

import json
import os
import subprocess
import sys

from conftest import REPO_ROOT


def test_plan_memory_prints_per_device_memory():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run(
      [sys.executable, str(REPO_ROOT / "scripts" / "plan_memory.py"), "--size", "small",
       "--mesh", "2x2", "--batch", "4", "--lengths", "32,4", "--prompt_length", "5"],
      capture_output=True, text=True, env=env, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["size"] == "small" and result["mesh"] == "2x2"
  assert 0 < result["per_device_gib"] < 16 and result["fits_16gib"]
  # Each device holds at most its shards of the 77M float32 params (~0.29 GiB unsharded).
  assert result["arguments_gib"] < 0.29
