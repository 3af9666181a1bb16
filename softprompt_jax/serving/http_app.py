"""The HTTP face of the server (aiohttp): routes, JSON errors, timeouts, back-pressure, metrics,
and the drain on SIGTERM. The model work is the batcher's and the model runner's."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
import traceback
from typing import Callable

import numpy as np
from aiohttp import web

from softprompt_jax.data import get_task
from softprompt_jax.errors import is_user_error, one_line
from softprompt_jax.serving import request_bodies
from softprompt_jax.serving.batcher import Batcher, Example, QueueFull
from softprompt_jax.serving.model_runner import ModelRunner
from softprompt_jax.serving.prompt_bank import BankError
from softprompt_jax.serving.request_bodies import Limits, RequestError
from softprompt_jax.serving.serve_metrics import ServeMetrics

# Seconds a refused client is told to wait (about one batch's time at these sizes).
RETRY_AFTER_S = 1


def _error(status: int, message: str, **headers) -> web.Response:
  return web.json_response({"error": message}, status=status, headers=headers or None)


class Server:
  """Requests in, examples to the batcher, answers out. `load_prompt(name, source)` reads a
  prompt for POST /v1/tasks (on a thread: it may read a checkpoint)."""

  def __init__(self, runner: ModelRunner, *, load_prompt: Callable[[str, str], np.ndarray],
               limits: Limits, max_wait_s: float, max_queue: int, request_timeout_s: float,
               mix_tasks: bool = True, max_body_bytes: int = 1 << 20):
    self.runner, self.bank, self.limits = runner, runner.bank, limits
    self._load_prompt, self.request_timeout_s = load_prompt, request_timeout_s
    self.metrics = ServeMetrics()
    self.batcher = Batcher(self._prepare, max_batch=runner.max_batch, max_wait_s=max_wait_s,
                           max_queue=max_queue, mix_tasks=mix_tasks,
                           on_batch=self.metrics.batch_done)
    self.draining = False
    self.in_flight = 0
    self.max_body_bytes = max_body_bytes
    self.app = web.Application(middlewares=[self._middleware], client_max_size=max_body_bytes)
    self.app.add_routes([
        web.get("/healthz", self._healthz), web.get("/metrics", self._metrics),
        web.post("/v1/predict", self._predict), web.post("/v1/score", self._score),
        web.get("/v1/tasks", self._tasks), web.post("/v1/tasks", self._add_task),
        web.delete("/v1/tasks/{name}", self._remove_task)])
    self.metrics.tasks.set(len(self.bank.names))

  # -- the batcher's side: runs on the event loop as a batch is formed --------------------------

  def _prepare(self, batch: list[Example]):
    params = self.runner.params()
    slots = [self.bank.slot(e.task) for e in batch]
    tokens = [e.tokens for e in batch]
    self.metrics.queue_depth.set(self.batcher.depth)
    if batch[0].kind == "score":
      label_ids = [e.label_ids for e in batch]
      return lambda: self.runner.score(params, slots, tokens, label_ids)
    return lambda: self.runner.predict(params, slots, tokens)

  # -- requests ---------------------------------------------------------------------------------

  @web.middleware
  async def _middleware(self, request: web.Request, handler) -> web.StreamResponse:
    started = time.monotonic()
    route = request.match_info.route.resource
    endpoint = route.canonical if route is not None else "other"
    self.in_flight += 1
    try:
      if self.draining and endpoint != "/metrics":
        response = _error(503, "the server is shutting down; send the request to another "
                          "replica or retry after it restarts", Connection="close")
      else:
        response = await handler(request)
    except (RequestError, BankError) as e:
      response = _error(e.status, str(e))
    except web.HTTPRequestEntityTooLarge:
      response = _error(413, f"the body is larger than {self.max_body_bytes} bytes "
                        "(serve.max_body_bytes); send fewer instances per request")
    except web.HTTPException as e:  # no such route (404), wrong method (405)
      response = _error(e.status, f"{request.method} {request.path}: {e.reason}; the API is "
                        "GET /healthz, /metrics, /v1/tasks; POST /v1/predict, /v1/score, "
                        "/v1/tasks; DELETE /v1/tasks/NAME")
    except Exception as e:  # a bug: say so, keep serving
      traceback.print_exc()
      response = _error(500, f"internal error: {one_line(e)}")
    finally:
      self.in_flight -= 1
    self.metrics.requests.labels(endpoint, str(response.status)).inc()
    self.metrics.latency.labels(endpoint).observe(time.monotonic() - started)
    return response

  async def _healthz(self, request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "tasks": self.bank.names})

  async def _metrics(self, request: web.Request) -> web.Response:
    self.metrics.queue_depth.set(self.batcher.depth)
    return web.Response(body=self.metrics.text(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

  async def _predict(self, request: web.Request) -> web.Response:
    return await self._examples(request, "predict")

  async def _score(self, request: web.Request) -> web.Response:
    return await self._examples(request, "score")

  async def _examples(self, request: web.Request, kind: str) -> web.Response:
    body = request_bodies.parse_json(await request.read())
    checked, is_list = request_bodies.instances(
        body, kind=kind, names=self.bank.names, get_task=get_task,
        vocabulary=self.runner.vocabulary, limits=self.limits)
    loop = asyncio.get_running_loop()
    examples = [Example(kind, i.row["task"], i.tokens, loop.create_future(), i.label_ids)
                for i in checked]
    try:
      self.batcher.submit(examples)
    except QueueFull as e:
      return _error(429, f"{e}; retry after {RETRY_AFTER_S} s", **{
          "Retry-After": str(RETRY_AFTER_S)})
    self.metrics.queue_depth.set(self.batcher.depth)
    futures = [e.future for e in examples]
    try:
      results = await asyncio.wait_for(asyncio.gather(*futures), self.request_timeout_s)
    except asyncio.TimeoutError:  # wait_for cancelled the examples: the batcher skips them
      return _error(504, f"no answer within {self.request_timeout_s} s "
                    "(serve.request_timeout_s); the server is overloaded: retry later")
    answers = [_answer(kind, i, r) for i, r in zip(checked, results)]
    return web.json_response(answers if is_list else answers[0])

  async def _tasks(self, request: web.Request) -> web.Response:
    return web.json_response({"tasks": self.bank.describe(), "capacity": self.bank.capacity,
                              "prompt_shape": list(self.bank.prompt_shape)})

  async def _add_task(self, request: web.Request) -> web.Response:
    name, source = request_bodies.task_to_add(request_bodies.parse_json(await request.read()))
    self.bank.free_slot(name)  # a taken name or a full bank fails before any reading
    loop = asyncio.get_running_loop()
    try:
      values = await loop.run_in_executor(None, self._load_prompt, name, source)
    except Exception as e:
      if not is_user_error(e):
        raise
      raise RequestError(400, f"field 'prompt': {one_line(e)}") from None
    slot = self.bank.add(name, values, source)  # on the event loop, between batches
    self.metrics.tasks.set(len(self.bank.names))
    return web.json_response({"name": name, "prompt": source, "slot": slot}, status=201)

  async def _remove_task(self, request: web.Request) -> web.Response:
    name = request.match_info["name"]
    self.bank.remove(name)
    gone = BankError(f"task {name!r} was removed from the prompt bank before this request "
                     "ran", 404)
    self.batcher.fail(lambda e: e.task == name, gone)
    self.metrics.tasks.set(len(self.bank.names))
    return web.json_response({"removed": name})


def _answer(kind: str, instance: request_bodies.Instance, result) -> dict:
  """What `infer` writes for the example's line; a score adds each label's log-likelihood."""
  answer = {"task": instance.row["task"], "inputs": instance.row["inputs"]}
  if kind == "predict":
    return {**answer, "prediction": result}
  scores = {label: float(s) for label, s in zip(instance.labels, result)}
  return {**answer, "prediction": instance.labels[int(np.argmax(result))], "scores": scores}


async def serve_until_signal(server: Server, host: str, port: int, drain_timeout_s: float,
                             on_ready: Callable[[str], None]) -> int:
  """Serves until SIGTERM or SIGINT, then drains: stops accepting, answers what is in flight
  (up to `drain_timeout_s`), stops. Returns the signal's number."""
  loop = asyncio.get_running_loop()
  runner = web.AppRunner(server.app, handle_signals=False, shutdown_timeout=drain_timeout_s,
                         access_log=None)
  await runner.setup()
  await web.TCPSite(runner, host, port).start()
  batching = asyncio.create_task(server.batcher.run())
  received = asyncio.Queue()
  for number in (signal.SIGTERM, signal.SIGINT):
    loop.add_signal_handler(number, received.put_nowait, number)
  bound_host, bound_port = runner.addresses[0][:2]
  on_ready(f"http://{bound_host}:{bound_port}")
  number = await received.get()
  waiting = server.in_flight
  print(f"softprompt-jax serve: {signal.Signals(number).name}: no new requests; answering the "
        f"{waiting} in flight", file=sys.stderr, flush=True)
  server.draining = True
  await runner.cleanup()  # closes the socket, then waits for the requests being handled
  server.batcher.stop()
  await batching
  for number_ in (signal.SIGTERM, signal.SIGINT):
    loop.remove_signal_handler(number_)
  return number
