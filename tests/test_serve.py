"""`softprompt-jax serve`, end to end: the real command in a subprocess on 127.0.0.1 with the tiny
model and two prompts (a .npy and a PEFT adapter). Concurrent mixed-task requests get exactly
what offline `infer` writes for the same lines; bad requests get 4xx JSON errors naming the
field; tasks come and go without a compilation; an overloaded server answers 429 and 504; and
SIGTERM answers what is in flight, then exits 0."""

import asyncio
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import aiohttp
import numpy as np
import pytest

from softprompt_jax.cli import main
from softprompt_jax.peft_interop import save_peft_adapter

SENTIMENT, SORT = "taskless_synthetic_sentiment", "taskless_synthetic_sort"
TINY = ["--gin_file", "models/tiny.gin"]
SHAPES = ["--gin.serve.input_length=64", "--gin.serve.target_length=10",
          "--gin.serve.length_buckets=(16,)", "--gin.serve.batch_sizes=(1, 8)"]
WORDS = "apple bird boat bread car cat chair cloud coat dog door field fish good sad".split()


def _lines(count: int) -> list[dict]:
  """Request lines of both tasks, text and raw records, of lengths across both buckets."""
  rng = np.random.default_rng(0)
  lines = []
  for i in range(count):
    text = " ".join(rng.choice(WORDS, size=1 + i % 9))
    task = (SENTIMENT, SORT)[i % 2]
    lines.append({"task": task, "record": {"text": text}} if i % 5 == 0
                 else {"task": task, "inputs": text})
  return lines


@pytest.fixture(scope="module")
def bank(tmp_path_factory) -> dict:
  folder = tmp_path_factory.mktemp("prompts")
  rng = np.random.default_rng(1)
  np.save(folder / "sentiment.npy", rng.uniform(-0.5, 0.5, (4, 32)).astype(np.float32))
  save_peft_adapter(folder / "sort_adapter", rng.uniform(-0.5, 0.5, (4, 32)).astype(np.float32),
                    num_layers=2, num_heads=4)
  return {SENTIMENT: str(folder / "sentiment.npy"), SORT: str(folder / "sort_adapter")}


