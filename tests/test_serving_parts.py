"""The server's parts without a model or a socket: the cross-task batcher, the prompt bank, the
request parser (fuzzed), and the runner's padded shapes and bank copies."""

import asyncio
import gc
import json
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softprompt_jax.prompted_t5 import get_prompt
from softprompt_jax.serving import request_bodies
from softprompt_jax.serving.batcher import Batcher, Example, QueueFull
from softprompt_jax.serving.model_runner import ModelRunner, length_buckets
from softprompt_jax.serving.prompt_bank import BankError, PromptBank
from softprompt_jax.serving.request_bodies import Limits, RequestError
from softprompt_jax.serving.serve_metrics import ServeMetrics
from softprompt_jax.data import get_task
from softprompt_jax.tokenizers import get_vocabulary

SENTIMENT = "taskless_synthetic_sentiment"


class Recorder:
  """A model stand-in: records each batch's (kind, tasks) and answers each example with its
  task and tokens."""

  def __init__(self, fail_first: bool = False):
    self.batches, self.fail_first = [], fail_first

  def prepare(self, batch):
    self.batches.append((batch[0].kind, [e.task for e in batch]))
    if self.fail_first and len(self.batches) == 1:
      def broken():
        raise RuntimeError("device lost")
      return broken
    return lambda: [(e.task, e.tokens) for e in batch]


def _examples(loop, tasks, kind="predict"):
  return [Example(kind, task, [i], loop.create_future()) for i, task in enumerate(tasks)]


async def _serve(batcher, groups, *, between=0.0):
  """Submits each group of examples (pausing `between` s), then stops; returns the results."""
  running = asyncio.create_task(batcher.run())
  futures = []
  for group in groups:
    batcher.submit(group)
    futures += [e.future for e in group]
    await asyncio.sleep(between)
  batcher.stop()
  results = await asyncio.gather(*futures, return_exceptions=True)
  await running
  return results


def test_a_batch_mixes_tasks_up_to_max_batch_and_every_example_gets_its_own_answer():
  async def scenario():
    loop = asyncio.get_running_loop()
    model = Recorder()
    batcher = Batcher(model.prepare, max_batch=4, max_wait_s=0.05, max_queue=100)
    examples = _examples(loop, ["a", "b", "c", "a", "b", "c", "a"])
    results = await _serve(batcher, [examples])
    return model, examples, results
  model, examples, results = asyncio.run(scenario())
  assert results == [(e.task, e.tokens) for e in examples]
  assert [len(tasks) for _, tasks in model.batches] == [4, 3]
  assert model.batches[0][1] == ["a", "b", "c", "a"]  # oldest first, tasks mixed


def test_one_task_per_batch_and_one_kind_per_batch_when_asked():
  async def scenario():
    loop = asyncio.get_running_loop()
    model = Recorder()
    batcher = Batcher(model.prepare, max_batch=8, max_wait_s=0.01, max_queue=100,
                      mix_tasks=False)
    examples = _examples(loop, ["a", "b", "a", "b"]) + _examples(loop, ["a", "a"], "score")
    results = await _serve(batcher, [examples])
    return model, examples, results
  model, examples, results = asyncio.run(scenario())
  assert results == [(e.task, e.tokens) for e in examples]
  assert model.batches == [("predict", ["a", "a"]), ("predict", ["b", "b"]),
                           ("score", ["a", "a"])]


def test_a_full_queue_refuses_the_whole_request_and_keeps_what_it_holds():
  async def scenario():
    loop = asyncio.get_running_loop()
    batcher = Batcher(Recorder().prepare, max_batch=8, max_wait_s=10, max_queue=3)
    batcher.submit(_examples(loop, ["a", "b"]))
    with pytest.raises(QueueFull):
      batcher.submit(_examples(loop, ["a", "b"]))
    return batcher.depth
  assert asyncio.run(scenario()) == 2


def test_cancelled_examples_are_not_run_and_a_failed_batch_fails_only_its_examples():
  async def scenario():
    loop = asyncio.get_running_loop()
    model = Recorder(fail_first=True)
    batcher = Batcher(model.prepare, max_batch=2, max_wait_s=0.01, max_queue=100)
    first, second = _examples(loop, ["a", "b"]), _examples(loop, ["x", "y", "z"])
    second[1].future.cancel()  # a request that timed out
    results = await _serve(batcher, [first, second])
    return model, results
  model, results = asyncio.run(scenario())
  assert [type(r).__name__ for r in results[:2]] == ["RuntimeError", "RuntimeError"]
  assert results[2] == ("x", [0]) and results[4] == ("z", [2])
  assert [tasks for _, tasks in model.batches] == [["a", "b"], ["x", "z"]]


def test_stop_answers_everything_queued_before_it():
  async def scenario():
    loop = asyncio.get_running_loop()
    model = Recorder()
    batcher = Batcher(model.prepare, max_batch=64, max_wait_s=30, max_queue=100)
    examples = _examples(loop, ["a"] * 5)
    # With a 30 s wait the batch would not form; stop() makes it form at once.
    return await asyncio.wait_for(_serve(batcher, [examples]), 5)
  assert len(asyncio.run(scenario())) == 5


def test_removing_a_task_answers_its_waiting_examples_with_the_error():
  async def scenario():
    loop = asyncio.get_running_loop()
    batcher = Batcher(Recorder().prepare, max_batch=8, max_wait_s=30, max_queue=100)
    examples = _examples(loop, ["a", "gone", "a"])
    batcher.submit(examples)
    batcher.fail(lambda e: e.task == "gone", BankError("removed", 404))
    assert examples[1].future.done() and batcher.depth == 2
    running = asyncio.create_task(batcher.run())
    batcher.stop()
    await running
    return [e.future.result() for e in (examples[0], examples[2])]
  assert asyncio.run(scenario()) == [("a", [0]), ("a", [2])]


