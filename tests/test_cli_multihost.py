"""The `train` command across processes and through preemption, run as a user runs it.

Two processes x 2 CPU devices on 127.0.0.1 (gloo) must train like one process with 4 devices;
SIGTERM mid-run must save a checkpoint and exit at once, and the rerun must end bit for bit
where an uninterrupted run ends (one process, and two with only one of them signalled); a
killed process must stop the other, named, within the watch timeout. The runs are
configs/runs/smoke.gin lengthened to 30 steps (seconds each).
"""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import CACHE_SETTINGS
from softprompt_jax.cli import main
from softprompt_jax.multihost import PEER_LOST_STATUS, _timed_out
from softprompt_jax.preemption import Interrupted, Preempted, StopSignals

TESTS = pathlib.Path(__file__).resolve().parent
SMOKE = ["--gin_file", "runs/smoke.gin", "--gin.train.num_steps=30"]
RUN_TIMEOUT_S = 300
PREEMPTED = re.compile(r"preempted \(SIGTERM\) at step (\d+): saved checkpoint (\S+); rerun the "
                       r"same command to resume")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int, process_id=None, port=None) -> dict:
  """A clean JAX environment but the session's compilation cache (conftest): later runs of the
  same command read what the first compiled; only process 0 of a run writes the cache."""
  cache = {name.upper() for name in CACHE_SETTINGS}
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") or k in cache}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  if process_id is not None:
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(process_id))
  return env


def _kill_all(procs) -> None:
  for p in procs:  # never leave a process behind, whatever happened
    if p.poll() is None:
      p.kill()
      p.wait()


def _outputs(procs, timeout_s: float) -> list[str]:
  """Each process's output once it has ended (those left after the timeout are killed)."""
  try:
    return [p.communicate(timeout=timeout_s)[0] for p in procs]
  finally:
    _kill_all(procs)


class Run:
  """Processes of one `train` invocation, their output in files (no pipe can fill up)."""

  def __init__(self, run_dir, processes: int, extra=()):
    log_dir, self.run_dir = run_dir.parent, run_dir
    command = [sys.executable, "-m", "softprompt_jax", "train", *SMOKE, "--model_dir",
               str(run_dir), *extra]
    port = _free_port()
    self.logs, self.procs = [], []
    for i in range(processes):
      env = _env(4, None) if processes == 1 else _env(2, i, port)
      log = log_dir / f"{run_dir.name}.{len(list(log_dir.glob(run_dir.name + '.*')))}.log"
      with open(log, "w") as out:
        self.procs.append(subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT))
      self.logs.append(log)

  def output(self, i: int = 0) -> str:
    return self.logs[i].read_text(errors="replace")

  def wait_for(self, text: str, i: int = 0, timeout_s: float = RUN_TIMEOUT_S) -> None:
    deadline = time.time() + timeout_s
    while text not in self.output(i):
      assert all(p.poll() is None for p in self.procs), f"ended before {text!r}: {self.tails()}"
      assert time.time() < deadline, f"no {text!r} within {timeout_s} s: {self.tails()}"
      time.sleep(0.05)

  def wait(self, timeout_s: float = RUN_TIMEOUT_S) -> list[int]:
    try:
      return [p.wait(timeout=timeout_s) for p in self.procs]
    finally:
      self.kill()

  def kill(self) -> None:
    _kill_all(self.procs)

  def tails(self) -> str:
    return "\n".join(f"--- process {i}:\n{self.output(i)[-3000:]}" for i in range(len(self.logs)))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """The references, both started at once (3 processes, mostly compiling, on any cores free):
  {1: one process with 4 devices, 2: two processes with 2 devices each}."""
  runs = {n: Run(tmp_path_factory.mktemp(f"uninterrupted_{n}") / "run", n) for n in (1, 2)}
  try:
    yield {n: _finished(run) for n, run in runs.items()}
  finally:
    for run in runs.values():
      run.kill()


def _finished(run: Run) -> pathlib.Path:
  assert run.wait() == [0] * len(run.procs), run.tails()
  return run.run_dir


@pytest.fixture(scope="module")
def one_process(uninterrupted):
  return uninterrupted[1]


@pytest.fixture(scope="module")
def two_processes(uninterrupted):
  return uninterrupted[2]