class Served:
  """A `softprompt-jax serve` process: its URL, log and exit."""

  def __init__(self, folder: pathlib.Path, prompts: dict, *bindings: str):
    self.log = folder / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device is enough
    with open(self.log, "wb") as log:
      self.process = subprocess.Popen(
          [sys.executable, "-m", "softprompt_jax", "serve", *TINY, "--gin_file",
           "runs/prompt_serve.gin", f"--gin.PROMPTS={prompts!r}", *SHAPES, *bindings,
           "--port", "0"], stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 240
    while not (found := re.search(r"on (http://127\.0\.0\.1:\d+)", self.text())):
      assert self.process.poll() is None, self.text()
      assert time.monotonic() < deadline, self.text()
      time.sleep(0.2)
    self.url = found.group(1)

  def text(self) -> str:
    return self.log.read_text(errors="replace")

  def stop(self) -> int:
    if self.process.poll() is None:
      self.process.send_signal(signal.SIGTERM)
    try:
      return self.process.wait(timeout=60)
    finally:
      if self.process.poll() is None:
        self.process.kill()


@pytest.fixture(scope="module")
def served(tmp_path_factory, bank):
  server = Served(tmp_path_factory.mktemp("serve"), bank, "--gin.serve.max_wait_ms=50")
  yield server
  server.stop()


async def _call(session, method: str, url: str, body=None, raw: bytes = None):
  data = raw if raw is not None else None if body is None else json.dumps(body)
  async with session.request(method, url, data=data) as response:
    text = await response.text()
    return response.status, json.loads(text) if "json" in response.content_type else text, \
        response.headers


def _run(coroutine):
  return asyncio.run(coroutine)


async def _many(url: str, requests: list[tuple[str, str, object]]):
  async with aiohttp.ClientSession() as session:
    return await asyncio.gather(*[_call(session, m, url + path, body)
                                  for m, path, body in requests])


def _metric(served: Served, name: str) -> float:
  text = _run(_many(served.url, [("GET", "/metrics", None)]))[0][1]
  return sum(float(line.split()[-1]) for line in text.splitlines()
             if line.startswith(name + " ") or line.startswith(name + "{"))


def _infer(tmp_path, bank, lines) -> list[dict]:
  (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
  assert main(["infer", *TINY, "--gin_file", "runs/prompt_infer.gin", f"--gin.PROMPTS={bank!r}",
               f"--gin.INPUT_FILE='{tmp_path / 'in.jsonl'}'",
               f"--gin.OUTPUT_FILE='{tmp_path / 'out.jsonl'}'", "--gin.infer.input_length=64",
               "--gin.infer.target_length=10", "--gin.BATCH_SIZE=8"]) == 0
  return [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]


def test_concurrent_mixed_task_requests_get_exactly_infers_predictions(served, bank, tmp_path):
  lines = _lines(64)
  expected = _infer(tmp_path, bank, lines)
  assert {e["task"] for e in expected} == {SENTIMENT, SORT}
  # 48 single requests and 2 lists of 8, all at once.
  requests = [("POST", "/v1/predict", line) for line in lines[:48]]
  requests += [("POST", "/v1/predict", {"instances": lines[48:56]}),
               ("POST", "/v1/predict", {"instances": lines[56:]})]
  answers = _run(_many(served.url, requests))
  assert all(status == 200 for status, _, _ in answers), answers
  got = [body for _, body, _ in answers[:48]] + answers[48][1] + answers[49][1]
  assert got == expected  # each answer is its own line: none lost, none swapped
  assert len({e["prediction"] for e in expected}) > 4  # the comparison can tell rows apart
  # Batches held both tasks at once: more distinct tasks than batches, summed.
  assert _metric(served, "softprompt_batch_tasks_sum") > _metric(served,
                                                                 "softprompt_batch_tasks_count")


def test_score_ranks_the_tasks_labels_as_eval_does(served):
  line = {"task": SENTIMENT, "inputs": "good happy"}
  status, body, _ = _run(_many(served.url, [("POST", "/v1/score", line)]))[0]
  assert status == 200, body
  assert set(body["scores"]) == {"negative", "positive"}
  assert body["prediction"] == max(body["scores"], key=body["scores"].get)
  assert all(s < 0 for s in body["scores"].values())
  given = {"task": SORT, "inputs": "b a", "labels": ["a b", "b a", "x"]}
  status, body, _ = _run(_many(served.url, [("POST", "/v1/score", given)]))[0]
  assert status == 200 and list(body["scores"]) == ["a b", "b a", "x"], body


BAD = [
    ("POST", "/v1/predict", b"{not json", 400, "malformed JSON"),
    ("POST", "/v1/predict", b"\xff\xfe", 400, "not UTF-8"),
    ("POST", "/v1/predict", b"", 400, "empty"),
    ("POST", "/v1/predict", b"[1, 2]", 400, "must be a JSON object"),
    ("POST", "/v1/predict", b'{"inputs": "x"}', 400, "needs field 'task'"),
    ("POST", "/v1/predict", b'{"task": 3, "inputs": "x"}', 400, "field 'task' must be a string"),
    ("POST", "/v1/predict", b'{"task": "nope", "inputs": "x"}', 404, "field 'task' is 'nope'"),
    ("POST", "/v1/predict", f'{{"task": "{SORT}"}}'.encode(), 400, "needs field 'inputs'"),
    ("POST", "/v1/predict", f'{{"task": "{SORT}", "inputs": 5}}'.encode(), 400,
     "field 'inputs' must be a string"),
    ("POST", "/v1/predict", f'{{"task": "{SORT}", "inputs": "{"w " * 40}"}}'.encode(), 400,
     "field 'inputs' is 81 tokens"),
    ("POST", "/v1/predict", f'{{"task": "{SORT}", "task": "x", "inputs": ""}}'.encode(), 400,
     "'task' appears twice"),
    ("POST", "/v1/predict", b'{"instances": []}', 400, "field 'instances' has 0"),
    ("POST", "/v1/predict", f'{{"instances": [{{"task": "{SORT}"}}]}}'.encode(), 400,
     "instances[0]: needs field 'inputs'"),
    ("POST", "/v1/predict", f'{{"task": "{SENTIMENT}", "record": {{"txt": "a"}}}}'.encode(), 400,
     "field 'record'"),
    ("POST", "/v1/score", f'{{"task": "{SORT}", "inputs": "a"}}'.encode(), 400,
     "needs field 'labels'"),
    ("POST", "/v1/score", f'{{"task": "{SORT}", "inputs": "a", "labels": ["{"y" * 11}"]}}'
     .encode(), 400, "label 'yyyyyyyyyyy' is 12 tokens"),
    ("POST", "/v1/tasks", b'{"name": "x"}', 400, "needs field 'prompt'"),
    ("POST", "/v1/tasks", b'{"name": "x", "prompt": "/no/such.npy"}', 400, "field 'prompt'"),
    ("POST", "/v1/tasks", f'{{"name": "{SORT}", "prompt": "x.npy"}}'.encode(), 409,
     "already served"),
    ("DELETE", "/v1/tasks/nope", b"", 404, "'nope' is not served"),
    ("GET", "/v1/predict", b"", 405, "the API is"),
    ("GET", "/v2/nothing", b"", 404, "the API is"),
    ("POST", "/v1/predict", b" " * (2 << 20), 413, "serve.max_body_bytes"),
]


def test_bad_requests_get_json_errors_that_name_the_field(served):
  async def send():
    async with aiohttp.ClientSession() as session:
      return await asyncio.gather(*[_call(session, m, served.url + p, raw=raw)
                                    for m, p, raw, _, _ in BAD])
  for (method, path, raw, status, words), (got, body, _) in zip(BAD, _run(send())):
    assert got == status and words in body["error"], (method, path, raw[:80], got, body)
    assert set(body) == {"error"}


def test_tasks_are_added_and_removed_without_a_compilation(served, bank):
  line = {"task": "again", "inputs": "cat dog"}
  before = _metric(served, "softprompt_xla_compilations_total")
  first = _run(_many(served.url, [("POST", "/v1/predict", {**line, "task": SORT})]))[0][1]
  calls = [("DELETE", f"/v1/tasks/{SORT}", None), ("GET", "/v1/tasks", None),
           ("POST", "/v1/predict", {**line, "task": SORT}),
           ("POST", "/v1/tasks", {"name": "again", "prompt": bank[SORT]}),
           ("POST", "/v1/predict", line), ("GET", "/v1/tasks", None)]
  got = [_run(_many(served.url, [call]))[0] for call in calls]
  assert got[0][0] == 200 and [t["name"] for t in got[1][1]["tasks"]] == [SENTIMENT]
  assert got[2][0] == 404
  assert got[3][0] == 201 and got[4][0] == 200
  assert got[4][1]["prediction"] == first["prediction"]  # the same prompt, another slot name
  assert {t["name"] for t in got[5][1]["tasks"]} == {SENTIMENT, "again"}
  assert _metric(served, "softprompt_xla_compilations_total") == before
  # Put the bank back as the other tests expect it.
  assert _run(_many(served.url, [("DELETE", "/v1/tasks/again", None),
                                 ("POST", "/v1/tasks", {"name": SORT, "prompt": bank[SORT]})]))


def test_sigterm_answers_what_is_in_flight_then_exits_0(tmp_path, bank):
  server = Served(tmp_path, bank, "--gin.serve.max_wait_ms=1500")
  lines = _lines(3)

  async def scenario():
    async with aiohttp.ClientSession() as session:
      calls = [asyncio.create_task(_call(session, "POST", server.url + "/v1/predict", line))
               for line in lines]
      deadline = time.monotonic() + 20
      while _metric_async_depth(await _call(session, "GET", server.url + "/metrics")) < 3:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
      server.process.send_signal(signal.SIGTERM)  # the three wait for their batch
      return await asyncio.gather(*calls)

  answers = _run(scenario())
  assert [status for status, _, _ in answers] == [200, 200, 200], answers
  assert [body["inputs"] for _, body, _ in answers] == [
      line.get("inputs", line.get("record", {}).get("text")) for line in lines]
  assert server.process.wait(timeout=30) == 0, server.text()
  assert "answering the 3 in flight" in server.text()
  with pytest.raises(aiohttp.ClientConnectionError):
    _run(_many(server.url, [("GET", "/healthz", None)]))


def _metric_async_depth(call) -> float:
  text = call[1]
  return float(re.search(r"^softprompt_queue_depth (\S+)$", text, re.M).group(1))


def test_overload_is_429_with_retry_after_and_a_slow_answer_504(tmp_path, bank):
  server = Served(tmp_path, bank, "--gin.serve.max_queue=2", "--gin.serve.max_instances=2",
                  "--gin.serve.max_wait_ms=5000",
                  "--gin.serve.request_timeout_s=1.0", "--gin.serve.batch_sizes=(8,)")
  try:
    lines = [("POST", "/v1/predict", line) for line in _lines(6)]
    answers = _run(_many(server.url, lines))
    statuses = sorted(status for status, _, _ in answers)
    assert statuses == [429] * 4 + [504] * 2, answers
    for status, body, headers in answers:
      assert body["error"]
      if status == 429:
        assert int(headers["Retry-After"]) >= 1
    # The timed-out examples left the queue: it takes requests again.
    assert _run(_many(server.url, [("GET", "/metrics", None)]))[0][0] == 200
  finally:
    assert server.stop() == 0, server.text()


@pytest.mark.parametrize("binding, words", [
    ("--gin.serve.port=70000", "serve.port=70000: expected an integer"),
    ("--gin.serve.max_instances=5000", "could never be queued"),
    ("--gin.serve.batch_sizes=(0,)", "serve.batch_sizes"),
    ("--gin.PROMPTS={'a': '/no/such.npy'}", "/no/such.npy"),
])
def test_a_bad_setting_is_one_line_before_the_model_is_loaded(binding, words, bank, capsys,
                                                              no_expensive_work):
  args = ["serve", *TINY, "--gin_file", "runs/prompt_serve.gin", f"--gin.PROMPTS={bank!r}",
          binding]
  assert main(args) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("softprompt-jax serve: error: ") and words in err[0]
