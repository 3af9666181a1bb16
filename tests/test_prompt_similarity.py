"""SPoT's prompt similarity (prompt_similarity.py) against loops over the definitions, and the
`softprompt-jax similarity` command."""

import json

import numpy as np
import pytest

from softprompt_jax.cli import main
from softprompt_jax.prompt_similarity import (PromptSimilarityError, similarity,
                                              similarity_report)


def _cos(x, y) -> float:
  return float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y)))


def _oracle(a, b) -> dict:
  """The definitions, one pair of vectors at a time."""
  average = _cos(a.mean(0), b.mean(0))
  per_token = sum(_cos(x, y) for x in a for y in b) / (len(a) * len(b))
  per_position = (sum(_cos(x, y) for x, y in zip(a, b)) / len(a)) if len(a) == len(b) else None
  return {"average": average, "per_token": per_token, "per_position": per_position}


def _assert_close(got: dict, want: dict):
  assert got.keys() == want.keys()
  for key in want:
    if want[key] is None:
      assert got[key] is None, key
    else:
      np.testing.assert_allclose(got[key], want[key], rtol=1e-9, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("lengths", [(5, 5), (5, 3)])
def test_agrees_with_the_definitions(lengths):
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(lengths[0], 16)), rng.normal(size=(lengths[1], 16))
  _assert_close(similarity(a, b), _oracle(a, b))


def test_identical_prompts_are_one():
  a = np.random.default_rng(1).normal(size=(6, 8)).astype(np.float32)
  same = similarity(a, a.copy())
  assert same["average"] == pytest.approx(1.0) and same["per_position"] == pytest.approx(1.0)
  # per_token compares every pair of positions, so it is 1 only for a prompt of one direction.
  assert same["per_token"] < 0.5
  assert similarity(np.ones((3, 4)), 2 * np.ones((3, 4)))["per_token"] == pytest.approx(1.0)


def test_orthogonal_prompts_are_zero():
  eye = np.eye(8)
  got = similarity(eye[:4] + eye[[1, 2, 3, 0]], eye[4:])  # a in dims 0-3, b in 4-7
  assert got == {"average": 0.0, "per_token": 0.0, "per_position": 0.0}


def test_a_permutation_of_positions_changes_per_position_only():
  a = np.random.default_rng(2).normal(size=(7, 12))
  permuted = a[[3, 0, 6, 1, 5, 2, 4]]
  got = similarity(a, permuted)
  assert got["average"] == pytest.approx(1.0)
  assert got["per_token"] == pytest.approx(similarity(a, a)["per_token"])
  assert got["per_position"] < 0.5
  assert got["per_position"] == pytest.approx(_oracle(a, permuted)["per_position"])


def test_prompts_of_different_widths_or_not_2d_are_refused():
  with pytest.raises(PromptSimilarityError, match="different widths"):
    similarity(np.ones((3, 4)), np.ones((3, 5)))
  with pytest.raises(PromptSimilarityError, match=r"\[prompt_length, d_model\]"):
    similarity(np.ones((2, 3, 4)), np.ones((3, 4)))
  with pytest.raises(PromptSimilarityError, match="different widths"):
    similarity_report({"a": np.ones((3, 4)), "b": np.ones((3, 5))})


def test_the_report_is_every_pair():
  rng = np.random.default_rng(3)
  named = {"a": rng.normal(size=(4, 6)), "b": rng.normal(size=(4, 6)),
           "c": rng.normal(size=(2, 6))}
  report = similarity_report(named)
  assert report["prompts"] == ["a", "b", "c"] and report["shapes"] == [[4, 6], [4, 6], [2, 6]]
  for i, x in enumerate(named.values()):
    for j, y in enumerate(named.values()):
      want = _oracle(x, y)
      for measure in ("average", "per_token", "per_position"):
        got = report[measure][i][j]
        assert got is None if want[measure] is None else got == pytest.approx(want[measure],
                                                                             abs=1e-6)


def test_the_command_prints_the_matrices_and_writes_json(tmp_path, capsys):
  rng = np.random.default_rng(4)
  a = rng.normal(size=(5, 32)).astype(np.float32)
  np.save(tmp_path / "a.npy", a)
  np.save(tmp_path / "permuted.npy", a[[4, 3, 2, 1, 0]])
  run = tmp_path / "run"  # a run directory: its prompt.npy
  run.mkdir()
  np.save(run / "prompt.npy", rng.normal(size=(3, 32)).astype(np.float32))
  sources = [str(tmp_path / "a.npy"), str(tmp_path / "permuted.npy"), str(run)]
  out = tmp_path / "similarity.json"
  assert main(["similarity", *sources, "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  for word in ["average:", "per_token:", "per_position:", *sources, "wrote"]:
    assert word in printed, word
  report = json.loads(out.read_text())
  assert report["prompts"] == sources
  assert report["average"][0][1] == pytest.approx(1.0)
  assert report["per_position"][0][1] == pytest.approx(
      _oracle(a, a[[4, 3, 2, 1, 0]])["per_position"], abs=1e-6)
  assert report["per_position"][0][2] is None  # lengths 5 and 3
  # The matrices as printed: row [0], per_position, in the order given.
  block = printed[printed.index("per_position:"):].splitlines()
  assert block[2].split()[0] == "[0]" and block[2].split()[3] == "-"

  # --out -: stdout is the JSON alone; the matrices go to stderr.
  assert main(["similarity", *sources[:2], "--out", "-"]) == 0
  captured = capsys.readouterr()
  assert json.loads(captured.out)["prompts"] == sources[:2] and "average:" in captured.err


def test_the_command_refuses_in_one_line(tmp_path, capsys):
  np.save(tmp_path / "bank.npy", np.ones((2, 3, 4), np.float32))
  np.save(tmp_path / "wide.npy", np.ones((3, 8), np.float32))
  np.save(tmp_path / "narrow.npy", np.ones((3, 4), np.float32))
  for args, words in [([tmp_path / "wide.npy", tmp_path / "narrow.npy"], "different widths"),
                      ([tmp_path / "bank.npy"], "[prompt_length, d_model]"),
                      ([tmp_path / "missing.npy"], "does not exist")]:
    assert main(["similarity", *map(str, args), "--out", str(tmp_path / "x.json")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and words in error[0], error
    assert not (tmp_path / "x.json").exists()
