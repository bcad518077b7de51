"""Shared pytest configuration: the per-test time limit of tests marked ``slow`` (see pyproject.toml)."""

from __future__ import annotations

import pytest

SLOW_TIMEOUT_S = 3600
"""Limit for a test marked ``slow`` (it trains in a fixture, which the limit includes); the default is pyproject's
``timeout``."""


def pytest_collection_modifyitems(config, items):
    if config.getoption("timeout", None) is not None:  # --timeout N on the command line wins (0 = no limit)
        return
    for item in items:
        if item.get_closest_marker("slow") is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))
