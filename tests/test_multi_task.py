"""Multi-task prompts (methods/multi_task.py): each combine mode is its formula, a mixed batch
routes every example to its task's prompt (equal to that example alone with the exported
prompt), gradients reach the shared part and only the batch's tasks, and the smoke mixture
trains, exports one prompt per task and evaluates each through the CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import softprompt_jax as sj
from softprompt_jax import optim, partitioning, prompts
from softprompt_jax import train_step as ts
from softprompt_jax.cli import main
from softprompt_jax.data import get_batches, get_task
from softprompt_jax.data.mixtures import TASKS_MEAN, TaskMixture
from softprompt_jax.methods import multi_task
from softprompt_jax.methods.multi_task import PARAMS, multi_task_prompt
from softprompt_jax.prompted_t5 import PromptedT5, make_prompted_params
from softprompt_jax.run_dir import read_meta

CONFIG = sj.tiny_config()  # d_model 16
H = CONFIG.emb_dim
P = 4
N = 3
# combine -> the method's settings; the oracle below is each mode's formula, in numpy.
MODES = {"add": {}, "concat": {"task_length": 1}, "concat_features": {"shared_features": 5},
         "project": {"shared_features": 6}}


def _formula(combine, part, k):
  """Task k's prompt from the parameters, as the official code's docstrings state it."""
  if combine == "add":
    return part["shared"] + part["tasks"][k]
  if combine == "concat":
    return np.concatenate([part["shared"], part["tasks"][k]], axis=0)
  if combine == "concat_features":
    return np.concatenate([part["shared"], part["tasks"][k]], axis=1)
  return part["shared"] @ part["task_kernel"][k] + part["task_bias"][k]


@pytest.fixture(scope="module")
def t5_params():
  return sj.init_params(sj.T5(CONFIG), jax.random.PRNGKey(0))[0]


def _model(combine, num_tasks=N):
  method = multi_task_prompt(combine, **MODES[combine])
  return method, method.model(CONFIG, prompt_length=P, prompt_init=prompts.random_uniform(),
                              num_prompts=num_tasks)


def _random_part(net, seed):
  """Random values for every multi-task parameter (the run's init is too regular to test on)."""
  shapes = multi_task.param_shapes(net.combine, net.num_prompts, P, H, net.shared_size)
  rng = np.random.RandomState(seed)
  return {name: rng.randn(*shape).astype(np.float32) for name, shape in shapes.items()}


def _batch(seed, prompt_ids):
  """[4, 10] inputs (two rows padded: the prompt must not care), [4, 3] targets: the shapes
  test_prompted uses, so the suite's eager computations share their compiled ops."""
  rng = np.random.RandomState(seed)
  tokens = rng.randint(2, CONFIG.vocab_size, (4, 10))
  tokens[1, 5:] = 0
  tokens[3, 3:] = 0
  return ts.make_batch(tokens, rng.randint(2, CONFIG.vocab_size, (4, 3)), prompt_ids=prompt_ids)


SINGLE = PromptedT5(CONFIG, prompt_length=P)
# One example alone with one prompt: compiled once for every test that uses it.
_single_logits = jax.jit(lambda params, enc, dec: SINGLE.apply({"params": params}, enc, dec))


@pytest.mark.parametrize("combine", list(MODES))
def test_each_combine_is_its_formula_with_the_official_shapes(t5_params, combine):
  method, net = _model(combine)
  part = _random_part(net, 1)
  shapes = {name: v.shape for name, v in part.items()}
  expected_shapes = {"add": {"shared": (P, H), "tasks": (N, P, H)},
                     "concat": {"shared": (P - 1, H), "tasks": (N, 1, H)},
                     "concat_features": {"shared": (P, 5), "tasks": (N, P, H - 5)},
                     "project": {"shared": (P, 6), "task_kernel": (N, 6, H),
                                 "task_bias": (N, H)}}[combine]
  assert shapes == expected_shapes
  params = {**t5_params, PARAMS: part}
  ids = np.array([2, 0, 1, 2], np.int32)
  x_BxTxH, valid_BxT = net.apply({"params": params}, _batch(0, ids)["encoder_input_tokens"],
                                 prompt_ids=ids, method=type(net).encoder_inputs)
  assert x_BxTxH.shape == (4, P + 10, H) and bool(jnp.all(valid_BxT[:, :P]))
  for row, k in enumerate(ids):
    np.testing.assert_allclose(np.asarray(x_BxTxH[row, :P]), _formula(combine, part, k),
                               rtol=1e-6, atol=1e-6)
  # Every parameter's logical axes are ones the partitioning rules replicate.
  axes = flatten_dict(sj.logical_axes(net), sep="/")
  replicated = {name for name, mesh_axis in partitioning.PROMPT_RULES if mesh_axis is None}
  ours = {path: names for path, names in axes.items() if path.startswith(PARAMS)}
  assert set(ours) == {f"{PARAMS}/{name}" for name in part}
  assert all(set(names) <= replicated for names in ours.values()), ours


@pytest.mark.parametrize("combine", list(MODES))
def test_every_task_starts_as_the_runs_initial_prompt(t5_params, combine):
  method, net = _model(combine)
  params = method.init_params(net, t5_params, jax.random.PRNGKey(3))
  initial_PxH = np.asarray(net.prompt_init(jax.random.PRNGKey(3), (P, H),
                                           t5_params["token_embedder"]["embedding"]))
  combined = np.asarray(multi_task.combined_prompts(combine, params[PARAMS]))
  if combine == "project":  # the identity [Hs, H] keeps the first Hs columns, zeros after
    initial_PxH = np.concatenate([initial_PxH[:, :6], np.zeros((P, H - 6), np.float32)], 1)
  for k in range(N):
    np.testing.assert_array_equal(combined[k], initial_PxH)


@pytest.mark.parametrize("combine", ["concat", "project"])
def test_a_mixed_batch_equals_each_example_alone_with_its_exported_prompt(t5_params, combine,
                                                                          tmp_path):
  method, net = _model(combine)
  part = _random_part(net, 2)
  params = {**t5_params, PARAMS: part}
  ids = np.array([1, 2, 0, 1], np.int32)  # mixed, padded rows among them
  batch = _batch(1, ids)
  mixed = np.asarray(net.apply({"params": params}, batch["encoder_input_tokens"],
                               batch["decoder_input_tokens"], prompt_ids=batch["prompt_ids"]))
  names = ["task_a", "task_b", "task_c"]
  out = method.export(tmp_path, {PARAMS: part}, {"task": names, "placement": "prepend"},
                      tmp_path / "exported")
  assert sorted(p.name for p in out.iterdir()) == [f"{n}.npy" for n in names]
  for row, k in enumerate(ids):
    exported = prompts.load_npy(out / f"{names[k]}.npy")
    np.testing.assert_allclose(exported, _formula(combine, part, k), rtol=1e-6, atol=1e-6)
    alone = _single_logits(make_prompted_params(SINGLE, t5_params, None, exported),
                           batch["encoder_input_tokens"][row:row + 1],
                           batch["decoder_input_tokens"][row:row + 1])
    np.testing.assert_allclose(mixed[row], np.asarray(alone[0]), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="prompt_ids"):
    net.apply({"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"])


@pytest.mark.parametrize("combine", list(MODES))
def test_the_gradient_reaches_the_shared_part_and_only_the_batchs_tasks(t5_params, combine):
  method, net = _model(combine)
  params = method.init_params(net, t5_params, jax.random.PRNGKey(4))  # the run's start
  labels = optim.param_labels(params, method.trainable)
  trainable, frozen = optim.split_trainable(params, labels)
  assert set(flatten_dict(trainable)) == {(PARAMS, name) for name in params[PARAMS]}
  batch = _batch(2, [0, 2, 2, 0])  # task 1 is not in the batch
  loss = lambda t: ts.loss_fn(t, frozen, batch, None, model=net, loss_config=ts.LossConfig(),
                             enable_dropout=False)[0]
  grads = jax.jit(jax.grad(loss))(trainable)[PARAMS]
  norm = lambda x: float(jnp.linalg.norm(x))
  assert norm(grads["shared"]) > 0
  for name in grads.keys() - {"shared"}:
    assert norm(grads[name][0]) > 0 and norm(grads[name][2]) > 0, name
    assert norm(grads[name][1]) == 0, name


def test_mixture_batches_carry_each_examples_task_id_and_metrics_average_over_tasks():
  names = ["synthetic_sentiment", "synthetic_copy"]
  mixture = TaskMixture(tuple(get_task(n) for n in names))
  batch = next(get_batches(mixture, "train", "byte", input_length=32, target_length=8,
                           batch_size=16, seed=0))
  tasks = [ex["task"] for ex in batch.examples]
  assert set(tasks) == set(names)  # mixed
  np.testing.assert_array_equal(batch.arrays["prompt_ids"], [names.index(t) for t in tasks])
  one = next(get_batches(TaskMixture((get_task(names[1]),)), "train", "byte", input_length=32,
                         target_length=8, batch_size=8))
  np.testing.assert_array_equal(one.arrays["prompt_ids"], np.zeros(8))  # even a mixture of one

  metrics = mixture.metrics({"synthetic_sentiment": {"accuracy": 80.0, "num_examples": 10.0},
                             "synthetic_copy": {"exact_match": 40.0, "num_examples": 6.0}})
  assert metrics == {"synthetic_sentiment/accuracy": 80.0, "synthetic_sentiment/num_examples": 10.0,
                     "synthetic_copy/exact_match": 40.0, "synthetic_copy/num_examples": 6.0,
                     "num_examples": 16.0, TASKS_MEAN: 60.0}
  assert mixture.name == names and mixture.metric_names == (TASKS_MEAN,)
  assert mixture.choices == ("negative", "positive")


# --------------------------------------------------------------------------------------------
# Through the CLI: configs/runs/smoke_multi_task.gin

SMOKE = ["--gin_file", "runs/smoke_multi_task.gin"]
TASKS = ["synthetic_sentiment", "taskless_synthetic_sentiment"]
LENGTHS = ["--gin.evaluate.input_length=96", "--gin.evaluate.target_length=10",
           "--gin.evaluate.max_examples=16", "--gin.BATCH_SIZE=8"]


def _fails(capsys, argv, *words):
  capsys.readouterr()
  status = main(argv)
  err = capsys.readouterr().err
  assert status == 2 and len(err.splitlines()) == 1, err
  for word in words:
    assert word in err, (word, err)


@pytest.mark.parametrize("bindings, words", [
    (["--gin.train.method=@methods.prompt_tuning()"], ["lists 2 tasks", "multi_task_prompt"]),
    (["--gin.TASKS='synthetic_sentiment'"], ["a list of task names"]),
    (["--gin.TASKS=['synthetic_copy', 'synthetic_copy']"], ["distinct"]),
    (["--gin.DATA={'train': '/data/a', 'validation': '/data/b'}"], ["dict by task name"]),
    (["--gin.methods.multi_task_prompt.task_length=2"], ["task_length is for combine='concat'"]),
    (["--gin.methods.multi_task_prompt.combine='concat_features'",
      "--gin.methods.multi_task_prompt.shared_features=32"], ["shared_features 32", "< 32"]),
])
def test_bad_settings_fail_in_one_line_before_any_weight(capsys, tmp_path, no_expensive_work,
                                                          bindings, words):
  _fails(capsys, ["train", *SMOKE, "--model_dir", str(tmp_path / "run"), *bindings], *words)
  assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  run = tmp_path_factory.mktemp("multi_task_run")
  assert main(["train", *SMOKE, "--model_dir", str(run)]) == 0
  return run


def test_smoke_trains_on_the_mixture_and_evaluates_each_task(trained):
  summary = json.loads((trained / "summary.json").read_text())
  assert summary["steps"] == 20 and summary["best_metric"] == TASKS_MEAN
  final = summary["final_eval"]
  assert final[TASKS_MEAN] == pytest.approx(np.mean([final[f"{t}/accuracy"] for t in TASKS]))
  assert all(final[f"{t}/num_examples"] == 16 for t in TASKS)
  assert not (trained / "prompt.npy").exists()  # a prompt per task: export writes them
  meta = read_meta(trained)
  assert meta["task"] == TASKS and meta["method"]["name"] == "multi_task_prompt"


def test_export_writes_a_prompt_per_task_that_eval_and_infer_read(trained, tmp_path, capsys):
  out = tmp_path / "prompts"
  assert main(["export", "--model_dir", str(trained), "--out", str(out)]) == 0
  assert sorted(p.name for p in out.iterdir()) == sorted(f"{t}.npy" for t in TASKS)
  exported = {t: np.load(out / f"{t}.npy") for t in TASKS}
  assert all(v.shape == (4, 32) and v.dtype == np.float32 for v in exported.values())
  assert not np.array_equal(*exported.values())  # each task's own prompt

  summary = json.loads((trained / "summary.json").read_text())
  records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
  at_best = [r for r in records if r.get("split") == "validation"
             and r["step"] == summary["best_step"]][-1]
  for task in TASKS:  # the exported prompt alone scores what the run measured for its task
    capsys.readouterr()
    assert main(["eval", "--gin_file", "models/tiny.gin", "--gin_file", "runs/prompt_eval.gin",
                 f"--gin.TASK='{task}'", f"--gin.PROMPT_FILE='{out / f'{task}.npy'}'",
                 *LENGTHS]) == 0
    metrics = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert metrics["accuracy"] == at_best[f"{task}/accuracy"], task

  requests = tmp_path / "requests.jsonl"
  requests.write_text("\n".join(json.dumps({"task": t, "inputs": text}) for t, text in [
      (TASKS[1], "great happy day"), (TASKS[0], "is this positive or negative: awful sad"),
      (TASKS[1], "rotten")]) + "\n")
  bank = {t: str(out / f"{t}.npy") for t in TASKS}
  predictions = tmp_path / "predictions.jsonl"
  assert main(["infer", "--gin_file", "models/tiny.gin", "--gin_file", "runs/prompt_infer.gin",
               f"--gin.PROMPTS={bank!r}", f"--gin.INPUT_FILE='{requests}'",
               f"--gin.OUTPUT_FILE='{predictions}'", "--gin.infer.input_length=96",
               "--gin.infer.target_length=10"]) == 0
  rows = [json.loads(line) for line in predictions.read_text().splitlines()]
  assert [r["task"] for r in rows] == [TASKS[1], TASKS[0], TASKS[1]]

  _fails(capsys, ["export", "--model_dir", str(trained), "--out", str(tmp_path / "one.npy")],
         "a prompt per task", "directory")
  _fails(capsys, ["eval", "--gin_file", "models/tiny.gin", "--gin_file", "runs/prompt_eval.gin",
                  f"--gin.TASK='{TASKS[0]}'", *LENGTHS, "--model_dir", str(trained)],
         "export", "PROMPT_FILE")
