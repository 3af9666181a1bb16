"""What the server counts, for GET /metrics in Prometheus' text format: requests by endpoint and
status, their latency, the batches (size, tasks mixed, run time), the queue depth, refusals, and
XLA compilations (none may happen after start-up)."""

from __future__ import annotations

import weakref

import jax
import prometheus_client as prom

# jax.monitoring's event for a program built: compiled by XLA or read from JAX's persistent
# compilation cache (jax records it for both).
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_LATENCY_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServeMetrics:
  """The server's collectors, in a registry of their own (two servers in one process, as in
  the tests, do not share counts)."""

  def __init__(self):
    self.registry = prom.CollectorRegistry()
    r = self.registry
    self.requests = prom.Counter("softprompt_requests", "HTTP requests answered",
                                 ["endpoint", "status"], registry=r)
    self.latency = prom.Histogram("softprompt_request_latency_seconds",
                                  "time from a request's arrival to its answer", ["endpoint"],
                                  buckets=_LATENCY_BUCKETS, registry=r)
    self.examples = prom.Counter("softprompt_examples", "examples answered by the model",
                                 ["kind"], registry=r)
    self.batch_size = prom.Histogram("softprompt_batch_size", "examples per batch",
                                     buckets=_SIZE_BUCKETS, registry=r)
    self.batch_tasks = prom.Histogram("softprompt_batch_tasks", "distinct tasks per batch",
                                      buckets=_SIZE_BUCKETS, registry=r)
    self.batch_seconds = prom.Histogram("softprompt_batch_seconds", "model time per batch",
                                        buckets=_LATENCY_BUCKETS, registry=r)
    self.queue_depth = prom.Gauge("softprompt_queue_depth", "examples waiting for a batch",
                                  registry=r)
    self.tasks = prom.Gauge("softprompt_tasks", "tasks in the prompt bank", registry=r)
    self.compilations = prom.Counter(
        "softprompt_xla_compilations", "XLA programs compiled, or read from the persistent "
        "compilation cache, in this process (start-up included)", registry=r)
    _LIVE.add(self)

  def batch_done(self, batch, seconds: float) -> None:
    self.batch_size.observe(len(batch))
    self.batch_tasks.observe(len({e.task for e in batch}))
    self.batch_seconds.observe(seconds)
    self.examples.labels(batch[0].kind).inc(len(batch))

  def text(self) -> bytes:
    return prom.generate_latest(self.registry)


# jax.monitoring listeners cannot be removed, so one listener, registered once, feeds every live
# ServeMetrics (a dropped server's metrics leave the set with it).
_LIVE: "weakref.WeakSet[ServeMetrics]" = weakref.WeakSet()


def _on_event(event: str, _seconds: float, **_kwargs) -> None:
  if event == _COMPILE_EVENT:
    for metrics in list(_LIVE):
      metrics.compilations.inc()


jax.monitoring.register_event_duration_secs_listener(_on_event)
