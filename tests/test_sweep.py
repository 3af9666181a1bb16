"""Sweeps (configs/runs/smoke_sweep.gin through the CLI): every member trained over one frozen
model by one vectorised step has a normal run directory, equals its single run, and a stopped
sweep resumes every member."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from softprompt_jax import optim, prompts, sweep, sweep_plan, training_loop
from softprompt_jax.cli import main
from softprompt_jax.errors import ConfigError

SWEEP = ["--gin_file", "runs/smoke_sweep.gin"]
MEMBERS = ("base", "seed1", "lr0.1_seed2")  # as the gin file names them
RELATIVE = 1e-5


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
  run = tmp_path_factory.mktemp("sweep")
  assert main(["train", *SWEEP, "--model_dir", str(run)]) == 0
  return run


def _final_prompt(run_dir, step=20) -> np.ndarray:
  """The prompt of a run's checkpoint at `step` (not the best one: the state trained last)."""
  state = ocp.StandardCheckpointer().restore((run_dir / "checkpoints" / str(step) / "state"))
  return np.asarray(state["trainable"]["prompt"]["prompt"])


def _relative(a, b) -> float:
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_every_member_is_a_run_directory(swept):
  prompts_by_member = {}
  for name in MEMBERS:
    run = swept / "members" / name
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [10, 20]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["best_step"] in (10, 20)
    assert summary["sweep"] == {"model_dir": str(swept), "member": name}
    prompt = np.load(run / "prompt.npy")
    assert prompt.shape == (4, 32) and prompt.dtype == np.float32
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("split") == "validation"] == [10, 20]
    assert (run / "curves.png").is_file() and (run / "operative_config.gin").is_file()
    assert "train.members = None" in (run / "config.gin").read_text()
    prompts_by_member[name] = _final_prompt(run)
  # The members trained apart (so the comparison with single runs below can tell them apart).
  assert _relative(prompts_by_member["base"], prompts_by_member["seed1"]) > 0.1
  assert _relative(prompts_by_member["base"], prompts_by_member["lr0.1_seed2"]) > 0.1
  listed = json.loads((swept / "sweep.json").read_text())["members"]
  assert sorted(listed) == sorted(MEMBERS) and all(s["steps"] == 20 for s in listed.values())


def test_export_and_interpret_take_a_member(swept, tmp_path):
  member = swept / "members" / "seed1"
  out = tmp_path / "seed1.npy"
  assert main(["export", "--model_dir", str(member), "--out", str(out)]) == 0
  np.testing.assert_array_equal(np.load(out), np.load(member / "prompt.npy"))
  assert main(["interpret", "--model_dir", str(member)]) == 0
  assert (member / "interpretation.json").is_file()


@pytest.mark.parametrize("name", ["seed1", "lr0.1_seed2"])
def test_each_member_equals_its_single_run(swept, tmp_path, name):
  """The member's config.gin trains it alone through the ordinary single-run path; the sweep
  got the same prompt (to float32 rounding: the vectorised step sums in another order)."""
  member = swept / "members" / name
  alone = tmp_path / name
  assert main(["train", "--gin_file", str(member / "config.gin"),
               "--model_dir", str(alone)]) == 0
  assert not (alone / "members").exists()  # a single run, not a sweep
  assert _relative(_final_prompt(member), _final_prompt(alone)) <= RELATIVE
  assert _relative(np.load(member / "prompt.npy"), np.load(alone / "prompt.npy")) <= RELATIVE
  losses = [[r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
             if r.get("split") == "train"] for d in (member, alone)]
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_a_finished_sweep_is_recognised_without_loading_anything(swept, capsys,
                                                                  no_expensive_work):
  before = {p: p.stat().st_mtime_ns for p in swept.rglob("*") if p.is_file()}
  capsys.readouterr()
  assert main(["train", *SWEEP, "--model_dir", str(swept)]) == 0
  assert "nothing to do" in capsys.readouterr().err
  assert {p: p.stat().st_mtime_ns for p in swept.rglob("*") if p.is_file()} == before


def test_a_stopped_sweep_resumes_every_member(swept, tmp_path):
  run = tmp_path / "stopped"
  assert main(["train", *SWEEP, "--model_dir", str(run), "--gin.train.stop_after_steps=10"]) == 0
  for name in MEMBERS:
    assert (run / "members" / name / "checkpoints" / "10").is_dir()
    assert not (run / "members" / name / "summary.json").exists()
  assert main(["train", *SWEEP, "--model_dir", str(run)]) == 0
  for name in MEMBERS:  # the same step compiled alike, from the same saved state: bitwise
    np.testing.assert_array_equal(_final_prompt(run / "members" / name),
                                  _final_prompt(swept / "members" / name))


