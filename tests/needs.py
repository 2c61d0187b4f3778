"""Tests that need an optional component (Chromium, Triton, the SmolLM2 GGUF): skip on a developer's
machine that lacks it, saying how to get it; fail when the caller has installed everything.

`.ci/test` (the README's test command, which `.ci/run` calls) installs every such component and sets
`MECHREWARD_REQUIRE_OPTIONAL=1`, so there a missing one is a broken install, not a skip. The caller's
`CI=true` does the same; conftest keeps it in `MECHREWARD_CALLER_CI` before it sets its own default
`CI=true` (which only silences progress bars).
"""

import os

import pytest


def under_ci() -> bool:
    """True when every optional component must be present (CI, or `.ci/test` after installing them)."""
    truthy = ("1", "true", "yes")
    return (os.environ.get("MECHREWARD_CALLER_CI", "").lower() in truthy
            or os.environ.get("MECHREWARD_REQUIRE_OPTIONAL", "").lower() in truthy)


def missing(reason: str) -> None:
    """Skip the calling test with `reason`; under CI fail it instead."""
    if under_ci():
        pytest.fail(f"{reason} [.ci/test installs it (CI=true or MECHREWARD_REQUIRE_OPTIONAL=1), so this test must "
                    "run, not skip]", pytrace=False)
    pytest.skip(reason)
