"""Reading a prompt (nearest_tokens.py, prompt_reports.interpret_prompt) below the end-to-end
test in test_wayward.py: nearest by cosine or Euclidean distance against brute force, the
projection, the run settings interpret defaults to, and its refusals."""

import jax.numpy as jnp
import numpy as np
import pytest

from softprompt_jax import nearest_tokens
from softprompt_jax.cli import main
from softprompt_jax.prompt_reports import _run_setting


def test_euclidean_nearest_is_brute_force():
  rng = np.random.default_rng(0)
  table_VxH = rng.normal(size=(50, 6)) * rng.uniform(0.1, 3, size=(50, 1))  # varied norms
  prompt_PxH = rng.normal(size=(9, 6))
  ids, cosines = nearest_tokens.nearest_tokens(prompt_PxH, table_VxH, k=3, by="euclidean")
  distances_PxV = np.linalg.norm(prompt_PxH[:, None] - table_VxH[None], axis=-1)
  np.testing.assert_array_equal(ids, np.argsort(distances_PxV, axis=-1)[:, :3])
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  np.testing.assert_allclose(cosines, np.take_along_axis(unit(prompt_PxH) @ unit(table_VxH).T,
                                                         ids, axis=-1), rtol=1e-5)


def test_cosine_and_euclidean_can_disagree():
  table_VxH = np.array([[10.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
  prompt_PxH = np.array([[1.0, 0.0]])
  assert nearest_tokens.nearest_tokens(prompt_PxH, table_VxH, k=1)[0][0, 0] == 0
  assert nearest_tokens.nearest_tokens(prompt_PxH, table_VxH, k=1, by="euclidean")[0][0, 0] == 1
  with pytest.raises(ValueError, match="manhattan"):
    nearest_tokens.nearest_tokens(prompt_PxH, table_VxH, by="manhattan")


@pytest.mark.parametrize("by", ["cosine", "euclidean"])
def test_the_projection_is_the_nearest_tokens_rows(by):
  rng = np.random.default_rng(1)
  table_VxH = jnp.asarray(rng.normal(size=(40, 8)), jnp.bfloat16)  # as frozen_dtype stores it
  prompt_PxH = rng.normal(size=(5, 8)).astype(np.float32)
  ids_P, projected_PxH = nearest_tokens.project(prompt_PxH, table_VxH, by=by)
  rows = nearest_tokens.describe(prompt_PxH, table_VxH, None, k=4, by=by)
  assert ids_P.tolist() == [row["ids"][0] for row in rows]
  assert projected_PxH.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(projected_PxH, np.float32),
                                np.asarray(table_VxH, np.float32)[ids_P])
  # Projecting a projection changes nothing: every row is a token's own embedding.
  again, _ = nearest_tokens.project(np.asarray(projected_PxH, np.float32), table_VxH, by=by)
  np.testing.assert_array_equal(again, ids_P)


def test_run_settings_come_from_the_recorded_config(tmp_path):
  (tmp_path / "operative_config.gin").write_text(
      "BATCH_SIZE = 8\n\n# Parameters for train:\ntrain.batch_size = %BATCH_SIZE\n"
      "train.input_length = 64\ntrain.target_length = 'x'\n")
  (tmp_path / "config.gin").write_text("train.target_length = 12\n")
  assert _run_setting(tmp_path, "batch_size") == 8
  assert _run_setting(tmp_path, "input_length") == 64
  assert _run_setting(tmp_path, "target_length") == 12  # not an integer there: the next file
  assert _run_setting(tmp_path / "elsewhere", "input_length") is None


def test_bad_settings_are_one_line(tmp_path, capsys):
  for binding, words in [("interpret.nearest_by='manhattan'", "nearest_by"),
                         ("interpret.max_examples=0", "max_examples"),
                         ("interpret.task='no_such_task'", "no_such_task")]:
    assert main(["interpret", "--model_dir", str(tmp_path), f"--gin.{binding}"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and words in error[0], error
