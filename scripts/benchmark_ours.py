"""Our side of the benchmark: the prompted T5 built as a run builds it, its train steps (prompt
tuning, model tuning, sharded), prompt banks in mixed batches, and one configuration's peak
memory in a fresh process."""

from __future__ import annotations

from benchmark_harness import jax_on_gpu, peak_rss_bytes, random_tokens, timed

NUM_BANK_PROMPTS = 4


def stored_frozen(params: dict, dtype: str) -> dict:
  """`params` with every leaf but the prompt cast to `dtype` (frozen_model.frozen_dtype)."""
  import jax
  import jax.numpy as jnp
  cast = lambda x: x.astype(jnp.dtype(dtype))
  return {k: v if k == "prompt" else jax.tree_util.tree_map(cast, v) for k, v in params.items()}


def build(size: str, s: dict):
  """(config, PromptedT5, params): random weights (or the shipped ones for "embedded"), the
  frozen ones stored in s["dtype"] and the prompt float32."""
  import jax

  from softprompt_jax import pretrained
  from softprompt_jax.model_spec import frozen_model, load_frozen
  from softprompt_jax.prompted_t5 import PromptedT5, make_prompted_params
  dtype = s.get("dtype", "float32")
  # Dropout off on both sides, so ours and PEFT's compute the same function (checked below).
  if size == "embedded":  # the real shipped weights
    t5, t5_params = pretrained.load_tiny(dropout_rate=0.0, dtype=dtype)
    config, t5_params = t5.config, stored_frozen(t5_params, dtype)
  else:  # initialised straight into the stored dtype, as a run's frozen model is
    config, t5_params = load_frozen(frozen_model(size=size, frozen_dtype=dtype),
                                    dropout_rate=0.0, dtype=dtype)
  model = PromptedT5(config, prompt_length=s["prompt_len"])
  return config, model, make_prompted_params(model, t5_params, jax.random.PRNGKey(0))


def random_batch(config, s: dict, seed: int = 0):
  from softprompt_jax import train_step as ts
  enc, targets = random_tokens(config, s, seed)
  return enc, targets, ts.make_batch(enc, targets)


def dtypes_of(tree) -> list:
  import jax
  import numpy as np
  return sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(tree)
                 if np.issubdtype(x.dtype, np.floating) or "bfloat16" in str(x.dtype)})


def storage(state, frozen) -> dict:
  """What a prompt-tuning step really holds: the frozen weights' dtypes and bytes, and the
  dtypes of the trainable prompt and its optimizer slots."""
  import jax
  import numpy as np
  leaves = jax.tree_util.tree_leaves(frozen)  # arrays, or their shapes when traced
  return {"frozen_dtypes": dtypes_of(frozen),
          "frozen_bytes": int(sum(x.size * np.dtype(x.dtype).itemsize for x in leaves)),
          "frozen_params": int(sum(x.size for x in leaves)),
          "trainable_dtypes": dtypes_of(state.trainable),
          "opt_state_dtypes": dtypes_of(state.opt_state)}


def our_train_steps(model, params, batch):
  """(calls, storage): calls running one step each: prompt tuning, model tuning (trainable regex
  '.*') with the same code and optimizer, and the prompt-tuning step sharded by the Partitioner
  over all local devices (one here: what the sharding machinery costs)."""
  import jax

  from softprompt_jax import optim, partitioning
  from softprompt_jax import train_step as ts
  rng = jax.random.PRNGKey(0)

  def stepper(step, state, frozen, batch):
    box = [state]

    def call():
      box[0], metrics = step(box[0], frozen, batch, rng)
      metrics["loss"].block_until_ready()
    return call

  calls = {}
  for name, patterns in (("prompt_tuning", optim.PROMPT_ONLY),
                         ("model_tuning", optim.MODEL_TUNING)):
    labels = optim.param_labels(params, patterns)
    optimizer = optim.masked_optimizer(optim.adafactor(), labels)
    step, _ = ts.jit_steps(model, optimizer)
    state, frozen = ts.init_train_state(params, labels, optimizer)
    if name == "prompt_tuning":
      stored = storage(state, frozen)
    calls[name] = stepper(step, state, frozen, batch)
  labels = optim.param_labels(params, optim.PROMPT_ONLY)
  optimizer = optim.masked_optimizer(optim.adafactor(), labels)
  partitioner = partitioning.Partitioner.create(devices=jax.local_devices()[:1])
  state, frozen = ts.init_train_state(params, labels, optimizer)
  train, _, shardings = ts.sharded_steps(
      model, optimizer, partitioner, *jax.eval_shape(lambda: (state, frozen)))
  calls["prompt_tuning_sharded"] = stepper(
      train, partitioner.put(state, shardings["state"]),
      partitioner.put(frozen, shardings["frozen"]),
      partitioner.put(batch, {k: shardings["batch"] for k in batch}))
  return calls, stored