def test_two_processes_train_like_one_and_only_process_0_writes(one_process, two_processes):
  reference = np.load(one_process / "prompt.npy")
  prompt = np.load(two_processes / "prompt.npy")
  assert np.max(np.abs(prompt - reference)) <= 1e-4 * np.max(np.abs(reference))
  # Evaluation inside training (host-local tokens, parameters sharded over both processes)
  # scores the same predictions.
  summaries = [json.loads((run / "summary.json").read_text()) for run in (one_process,
                                                                          two_processes)]
  assert summaries[1]["final_eval"] == summaries[0]["final_eval"]
  assert summaries[1]["best_step"] == summaries[0]["best_step"]
  # One writer: one start record in the log, one TensorBoard writer per split, the configs.
  records = [json.loads(line)
             for line in (two_processes / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if r.get("event") == "start"] == [0]
  assert len(list((two_processes / "tensorboard" / "train").iterdir())) == 1
  assert (two_processes / "config.gin").is_file()
  assert (two_processes / "operative_config.gin").is_file()


def _preempted_line(output: str) -> re.Match:
  lines = [line for line in output.splitlines() if "preempted" in line]
  assert len(lines) == 1, output[-3000:]
  match = PREEMPTED.search(lines[0])
  assert match, lines[0]
  return match


def test_sigterm_saves_the_step_exits_at_once_and_the_rerun_is_bitwise_identical(one_process,
                                                                                  tmp_path):
  run_dir = tmp_path / "run"
  run = Run(run_dir, 1)
  run.wait_for("step 5/")  # training is under way
  start = time.time()
  run.procs[0].send_signal(signal.SIGTERM)
  assert run.wait() == [143], run.tails()
  seconds = time.time() - start
  assert seconds < 30, f"took {seconds:.1f} s from SIGTERM to exit"
  match = _preempted_line(run.output())
  step = int(match.group(1))
  assert 5 <= step < 30
  assert pathlib.Path(match.group(2)) == run_dir / "checkpoints" / str(step)
  assert (run_dir / "checkpoints" / str(step) / "sha256sums.json").is_file()
  assert not (run_dir / "summary.json").exists()
  print(f"SIGTERM -> exit: {seconds:.1f} s (stopped at step {step})")

  resumed = Run(run_dir, 1)
  assert resumed.wait() == [0], resumed.tails()
  assert f"resumed from {run_dir / 'checkpoints' / str(step)} at step {step}" in \
      resumed.output()
  np.testing.assert_array_equal(np.load(run_dir / "prompt.npy"),
                                np.load(one_process / "prompt.npy"))


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_then_resumes(two_processes,
                                                                             tmp_path):
  run_dir = tmp_path / "run"
  run = Run(run_dir, 2)
  run.wait_for("step 5/")
  start = time.time()
  run.procs[1].send_signal(signal.SIGTERM)  # process 0 only learns of it from process 1
  assert run.wait() == [143, 143], run.tails()
  seconds = time.time() - start
  assert seconds < 30, f"took {seconds:.1f} s from SIGTERM to exit"
  steps = {int(_preempted_line(run.output(i)).group(1)) for i in range(2)}
  assert len(steps) == 1, steps  # both processes stopped at the same step
  step = steps.pop()
  assert (run_dir / "checkpoints" / str(step) / "sha256sums.json").is_file()
  print(f"SIGTERM to process 1 -> both exited: {seconds:.1f} s (stopped at step {step})")

  resumed = Run(run_dir, 2)
  assert resumed.wait() == [0, 0], resumed.tails()
  assert f"at step {step}" in resumed.output(0)
  np.testing.assert_array_equal(np.load(run_dir / "prompt.npy"),
                                np.load(two_processes / "prompt.npy"))


def test_a_killed_process_stops_the_other_with_an_error_naming_it(tmp_path):
  timeout_s = 5
  run = Run(tmp_path / "run", 2, ["--gin.train.num_steps=100000", "--gin.train.eval_every=1000",
                                  f"--peer_timeout_s={timeout_s}"])
  try:
    run.wait_for("step 5/")
    run.procs[1].kill()
    start = time.time()
    status = run.procs[0].wait(timeout=RUN_TIMEOUT_S)
    seconds = time.time() - start
  finally:
    run.kill()
  assert status == PEER_LOST_STATUS, run.tails()
  assert seconds < timeout_s + 20, f"took {seconds:.1f} s"
  assert (f"softprompt-jax train: error: lost process 1 of 2: no sign of life for {timeout_s} s"
          in run.output(0)), run.tails()
  assert "restart all 2 processes with the same command" in run.output(0)
  print(f"SIGKILL of process 1 -> process 0 exited: {seconds:.1f} s (peer timeout {timeout_s} s)")


def _watch_workers(scenario: str) -> list[subprocess.Popen]:
  port = _free_port()
  return [subprocess.Popen([sys.executable, str(TESTS / "peer_watch_worker.py"), str(i),
                            str(port), scenario], env=_env(1), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True) for i in range(2)]


def test_an_error_in_one_process_stops_the_others_at_once_quoting_it():
  procs = _watch_workers("fail")
  start = time.time()
  try:
    out, _ = procs[0].communicate(timeout=RUN_TIMEOUT_S)
    seconds = time.time() - start
  finally:
    _kill_all(procs)
  assert procs[0].returncode == PEER_LOST_STATUS, out[-3000:]
  assert "worker: error: process 1 of 2 stopped with an error (disk full)" in out
  assert "finished" not in out
  assert seconds < 30, f"took {seconds:.1f} s; the watch's timeout is 60 s"


def test_a_process_that_finished_first_is_not_lost():
  procs = _watch_workers("done")
  outputs = _outputs(procs, 60)
  assert [p.returncode for p in procs] == [0, 0], outputs
  assert all(f"process {i} finished" in out for i, out in enumerate(outputs))


def test_barrier_timeout_names_the_late_processes():
  # The text of the coordination service's barrier timeout (jax 0.10), as PeerWatch reads it.
  message = ("DEADLINE_EXCEEDED: Barrier timed out. Id: softprompt_jax/alive::10. This usually "
             "happens because a task triggered the barrier too early or too slowly.\n# of tasks "
             "that reached the barrier: 1/3.\nThe first task at the barrier: 0. Some timed out "
             "task names:\n1\n/job:jax_worker/replica:0/task:2\n\n\nRPC: /xla.coordination")
  assert _timed_out(message) == [1, 2]
  assert _timed_out("UNAVAILABLE: failed to connect") == []


def test_signals_request_a_stop_and_a_second_one_interrupts():
  before = signal.getsignal(signal.SIGINT)
  with StopSignals() as signals:
    os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: a stop request
    time.sleep(0.01)
    assert signals.should_stop() and signals.stop_signal == signal.SIGINT
    with pytest.raises(Interrupted) as second:  # the second one ends the command at once
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.01)
  assert second.value.exit_status == 130
  assert signal.getsignal(signal.SIGINT) is before
  assert Preempted(7, signal.SIGTERM, "dir").exit_status == 143
  assert Preempted(7, signal.SIGINT, "dir").exit_status == 130


