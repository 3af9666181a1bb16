"""What t5x and prompt-tuning users type works as they expect, or is refused in one line naming
it: no binding is silently ignored."""

import pytest

from softprompt_jax.cli import main

SMOKE = ["--gin_file", "runs/smoke.gin"]


def test_batch_size_macro_sets_the_batch(tmp_path):
  run = tmp_path / "run"
  assert main(["train", *SMOKE, "--model_dir", str(run), "--gin.BATCH_SIZE=16",
               "--gin.train.num_steps=2", "--gin.train.eval_every=2"]) == 0
  operative = (run / "operative_config.gin").read_text()
  assert "BATCH_SIZE = 16" in operative and "train.batch_size = %BATCH_SIZE" in operative


@pytest.mark.parametrize("binding, instead", [
    ("TRAIN_STEPS=1100020", "train.num_steps"),
    ("TASK_FEATURE_LENGTHS={'inputs': 512, 'targets': 8}", "train.input_length"),
    ("MIXTURE_OR_TASK_NAME='glue_sst2'", "TASK"),
    ("NO_SUCH_MACRO=3", "macros these gin files read: BATCH_SIZE"),
])
def test_a_macro_nothing_reads_is_refused_in_one_line(binding, instead, tmp_path, capsys,
                                                        no_expensive_work):
  run = tmp_path / "run"
  capsys.readouterr()
  assert main(["train", *SMOKE, "--model_dir", str(run), f"--gin.{binding}"]) == 2
  err = capsys.readouterr().err.splitlines()
  name = binding.split("=")[0]
  assert len(err) == 1 and f"--gin.{name} is set, but no setting reads %{name}" in err[0], err
  assert instead in err[0]
  assert not run.exists()


def test_prompt_tuning_task_names_with_version_suffixes_resolve():
  from softprompt_jax.data import get_task
  assert get_task("taskless_glue_sst2_v200_examples").name == "taskless_glue_sst2"
  assert get_task("glue_rte_v002").name == "glue_rte"


def test_gin_search_paths_are_looked_in_first(tmp_path, capsys, no_expensive_work):
  mine = tmp_path / "my configs"
  (mine / "runs").mkdir(parents=True)
  # A file named like a shipped one: the search path's copy wins, and its setting is refused
  # here (a bad value), which shows it was the one read.
  (mine / "runs" / "smoke.gin").write_text("include 'models/tiny.gin'\n"
                                           "include 'runs/prompt_finetune.gin'\n"
                                           "TASK = 'taskless_synthetic_sentiment'\n"
                                           "train.num_steps = -5\n")
  capsys.readouterr()
  status = main(["train", "--gin_search_paths", f"{tmp_path / 'elsewhere'},{mine}",
                 *SMOKE, "--model_dir", str(tmp_path / "run")])
  err = capsys.readouterr().err
  assert status == 2 and "train.num_steps=-5" in err, err
