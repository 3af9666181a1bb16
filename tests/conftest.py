"""Shared test setup: 8 simulated CPU devices for sharding tests, and the real artifacts in
tests/testdata/ (see its NOTICE)."""

import os
import pathlib

# Must be set before jax is imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
# Real artifacts made by other projects (a t5x checkpoint, T5's vocabulary, released prompts),
# committed with the tests so that a fresh clone runs every test that reads them.
TESTDATA = REPO_ROOT / "tests" / "testdata"


@pytest.fixture(scope="session")
def testdata() -> pathlib.Path:
  """`tests/testdata/`. A missing folder is a broken checkout, so it fails rather than skips."""
  assert (TESTDATA / "NOTICE").is_file(), f"{TESTDATA} is missing or incomplete"
  return TESTDATA


def _forbidden(what):
  def call(*args, **kwargs):
    raise AssertionError(f"{what} was called: expensive work started before the error")
  return call


@pytest.fixture
def no_expensive_work(monkeypatch):
  """Loading or initialising the frozen model, reading weights or building sharded steps fails
  the test (every name the run paths reach them by is patched)."""
  # Imported before patching: a module first imported under the patch would keep the patched
  # name (`from ... import load_frozen`) after the test.
  import softprompt_jax.inference  # noqa: F401
  import softprompt_jax.run_setup  # noqa: F401
  import softprompt_jax.serving.serve  # noqa: F401
  import softprompt_jax.training_loop  # noqa: F401
  for target in ("softprompt_jax.model_spec.load_frozen", "softprompt_jax.run_setup.load_frozen",
                 "softprompt_jax.inference.load_frozen",
                 "softprompt_jax.inference.make_prompted_params",
                 "softprompt_jax.serving.serve.load_frozen",
                 "softprompt_jax.checkpoints.loading.load_t5",
                 "softprompt_jax.checkpoints.loading.read_params",
                 "softprompt_jax.train_step.sharded_steps",
                 "softprompt_jax.prompted_t5.make_prompted_params",
                 "softprompt_jax.methods.base.make_prompted_params"):
    monkeypatch.setattr(target, _forbidden(target))