def test_half_a_multi_host_setting_is_a_one_line_error(tmp_path, capsys):
  status = main(["train", *SMOKE, "--model_dir", str(tmp_path / "never"),
                 "--coordinator_address", "127.0.0.1:1234", "--process_id", "0"])
  assert status == 2
  error = capsys.readouterr().err.strip().splitlines()
  assert len(error) == 1 and "--num_processes" in error[0], error
  assert not (tmp_path / "never").exists()


def test_two_processes_share_infer_batches_and_write_what_one_process_writes(tmp_path):
  rng = np.random.RandomState(0)
  bank = {}
  for task in ("taskless_synthetic_sentiment", "taskless_synthetic_copy"):
    bank[task] = str(tmp_path / f"{task}.npy")
    np.save(bank[task], rng.uniform(-0.5, 0.5, (4, 32)).astype(np.float32))
  requests = tmp_path / "requests.jsonl"
  words = ["great happy day", "apple dog", "awful sad", "so so", "cat"]
  requests.write_text("".join(json.dumps({"task": sorted(bank)[i % 2], "inputs": w}) + "\n"
                              for i, w in enumerate(words)))
  # 5 requests in batches of 2: process 0 decodes batches 0 and 2, process 1 batch 1.
  args = lambda out: ["infer", "--gin_file", "models/tiny.gin", "--gin_file",
                      "runs/prompt_infer.gin", f"--gin.PROMPTS={bank!r}",
                      f"--gin.INPUT_FILE='{requests}'", f"--gin.OUTPUT_FILE='{out}'",
                      "--gin.infer.input_length=64", "--gin.infer.target_length=10",
                      "--gin.infer.batch_size=2"]
  assert main(args(tmp_path / "one.jsonl")) == 0
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, "-m", "softprompt_jax", *args(tmp_path / "two.jsonl")],
                            env=_env(2, i, port), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = _outputs(procs, RUN_TIMEOUT_S)
  assert [p.returncode for p in procs] == [0, 0], outputs
  assert "wrote 5 predictions" in outputs[0] and "wrote" not in outputs[1]
  assert (tmp_path / "two.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()


def test_an_unreachable_coordinator_is_a_one_line_error(tmp_path, capsys):
  address = f"127.0.0.1:{_free_port()}"  # nobody listens there
  status = main(["train", *SMOKE, "--model_dir", str(tmp_path / "never"), "--coordinator_address",
                 address, "--num_processes", "2", "--process_id", "1",
                 "--initialization_timeout_s", "1"])
  assert status == 2
  error = capsys.readouterr().err.strip().splitlines()
  assert error[-1].startswith(f"softprompt-jax train: error: could not reach the coordinator at "
                              f"{address} within 1 s"), error
  assert not (tmp_path / "never").exists()
