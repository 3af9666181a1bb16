"""`softprompt-jax serve`: one frozen T5 answering requests of many tasks over HTTP, examples of
different tasks in one batch, each with its task's prompt. Configured like `infer` (gin,
PROMPTS); bound as the gin configurable `serve`."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Mapping, Sequence

import jax

from softprompt_jax import config_checks as cc
from softprompt_jax.errors import ConfigError
from softprompt_jax.inference import bank_prompts
from softprompt_jax.model_spec import ModelSpec, load_frozen
from softprompt_jax.prompted_t5 import PromptedT5
from softprompt_jax.run_setup import check_vocabulary_fits, load_vocabulary, model_config
from softprompt_jax.serving.http_app import Server, serve_until_signal
from softprompt_jax.serving import model_runner
from softprompt_jax.serving.prompt_bank import PromptBank
from softprompt_jax.serving.request_bodies import Limits

# The command line's entry: (name, summary, description, examples), as cli lists its commands.
COMMAND = (
    "serve", "serve a bank of prompts over HTTP, tasks mixed in one batch",
    "Serve one frozen T5 with a prompt per task (PROMPTS: task name -> run directory, .npy or "
    "PEFT adapter) over HTTP: POST /v1/predict and /v1/score, GET/POST /v1/tasks, DELETE "
    "/v1/tasks/NAME, GET /healthz and /metrics (Prometheus). A batcher puts requests of any "
    "task into one batch, padded to a few shapes that are compiled before the server listens. "
    "SIGTERM stops accepting, answers what is in flight, and exits 0.",
    ["--gin_file models/tiny.gin --gin_file runs/prompt_serve.gin "
     "--gin.PROMPTS=\"{'sentiment': '/tmp/smoke'}\" --port 8000"])

SERVE_RULES = {
    "model": cc.instance(ModelSpec, "@frozen_model()"), "prompts": cc.string_mapping(),
    "vocabulary": cc.text(optional=True), "host": cc.text(), "port": cc.integer(0, 65535),
    "input_length": cc.POSITIVE, "target_length": cc.POSITIVE,
    "batch_sizes": cc.integers(1), "length_buckets": cc.integers(1),
    "max_wait_ms": cc.number(0), "max_queue": cc.POSITIVE,
    "request_timeout_s": cc.number(0, low_open=True),
    "max_tasks": cc.POSITIVE, "max_labels": cc.POSITIVE, "mix_tasks": cc.boolean(),
    "drain_timeout_s": cc.number(0), "max_body_bytes": cc.integer(1024),
    "max_instances": cc.POSITIVE,
}


def serve(*, model: ModelSpec, prompts: Mapping[str, str], vocabulary=None,
          host: str = "127.0.0.1", port: int = 8000, input_length: int = 512,
          target_length: int = 8, batch_sizes: Sequence[int] = (1, 8, 32),
          length_buckets: Sequence[int] = (64, 128, 256), max_wait_ms: float = 5.0,
          max_queue: int = 1024, request_timeout_s: float = 30.0, max_tasks: int = 16,
          max_labels: int = 8, mix_tasks: bool = True, drain_timeout_s: float = 30.0,
          max_body_bytes: int = 1 << 20, max_instances: int = 256) -> int:
  """Loads the model and the prompts, compiles every batch shape (`batch_sizes` x
  `length_buckets` below `input_length`, and `input_length`), then serves on host:port (0: a
  free port) until SIGTERM / SIGINT. A batch waits at most `max_wait_ms` for more examples;
  the queue holds `max_queue` examples (more: 429); a request unanswered after
  `request_timeout_s` gets 504. The bank has `max_tasks` slots (tasks added at run time take
  the free ones). `mix_tasks=False` keeps one task per batch (for comparison). Prints one
  line with the address when ready; returns 0 after the drain."""
  cc.check("serve", locals(), SERVE_RULES)
  if not prompts:
    raise ConfigError("serve needs PROMPTS: a mapping task name -> prompt (.npy, PEFT adapter "
                      "or run directory); tasks can be added later, but the first fixes the "
                      "prompts' shape")
  if max_instances > max_queue:
    raise ConfigError(f"serve.max_instances={max_instances} is more than serve.max_queue="
                      f"{max_queue}: such a request could never be queued; lower max_instances "
                      "or raise max_queue")
  if len(prompts) > max_tasks:
    raise ConfigError(f"PROMPTS has {len(prompts)} tasks; serve.max_tasks is {max_tasks}")
  vocab = load_vocabulary(vocabulary)
  config = model_config(model, {"dropout_rate": 0.0})  # metadata only
  check_vocabulary_fits(vocab, config)
  values = bank_prompts(prompts, config)
  bank = PromptBank(max_tasks, next(iter(values.values())).shape)
  for name, prompt in values.items():
    bank.add(name, prompt, str(prompts[name]))

  started = time.monotonic()
  config, frozen = load_frozen(model, None, dropout_rate=0.0)
  net = PromptedT5(config, prompt_length=bank.prompt_shape[0], num_prompts=max_tasks)
  runner = model_runner.ModelRunner(net, frozen, bank, vocab, batch_sizes=batch_sizes,
                       lengths=model_runner.length_buckets(length_buckets, input_length),
                       target_length=target_length, max_labels=max_labels)
  num_compiled = runner.warm_up()

  def load_prompt(name: str, source: str):
    return bank_prompts({name: source}, config, shape=bank.prompt_shape)[name]

  server = Server(runner, load_prompt=load_prompt,
                  limits=Limits(input_length, target_length, max_labels, max_instances),
                  max_wait_s=max_wait_ms / 1000, max_queue=max_queue,
                  request_timeout_s=request_timeout_s, mix_tasks=mix_tasks,
                  max_body_bytes=max_body_bytes)

  def ready(address: str) -> None:
    print(f"softprompt-jax serve: {len(bank.names)} tasks ({', '.join(bank.names)}) on "
          f"{address}; {num_compiled} programs compiled in {time.monotonic() - started:.1f} s "
          f"on {jax.devices()[0].platform}", file=sys.stderr, flush=True)

  asyncio.run(serve_until_signal(server, host, port, drain_timeout_s, ready))
  print("softprompt-jax serve: stopped", file=sys.stderr, flush=True)
  return 0
