"""One process of the PeerWatch tests (tests/test_cli_multihost.py); no model, only the watch.

Run as: python peer_watch_worker.py PROCESS_ID PORT SCENARIO
  fail: process 1 reports an error and lingers; process 0 must be stopped by its watch, long
    before the watch's timeout.
  done: process 1 finishes at once; process 0 finishes after several watch timeouts, unharmed.
"""

import os
import sys
import time

TIMEOUT_S = {"fail": 60.0, "done": 1.0}


def main(process_id: int, port: int, scenario: str):
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  os.environ["JAX_PLATFORMS"] = "cpu"
  from softprompt_jax import multihost, partitioning
  assert partitioning.initialize_distributed(f"127.0.0.1:{port}", 2, process_id)
  timeout_s = TIMEOUT_S[scenario]
  watch = multihost.PeerWatch(timeout_s, command="worker")
  if scenario == "fail":
    if process_id == 1:
      time.sleep(1.5)  # while process 0's watch waits at the barrier
      watch.failed("disk full")
    time.sleep(timeout_s)  # process 0 never gets past this: its watch ends it
  elif process_id == 0:
    time.sleep(3 * timeout_s)
  watch.done()
  print(f"process {process_id} finished", flush=True)


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
