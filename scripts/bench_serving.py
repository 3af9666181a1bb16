"""Serving benchmark: many tasks from one frozen model, over HTTP on loopback.

An open stream of single-example requests over 8 tasks (prompts of one shape) is sent by 1, 8
and 64 concurrent clients (each sends its next request when the last is answered) to:
  (a) `softprompt-jax serve`: tasks mixed in a batch, each example with its own prompt;
  (b) the same server forced to one task per batch (serve.mix_tasks=False);
  (c) PEFT on transformers' T5 (scripts/bench_serving_peft.py): same weights, same HTTP front
      and batcher, one adapter per batch (`set_adapter`), the best PEFT can do;
  (single) server (a) given a stream of one task only;
  (mixed_same_prompt) the mixed stream on a server whose 8 tasks all hold task 0's prompt: the
      same predictions, so the same work, as (single); the difference is what mixing costs.
      (a) and (single) differ also in their outputs: a batch decodes until its longest answer
      ends, and other prompts give other answer lengths.
Every answer is checked: (a), (b) and (single) must equal offline `softprompt-jax infer` of the
same lines; (c)'s agreement with it is reported. Contenders alternate within each round; the
table gives the median throughput over rounds and the latency percentiles over all requests.
The last line is JSON.

  python scripts/bench_serving.py --duration_s 6   # ~8 min on 2 cores (the README table)
  python scripts/bench_serving.py --quick          # ~3 min
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import aiohttp
import numpy as np

from benchmark_harness import cpu_model
from softprompt_jax.data.synthetic import NEGATIVE, NOUNS, POSITIVE
from softprompt_jax.peft_interop import save_peft_adapter
from softprompt_jax.pretrained import TINY_MODEL_DIR, read_manifest

HERE = pathlib.Path(__file__).resolve().parent
CONTENDERS = ("a_mixed", "b_one_task_per_batch", "c_peft", "single_task", "mixed_same_prompt")


def _prompts(folder: pathlib.Path, num_tasks: int, length: int) -> tuple[dict, dict]:
  """({task: .npy}, {task: PEFT adapter dir}) holding the same random prompts."""
  config = read_manifest(TINY_MODEL_DIR)["config"]
  rng = np.random.default_rng(0)
  npy, adapters = {}, {}
  for k in range(num_tasks):
    values = rng.uniform(-0.5, 0.5, (length, config["emb_dim"])).astype(np.float32)
    npy[f"task{k}"] = str(folder / f"task{k}.npy")
    np.save(npy[f"task{k}"], values)
    adapters[f"task{k}"] = str(save_peft_adapter(
        folder / f"task{k}_adapter", values, num_layers=config["num_encoder_layers"],
        num_heads=config["num_heads"]))
  return npy, adapters


def _stream(count: int, tasks: list[str], seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  words = NOUNS + POSITIVE + NEGATIVE
  return [{"task": str(rng.choice(tasks)),
           "inputs": " ".join(rng.choice(words, size=int(rng.integers(2, 8))))}
          for _ in range(count)]


def _gin_args(prompts: dict) -> list[str]:
  return ["--gin_file", "models/byt5.gin", f"--gin.CHECKPOINT_PATH='{TINY_MODEL_DIR}'",
          f"--gin.PROMPTS={prompts!r}"]


def _serve_args(args) -> list[str]:
  return ["--gin_file", "runs/prompt_serve.gin", f"--gin.serve.input_length={args.input_length}",
          f"--gin.serve.target_length={args.target_length}", "--gin.serve.length_buckets=(32,)",
          f"--gin.serve.batch_sizes=(1, 4, 8, {args.max_batch})",
          f"--gin.serve.max_wait_ms={args.max_wait_ms}", "--gin.serve.max_queue=4096"]


def _offline(lines: list[dict], prompts: dict, args, folder: pathlib.Path) -> list[str]:
  (folder / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  subprocess.run([sys.executable, "-m", "softprompt_jax", "infer", *_gin_args(prompts),
                  "--gin_file", "runs/prompt_infer.gin",
                  f"--gin.INPUT_FILE='{folder / 'in.jsonl'}'",
                  f"--gin.OUTPUT_FILE='{folder / 'out.jsonl'}'",
                  f"--gin.infer.input_length={args.input_length}",
                  f"--gin.infer.target_length={args.target_length}"], check=True)
  return [json.loads(x)["prediction"] for x in (folder / "out.jsonl").read_text().splitlines()]


class Process:
  """A server subprocess; `url` once it says it is ready."""

  def __init__(self, name: str, command: list[str], folder: pathlib.Path):
    self.name, self.log = name, folder / f"{name}.log"
    with open(self.log, "wb") as log:
      self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

  def wait_ready(self, timeout_s: float = 600) -> str:
    deadline = time.monotonic() + timeout_s
    while not (found := re.search(r"on (http://[\d.]+:\d+)", self.log.read_text())):
      if self.process.poll() is not None or time.monotonic() > deadline:
        raise RuntimeError(f"{self.name} did not start:\n{self.log.read_text()}")
      time.sleep(0.2)
    self.url = found.group(1)
    return self.url

  def stop(self) -> None:
    self.process.send_signal(signal.SIGTERM)
    try:
      self.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
      self.process.kill()


async def _load(url: str, lines: list[dict], expected: list[str], clients: int,
                duration_s: float) -> dict:
  """`clients` closed-loop clients taking the stream's lines in turn for `duration_s`."""
  next_line, latencies, wrong, failed = 0, [], 0, 0
  stop_at = time.monotonic() + duration_s

  async def client(session):
    nonlocal next_line, wrong, failed
    while time.monotonic() < stop_at:
      index = next_line % len(lines)
      next_line += 1
      sent = time.monotonic()
      async with session.post(url + "/v1/predict", json=lines[index]) as response:
        body = await response.json()
      latencies.append(time.monotonic() - sent)
      if response.status != 200:
        failed += 1
      elif (body["task"], body["inputs"], body["prediction"]) != (
          lines[index]["task"], lines[index]["inputs"], expected[index]):
        wrong += 1

  started = time.monotonic()
  connector = aiohttp.TCPConnector(limit=clients)
  async with aiohttp.ClientSession(connector=connector) as session:
    await asyncio.gather(*[client(session) for _ in range(clients)])
  elapsed = time.monotonic() - started
  return {"requests": len(latencies), "seconds": elapsed, "rps": len(latencies) / elapsed,
          "latencies": latencies, "wrong": wrong, "failed": failed}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="1 round of 4 s per measurement")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--duration_s", type=float, default=8.0, help="per measurement")
  parser.add_argument("--clients", default="1,8,64")
  parser.add_argument("--num_tasks", type=int, default=8)
  parser.add_argument("--prompt_length", type=int, default=20)
  parser.add_argument("--input_length", type=int, default=64)
  parser.add_argument("--target_length", type=int, default=16)
  # Each server at its best batch size on this CPU: the tiny model's decoding costs the same per
  # row from 8 to 64 rows (measured 1.2, 0.9, 1.7, 1.1 ms per row at 8, 16, 32, 64 rows of 32
  # tokens), so a larger batch only adds padding and waiting; PEFT's per-call overhead of
  # `generate` makes its larger batches pay.
  parser.add_argument("--max_batch", type=int, default=16, help="ours")
  parser.add_argument("--peft_max_batch", type=int, default=64)
  parser.add_argument("--max_wait_ms", type=float, default=5.0)
  parser.add_argument("--stream", type=int, default=512, help="distinct request lines")
  args = parser.parse_args(argv)
  if args.quick:
    args.rounds, args.duration_s = 1, 4.0
  clients = [int(c) for c in args.clients.split(",")]
  folder = pathlib.Path(tempfile.mkdtemp(prefix="bench_serving_"))
  npy, adapters = _prompts(folder, args.num_tasks, args.prompt_length)
  tasks = sorted(npy)
  mixed = _stream(args.stream, tasks)
  single = [{**line, "task": tasks[0]} for line in mixed]
  expected = _offline(mixed + single, npy, args, folder)
  streams = {"a_mixed": (mixed, expected[:len(mixed)]),
             "b_one_task_per_batch": (mixed, expected[:len(mixed)]),
             "c_peft": (mixed, expected[:len(mixed)]),
             "single_task": (single, expected[len(mixed):]),
             "mixed_same_prompt": (mixed, expected[len(mixed):])}

  ours = [sys.executable, "-m", "softprompt_jax", "serve", *_gin_args(npy),
          *_serve_args(args), "--port", "0"]
  servers = {
      "a_mixed": Process("a_mixed", ours, folder),
      "b_one_task_per_batch": Process("b_one_task_per_batch",
                                      ours + ["--gin.serve.mix_tasks=False"], folder),
      "mixed_same_prompt": Process("mixed_same_prompt", [
          *ours, f"--gin.PROMPTS={ {task: npy[tasks[0]] for task in tasks}!r}"], folder),
      "c_peft": Process("c_peft", [
          sys.executable, str(HERE / "bench_serving_peft.py"), "--model_dir",
          str(TINY_MODEL_DIR), "--adapters", json.dumps(adapters), "--port", "0",
          "--max_batch", str(args.peft_max_batch), "--max_wait_ms", str(args.max_wait_ms),
          "--input_length", str(args.input_length),
          "--target_length", str(args.target_length)], folder)}
  try:
    urls = {name: p.wait_ready() for name, p in servers.items()}
    urls["single_task"] = urls["a_mixed"]
    for name in CONTENDERS:  # warm-up: every padded shape is hit, nothing recorded
      asyncio.run(_load(urls[name], *streams[name], max(clients), 2.0))
    results = {(n, c): [] for n in CONTENDERS for c in clients}
    for round_index in range(args.rounds):
      for c in clients:
        for name in CONTENDERS:
          results[name, c].append(asyncio.run(_load(urls[name], *streams[name], c,
                                                    args.duration_s)))
          r = results[name, c][-1]
          print(f"round {round_index} clients {c:3d} {name:22s} {r['rps']:8.1f} req/s "
                f"wrong {r['wrong']} failed {r['failed']}", file=sys.stderr, flush=True)
  finally:
    for p in servers.values():
      p.stop()
  report = _report(results, clients, args)
  print(json.dumps(report))
  return 0


