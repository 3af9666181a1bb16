"""Shared test setup: 8 simulated CPU devices for sharding tests, one JAX compilation cache for
the whole session, and the real artifacts in tests/testdata/ (see its NOTICE)."""

import os
import pathlib
import re

# Must be set before jax is imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
# Real artifacts made by other projects (a t5x checkpoint, T5's vocabulary, released prompts),
# committed with the tests so that a fresh clone runs every test that reads them.
TESTDATA = REPO_ROOT / "tests" / "testdata"


# The persistent compilation cache's settings, as jax.config names them; the upper-case names are
# the environment variables a subprocess's jax reads them from.
CACHE_SETTINGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                  "jax_persistent_cache_min_entry_size_bytes", "jax_compilation_cache_max_size")
# Programs that took longer to compile are cached: a run's steps (0.2-8 s each), not the
# thousands of one-op programs of eager code, whose writes would cost more than they save.
CACHED_COMPILE_S = 0.2


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  """Compilation is nearly all of a smoke run's time (~10 s of ~12), and the suite's runs, in
  this process and in the subprocesses it starts (multi-host runs, servers), compile the same
  programs again and again: with JAX's persistent cache, one folder for the session, a run
  whose programs an earlier one compiled takes ~3 s. A program read from the cache is the one
  that was compiled, so results stay bit for bit."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache as cache
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):  # one folder for all the session's workers
    base = base.parent
  folder = base / "jax_compilation_cache"
  folder.mkdir(exist_ok=True)
  # A size limit (never reached) turns on the cache's file lock: without it, a process could
  # read an entry another is still writing.
  values = dict(zip(CACHE_SETTINGS, (str(folder), CACHED_COMPILE_S, 0, 64 * 1024 ** 3)))
  with pytest.MonkeyPatch.context() as patch:
    for name, value in values.items():
      jax.config.update(name, value)
      patch.setenv(name.upper(), str(value))
    cache.reset_cache()  # a "no cache" decision taken at import is dropped
    yield folder


@pytest.fixture(scope="session")
def testdata() -> pathlib.Path:
  """`tests/testdata/`. A missing folder is a broken checkout, so it fails rather than skips."""
  assert (TESTDATA / "NOTICE").is_file(), f"{TESTDATA} is missing or incomplete"
  return TESTDATA


def unwrapped_gin(gin_text: str) -> str:
  """A gin file's text without gin's line continuations and spacing: gin wraps a line longer
  than 80 characters, so two files that differ only in a path's length may wrap differently."""
  return re.sub(r"\\\n|\s", "", gin_text)


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