def test_the_bank_reuses_freed_slots_and_refuses_taken_names_full_banks_and_other_shapes():
  bank = PromptBank(2, (3, 4))
  assert bank.add("a", np.ones((3, 4)), "a.npy") == 0
  assert bank.add("b", np.full((3, 4), 2.0), "b.npy") == 1
  for name, values, status in (("a", np.ones((3, 4)), 409), ("c", np.ones((3, 4)), 409)):
    with pytest.raises(BankError) as error:
      bank.add(name, values, "x.npy")
    assert error.value.status == status
  bank.remove("a")
  with pytest.raises(BankError) as error:
    bank.add("c", np.ones((2, 4)), "short.npy")
  assert error.value.status == 400 and "(2, 4)" in str(error.value)
  assert bank.add("c", np.full((3, 4), 5.0), "c.npy") == 0
  assert [t["name"] for t in bank.describe()] == ["b", "c"]
  assert np.all(bank.values[0] == 5.0) and np.all(bank.values[1] == 2.0)
  with pytest.raises(BankError) as error:
    bank.remove("a")
  assert error.value.status == 404


def test_the_runner_copies_the_bank_when_it_changed_and_pads_to_the_smallest_shape():
  bank = PromptBank(2, (1, 2))
  bank.add("a", np.ones((1, 2)), "a.npy")
  runner = ModelRunner(None, {"frozen": 0}, bank, get_vocabulary("byte"), batch_sizes=(8, 1),
                       lengths=length_buckets((16, 128), 64), target_length=4, max_labels=2)
  assert runner.lengths == (16, 64)
  first = runner.params()
  assert runner.params() is first  # unchanged bank: no copy
  bank.add("b", np.full((1, 2), 3.0), "b.npy")
  second = runner.params()
  bank.values[1] = 7.0  # the bank's own buffer; the batch's copy must not move
  assert np.all(np.asarray(get_prompt(second))[1] == 3.0)
  assert np.all(np.asarray(get_prompt(first))[1] == 0.0)
  assert runner.padded_shape(1, 16) == (1, 16)
  assert runner.padded_shape(2, 17) == (8, 64)


# ----------------------------------------------------------------------------------------------
# The request parser, fuzzed: any body gives checked examples or a 4xx RequestError.

LIMITS = Limits(input_length=32, target_length=12, max_labels=3, max_instances=4)
NAMES = ["a", SENTIMENT]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=5),
    max_leaves=20)
ROW = st.fixed_dictionaries(
    {"task": st.sampled_from(NAMES + ["b", 1])},
    optional={"inputs": st.text(max_size=40) | st.integers(),
              "record": st.fixed_dictionaries({"text": st.text(max_size=20)}) | JSON,
              "labels": st.lists(st.text(max_size=12), max_size=4) | JSON})
BODY = (ROW | st.fixed_dictionaries({"instances": st.lists(ROW, max_size=6) | JSON}) | JSON)


def _parse(raw: bytes, kind: str):
  body = request_bodies.parse_json(raw)
  return request_bodies.instances(body, kind=kind, names=NAMES, get_task=get_task,
                                  vocabulary=get_vocabulary("byte"), limits=LIMITS)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=BODY, kind=st.sampled_from(["predict", "score"]))
def test_any_json_body_is_checked_examples_or_a_4xx_naming_what_is_wrong(body, kind):
  raw = json.dumps(body).encode()
  try:
    checked, is_list = _parse(raw, kind)
  except RequestError as e:
    assert e.status in (400, 404) and str(e)
    return
  rows = body["instances"] if is_list else [body]
  assert [c.row["task"] for c in checked] == [r["task"] for r in rows]
  for c in checked:
    assert c.tokens[-1] == 1 and len(c.tokens) <= LIMITS.input_length
    if kind == "score":
      assert c.label_ids.shape == (len(c.labels), LIMITS.target_length)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=64))
def test_any_bytes_are_json_or_a_400(raw):
  try:
    request_bodies.parse_json(raw)
  except RequestError as e:
    assert e.status == 400 and str(e)


def test_a_record_becomes_the_tasks_inputs_and_scores_default_to_the_tasks_labels():
  checked, is_list = _parse(json.dumps(
      {"instances": [{"task": SENTIMENT, "record": {"text": "good day"}}]}).encode(), "score")
  assert is_list and checked[0].row["inputs"] == "good day"
  assert checked[0].labels == ("negative", "positive")


def _compilations(metrics: ServeMetrics) -> float:
  return metrics.registry.get_sample_value("softprompt_xla_compilations_total")


def test_every_live_server_counts_each_program_built_and_a_dropped_one_stops_listening(
    compilation_cache):
  first, second = ServeMetrics(), ServeMetrics()
  cached_before = set(compilation_cache.iterdir())
  double, x = jax.jit(lambda x: x * 3 + 1), jnp.arange(5)
  min_compile_s = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  try:
    double(x).block_until_ready()  # a program not seen before: compiled
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_s)
  assert any(f.name.startswith("jit__lambda") for f in set(compilation_cache.iterdir())
             - cached_before)
  assert _compilations(first) == _compilations(second) >= 1
  counted = _compilations(first)
  dropped = weakref.ref(second)
  del second
  gc.collect()
  assert dropped() is None  # the listener holds no server's metrics alive
  # The same program again after the in-memory caches are gone: read from the session's
  # persistent compilation cache (conftest; this one is cached however quick), and still counted.
  jax.clear_caches()
  double(x).block_until_ready()
  assert _compilations(first) == counted + 1