def _report(results: dict, clients: list[int], args) -> dict:
  rows = {}
  print(f"\n{'contender':22s} {'clients':>7s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} "
        f"{'checked':>8s} {'not equal':>9s}")
  for (name, c), runs in results.items():
    latencies = np.array([x for r in runs for x in r["latencies"]]) * 1000
    row = {"rps": statistics.median(r["rps"] for r in runs),
           "p50_ms": float(np.percentile(latencies, 50)),
           "p99_ms": float(np.percentile(latencies, 99)),
           "checked": sum(r["requests"] for r in runs),
           "not_equal_to_infer": sum(r["wrong"] for r in runs),
           "failed": sum(r["failed"] for r in runs)}
    rows[f"{name}@{c}"] = row
    print(f"{name:22s} {c:7d} {row['rps']:8.1f} {row['p50_ms']:8.1f} {row['p99_ms']:8.1f} "
          f"{row['checked']:8d} {row['not_equal_to_infer']:9d}")
  top = max(clients)
  ratios = {"a_over_c": rows[f"a_mixed@{top}"]["rps"] / rows[f"c_peft@{top}"]["rps"],
            "a_over_b": rows[f"a_mixed@{top}"]["rps"] / rows[f"b_one_task_per_batch@{top}"]["rps"],
            "a_over_single": rows[f"a_mixed@{top}"]["rps"] / rows[f"single_task@{top}"]["rps"],
            "same_prompt_over_single": (rows[f"mixed_same_prompt@{top}"]["rps"]
                                        / rows[f"single_task@{top}"]["rps"])}
  ours_exact = all(rows[f"{n}@{c}"]["not_equal_to_infer"] == 0 for n in CONTENDERS
                   if n != "c_peft" for c in clients)
  print(f"\nat {top} clients: (a)/(c) = {ratios['a_over_c']:.2f} (goal >= 3), (a)/(b) = "
        f"{ratios['a_over_b']:.2f}, (a)/single-task = {ratios['a_over_single']:.2f}, mixed with "
        f"task 0's prompt / single-task = {ratios['same_prompt_over_single']:.2f} (goal >= 0.9); "
        f"served predictions equal offline infer: {ours_exact}")
  return {"rows": rows, "ratios": ratios, "served_equal_infer": ours_exact,
          "settings": vars(args), "machine": {"cpu": cpu_model(), "cores": os.cpu_count()}}


if __name__ == "__main__":
  sys.exit(main())
