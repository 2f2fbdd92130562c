"""The chaos scenarios' short versions (`make chaos` runs the long ones, scripts/chaos/run.py):
each asserts that every promise held (`problems` empty) and prints its figures."""

from __future__ import annotations

import json

import pytest

from tests.chaos import scenarios

pytestmark = pytest.mark.kernel


def check(result: dict) -> None:
    print(json.dumps(result, indent=1, default=str))
    assert result["problems"] == [], json.dumps(result, indent=1, default=str)


def test_kill9_never_leaves_half_applied_tables(kernel_support):
    check(scenarios.kill9(kills=4, short=True))
