"""Tests that need an optional tool (Chromium, Triton): skip on a developer's machine, fail in CI.

`.ci/run` installs every such tool, so under CI a missing one is a broken build, not a skip.
CI is the caller's `CI` variable, kept by conftest in `MECHREWARD_CALLER_CI` before it sets its
own default `CI=true` (which only silences progress bars).
"""

import os

import pytest


def under_ci() -> bool:
    return os.environ.get("MECHREWARD_CALLER_CI", "").lower() in ("1", "true", "yes")


def missing(reason: str) -> None:
    """Skip the calling test with `reason`; under CI fail it instead."""
    if under_ci():
        pytest.fail(f"{reason} [CI=true: .ci/run installs it, so this test must run, not skip]", pytrace=False)
    pytest.skip(reason)