BAD_MEMBERS = {
    "not_a_dict": ("{'a': 1}", "train.members="),
    "bad_name": ("{'a/b': {}}", "train.members="),
    "empty": ("{}", "non-empty"),
    "shared_setting": ("{'a': {'train.batch_size': 16}}", "train.members['a'] sets "
                       "train.batch_size"),
    "other_optimizer": ("{'a': {'optim.adam.learning_rate': 0.1}}",
                        "the run's optimizer is @optim.adafactor()"),
    "bad_learning_rate": ("{'a': {'optim.adafactor.learning_rate': -1}}",
                          "train.members['a']: optim.adafactor.learning_rate=-1"),
    "bad_seed": ("{'a': {'train.seed': -1}}", "train.members['a']: train.seed=-1"),
}


@pytest.mark.parametrize("members, words", BAD_MEMBERS.values(), ids=BAD_MEMBERS.keys())
def test_a_bad_member_is_one_line_before_anything_is_loaded(members, words, tmp_path, capsys,
                                                            no_expensive_work):
  run = tmp_path / "run"
  capsys.readouterr()
  assert main(["train", "--gin_file", "runs/smoke.gin", "--model_dir", str(run),
               f"--gin.train.members={members}"]) == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and words in err[0], err
  assert not run.exists()


def test_members_group_by_prompt_length_and_optimizer_structure(tmp_path):
  members = {"a": {}, "b": {"optim.adafactor.learning_rate": 0.1, "train.seed": 3},
             "c": {"train.prompt_length": 8}, "d": {"optim.adafactor.momentum": 0.9},
             "e": {"optim.adafactor.momentum": 0.5, "train.prompt_init": prompts.random_uniform}}
  planned = sweep_plan.plan(members, model_dir=tmp_path, seed=0, prompt_length=4,
                            prompt_init=prompts.class_labels, optimizer=optim.adafactor())
  groups = sweep_plan.groups(planned)
  assert [[m.name for m in g] for g in groups] == [["a", "b"], ["c"], ["d", "e"]]
  assert sweep_plan.traced_settings(groups[0]) == ["learning_rate"]
  assert sweep_plan.traced_settings(groups[2]) == ["momentum"]
  assert planned[1].seed == 3 and planned[2].prompt_length == 8
  config = sweep_plan.member_config("train.seed = 0\n", planned[4], tmp_path)
  assert config.endswith("optim.adafactor.momentum = 0.5\n"
                         "train.prompt_init = @prompts.random_uniform\n")
  assert sweep.ALREADY_COMPLETE == training_loop.ALREADY_COMPLETE
  with pytest.raises(ConfigError, match=r"train.members\['x'\]: optim.adafactor.decay_rate=0"):
    sweep_plan.plan({"x": {"optim.adafactor.decay_rate": 0}}, model_dir=tmp_path, seed=0,
                    prompt_length=4, prompt_init=prompts.class_labels,
                    optimizer=optim.adafactor())


def test_model_tuning_is_not_swept(tmp_path, capsys, no_expensive_work):
  """Members share the frozen model: a sweep that would train its weights is refused before
  anything is loaded, leaving the directory as it was."""
  run = tmp_path / "run"
  capsys.readouterr()
  assert main(["train", *SWEEP, "--model_dir", str(run), "--gin.train.trainable=['.*']"]) == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and "a sweep shares one frozen model" in err[0], err
  assert not run.exists()


def test_optimizer_rebuilt_from_its_settings_is_the_same_and_takes_traced_values():
  """A member's optimizer is rebuilt from the settings the run's was made with: with plain
  values it computes exactly what the run's optimizer does (single runs are unchanged), and
  every TRACEABLE setting may be a per-member traced value under vmap."""
  rng = np.random.default_rng(0)
  params = {"p": jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)}
  grads = [{"p": jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)} for _ in range(3)]

  def run(optimizer):
    state, p = optimizer.init(params), params
    for g in grads:
      updates, state = optimizer.update(g, state, p)
      p = optax.apply_updates(p, updates)
    return p["p"]

  for made in (optim.adafactor(learning_rate=0.2, momentum=0.9), optim.adam(weight_decay=0.1)):
    name, settings = optim.settings_of(made)
    np.testing.assert_array_equal(run(made), run(optim.transformation(name, settings)))
    values = [{k: settings[k] if settings[k] is not None else 0.5
               for k in optim.TRACEABLE[name]},
              {k: 0.7 * (settings[k] if settings[k] is not None else 0.5)
               for k in optim.TRACEABLE[name]}]
    hyper = {k: jnp.asarray([v[k] for v in values], jnp.float32) for k in values[0]}
    traced = jax.jit(jax.vmap(lambda h, name=name, settings=settings: run(
        optim.transformation(name, {**settings, **h}))))(hyper)
    for i, plain in enumerate(values):
      expected = run(optim.transformation(name, {**settings, **plain}))
      np.testing.assert_allclose(traced[i], expected, rtol=1e-6, atol=1e-7)
  assert optim.settings_of(optax.sgd(0.1)) is None
