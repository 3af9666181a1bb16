"""Two processes on 127.0.0.1 (gloo CPU collectives, 4 devices each) train like one process."""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np

import multihost_worker as worker
from softprompt_jax import train_step as ts

TIMEOUT_S = 240


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_end_with_the_one_process_prompt(tmp_path):
  model, params, labels, optimizer, batch = worker.build()
  state, frozen = ts.init_train_state(params, labels, optimizer)
  train, _ = ts.jit_steps(model, optimizer)
  for _ in range(worker.STEPS):
    state, metrics = train(state, frozen, batch, jax.random.PRNGKey(2))
  reference = np.asarray(state.trainable["prompt"]["prompt"])

  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  script = pathlib.Path(worker.__file__)
  procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port), str(tmp_path)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(worker.NUM_PROCESSES)]
  outputs = []
  try:
    for p in procs:
      out, _ = p.communicate(timeout=TIMEOUT_S)
      outputs.append(out.decode(errors="replace"))
  finally:
    for p in procs:  # never leave a worker behind, whatever happened
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  np.testing.assert_allclose(np.load(tmp_path / "prompt.npy"), reference, atol=1e-5)
  assert abs(float((tmp_path / "loss.txt").read_text()) - float(metrics["loss"])) < 1e-5
  rows = sorted((tmp_path / f"rows_{i}.txt").read_text() for i in range(2))
  assert rows == ["0 4", "4 8"]  # each host fed only its half of the global batch
