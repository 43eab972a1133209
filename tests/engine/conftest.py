"""Shared tiny models for engine tests, built once per session through the real loaders."""

from __future__ import annotations

import pytest

from creative_generation.nodes.engine.prior import load_prior
from creative_generation.nodes.testbed.tiny.prior import build_tiny_prior


@pytest.fixture(scope="session")
def tiny_prior_dir(tmp_path_factory):
    return build_tiny_prior(tmp_path_factory.mktemp("prior22") / "prior", family="kandinsky-2.2")


@pytest.fixture(scope="session")
def tiny_prior21_dir(tmp_path_factory):
    return build_tiny_prior(tmp_path_factory.mktemp("prior21") / "prior", family="kandinsky-2.1", seed=1)


@pytest.fixture(scope="session")
def prior(tiny_prior_dir):
    return load_prior(str(tiny_prior_dir))


@pytest.fixture
def user_cancel():
    """``user_cancel(when)`` installs a :class:`cancelling.UserCancel` as the engine's cancel check (a user
    presses cancel after the first step event for which ``when(event)`` holds); removed after the test."""
    from cancelling import UserCancel

    from creative_generation.nodes.engine import cancel

    def install(when) -> UserCancel:
        check = UserCancel(when)
        cancel.set_check(check)
        return check

    try:
        yield install
    finally:
        cancel.set_check(None)
