"""PEFT's side of the serving benchmark: transformers' T5 with one PEFT prompt-tuning adapter per
task, behind the same HTTP front and batcher as `softprompt-jax serve`, serving as well as PEFT
can: PEFT cannot put two prompt-tuning adapters in one batch, so the batcher keeps one task per
batch, and each batch selects its adapter (`set_adapter`) and runs `generate` (greedy, KV cache).

  python scripts/bench_serving_peft.py --model_dir DIR --adapters '{"task": "adapter_dir"}'

Prints the address when ready (as serve does); SIGTERM drains and stops.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Sequence

import numpy as np
import peft
import torch
import transformers

from softprompt_jax.serving.http_app import Server, serve_until_signal
from softprompt_jax.serving.prompt_bank import PromptBank
from softprompt_jax.serving.request_bodies import Limits
from softprompt_jax.tokenizers import get_vocabulary


class PeftRunner:
  """The model side as http_app.Server expects it (bank, vocabulary, max_batch, params,
  predict), on PEFT: a batch is one task's examples."""

  def __init__(self, model_dir: str, adapters: dict, *, vocabulary: str, max_batch: int,
               target_length: int):
    base = transformers.T5ForConditionalGeneration.from_pretrained(model_dir).eval()
    names = sorted(adapters)
    model = peft.PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
      model.load_adapter(adapters[name], adapter_name=name)
    self.model = model.eval()
    # The bank only names the tasks here (slots); the prompts live in PEFT's adapters.
    self.bank = PromptBank(len(names), (1, 1))
    for name in names:
      self.bank.add(name, np.zeros((1, 1), np.float32), adapters[name])
    self._by_slot = {self.bank.slot(name): name for name in names}
    self.vocabulary = get_vocabulary(vocabulary)
    self.max_batch, self.target_length = max_batch, target_length

  def params(self):
    return None

  def predict(self, params, slots: Sequence[int], tokens: Sequence[Sequence[int]]) -> list[str]:
    if len(set(slots)) != 1:
      raise ValueError("PEFT runs one prompt-tuning adapter per batch (mix_tasks=False)")
    self.model.set_adapter(self._by_slot[slots[0]])
    length = max(len(t) for t in tokens)
    ids = torch.zeros((len(tokens), length), dtype=torch.long)
    for row, t in enumerate(tokens):
      ids[row, :len(t)] = torch.tensor(t)
    with torch.inference_mode():
      out = self.model.generate(input_ids=ids, attention_mask=(ids > 0).long(),
                                max_new_tokens=self.target_length, do_sample=False,
                                num_beams=1)
    return [self.vocabulary.decode(row[1:]) for row in out.tolist()]  # [0] is the start id


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model_dir", required=True, help="a Hugging Face T5 directory")
  parser.add_argument("--adapters", required=True, help="JSON: task name -> PEFT adapter dir")
  parser.add_argument("--vocabulary", default="byte")
  parser.add_argument("--host", default="127.0.0.1")
  parser.add_argument("--port", type=int, default=0)
  parser.add_argument("--max_batch", type=int, default=64)
  parser.add_argument("--max_wait_ms", type=float, default=5.0)
  parser.add_argument("--input_length", type=int, default=64)
  parser.add_argument("--target_length", type=int, default=16)
  parser.add_argument("--max_queue", type=int, default=4096)
  args = parser.parse_args(argv)
  runner = PeftRunner(args.model_dir, json.loads(args.adapters), vocabulary=args.vocabulary,
                      max_batch=args.max_batch, target_length=args.target_length)

  def no_new_tasks(name, source):
    raise NotImplementedError("the PEFT benchmark server serves a fixed set of adapters")

  server = Server(runner, load_prompt=no_new_tasks,
                  limits=Limits(args.input_length, args.target_length, 8, 256),
                  max_wait_s=args.max_wait_ms / 1000, max_queue=args.max_queue,
                  request_timeout_s=600, mix_tasks=False)

  def ready(address: str) -> None:
    print(f"bench_serving_peft: {len(runner.bank.names)} adapters on {address} "
          f"({torch.get_num_threads()} torch threads)", file=sys.stderr, flush=True)

  asyncio.run(serve_until_signal(server, args.host, args.port, 30.0, ready))
  return 0


if __name__ == "__main__":
  sys.exit(main())