def mixed_batches(model, params, s: dict, enc) -> dict:
  """Forward (scoring) and greedy decoding of one batch: a single-task prompt, a bank with
  mixed task ids, and the same examples grouped task by task (one call per task)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from softprompt_jax import decoding
  from softprompt_jax.prompted_t5 import PromptedT5, get_prompt, with_prompt
  single, config = model, model.config
  bank = PromptedT5(config, prompt_length=s["prompt_len"], num_prompts=NUM_BANK_PROMPTS)
  bank_params = with_prompt(params, jax.random.uniform(
      jax.random.PRNGKey(1), (NUM_BANK_PROMPTS,) + get_prompt(params).shape, minval=-0.5,
      maxval=0.5))
  b = enc.shape[0]
  ids = np.arange(b, dtype=np.int32) % NUM_BANK_PROMPTS
  dec_in = jnp.zeros((b, s["target_len"]), jnp.int32)
  enc = jnp.asarray(enc)
  forward = jax.jit(lambda m, p, e, d, **kw: m.apply({"params": p}, e, d, **kw),
                    static_argnums=0)
  steps = s["target_len"]
  decode = lambda m, p, e, **kw: decoding.greedy_decode(m, p, e, steps, eos_id=-1, **kw)
  by_task = [np.flatnonzero(ids == t) for t in range(NUM_BANK_PROMPTS)]

  def run(fn):
    return timed({
        "single": lambda: fn(single, params, enc).block_until_ready(),
        "mixed": lambda: fn(bank, bank_params, enc, prompt_ids=jnp.asarray(ids))
                         .block_until_ready(),
        "task_by_task": lambda: [
            fn(bank, bank_params, enc[rows], prompt_ids=jnp.full((len(rows),), t, jnp.int32))
            .block_until_ready() for t, rows in enumerate(by_task)],
    }, s["reps"])

  return {"forward": run(lambda m, p, e, **kw: forward(m, p, e, dec_in[:e.shape[0]], **kw)),
          "greedy": run(decode)}


def memory_child(size: str, trainable: str, s: dict) -> dict:
  """Loads random weights, builds Adam's state for `trainable`, runs three steps; reports the
  peak memory (the device allocator's on a GPU, the process's resident memory on a CPU) and
  XLA's own accounting of the compiled step (benchmark_peft.peft_memory_child: PEFT's)."""
  import gc

  import jax

  from softprompt_jax import optim
  from softprompt_jax import train_step as ts
  baseline = peak_rss_bytes()
  config, model, params = build(size, s)
  _, _, batch = random_batch(config, s)
  labels = optim.param_labels(params, (trainable,))
  optimizer = optim.masked_optimizer(optim.adam(1e-3), labels)
  state, frozen = ts.init_train_state(params, labels, optimizer)
  del params  # the state holds its own copy of what trains; the rest lives in `frozen`
  gc.collect()
  stored = storage(state, frozen)
  step, _ = ts.jit_steps(model, optimizer)
  rng = jax.random.PRNGKey(0)
  compiled = step.lower(state, frozen, batch, rng).compile()
  analysis = compiled.memory_analysis()
  for _ in range(3):
    state, metrics = step(state, frozen, batch, rng)
    metrics["loss"].block_until_ready()
  result = {"peak_rss_bytes": peak_rss_bytes(), "baseline_rss_bytes": baseline,
            "xla_argument_bytes": analysis.argument_size_in_bytes,
            "xla_output_bytes": analysis.output_size_in_bytes,
            "xla_alias_bytes": analysis.alias_size_in_bytes,
            "xla_temp_bytes": analysis.temp_size_in_bytes, **stored}
  if jax_on_gpu():
    result["peak_bytes"] = jax.devices()[0].memory_stats()["peak_bytes_in_use"]
    result["peak_source"] = "device: jax memory_stats()['peak_bytes_in_use']"
  else:
    result["peak_bytes"], result["peak_source"] = result["peak_rss_bytes"], "host: VmHWM"
  return result
