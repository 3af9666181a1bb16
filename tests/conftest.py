"""Shared test setup: 8 simulated CPU devices for sharding tests, and the ../shared fixtures."""

import os
import pathlib

# Must be set before jax is imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED_FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def shared_fixtures() -> pathlib.Path:
  """`../shared/fixtures`, or a skip saying why when a fresh clone has none beside it."""
  if not SHARED_FIXTURES.is_dir():
    pytest.skip(f"real-artifact fixtures not found at {SHARED_FIXTURES} "
                "(they live in ../shared beside the checkout; CI provides them)")
  return SHARED_FIXTURES
