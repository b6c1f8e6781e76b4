"""Fixtures of the coordinator's tests: the plan's models of real shapes, made once a session."""

from __future__ import annotations

import pytest

from plans import shaped


@pytest.fixture(scope="session")
def l8():
    return shaped("llama-3.1-8b")


@pytest.fixture(scope="session")
def l70():
    return shaped("llama-3.1-70b")
