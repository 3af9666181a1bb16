"""One process of the PeerWatch tests (tests/test_cli_multihost.py); no model, only the watch.

Run as: python peer_watch_worker.py PROCESS_ID PORT SCENARIO
  fail: process 1 reports an error and lingers; process 0 must be stopped by its watch.
  done: process 1 finishes at once; process 0 finishes after several watch timeouts, unharmed.
"""

import os
import sys
import time

TIMEOUT_S = 1.0


def main(process_id: int, port: int, scenario: str):
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  os.environ["JAX_PLATFORMS"] = "cpu"
  from softprompt_jax import partitioning, peers
  assert partitioning.initialize_distributed(f"127.0.0.1:{port}", 2, process_id)
  watch = peers.PeerWatch(TIMEOUT_S, command="worker")
  if scenario == "fail":
    if process_id == 1:
      watch.failed("disk full")
    time.sleep(10 * TIMEOUT_S)  # process 0 never gets past this: its watch ends it
  elif process_id == 0:
    time.sleep(3 * TIMEOUT_S)
  watch.done()
  print(f"process {process_id} finished", flush=True)


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
