"""Which IP families a node can program, decided at start (issue 13.3), without a kernel: with
no tool on PATH nothing is ever run, so these tests touch no namespace. The single-stack
nodes themselves (no ip6tables; nft refusing ip6) are in tests/test_kernel_single_stack.py."""

from __future__ import annotations

import logging

import pytest

from kproxy.errors import NoFamilyError
from kproxy.families import modes_for, other_mode


@pytest.fixture
def no_tools(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_a_node_with_no_family_is_refused_with_the_reasons(no_tools, mode, caplog):
    caplog.set_level(logging.WARNING)
    with pytest.raises(NoFamilyError, match=f"no IP family can be programmed in {mode} mode"):
        modes_for(mode)
    lines = [r.getMessage() for r in caplog.records]
    tool = "iptables" if mode == "iptables" else "nftables"
    assert any(f"No {tool} support for family IPv4" in ln and "not found" in ln for ln in lines)
    assert any(f"No {tool} support for family IPv6" in ln for ln in lines), lines


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_the_other_mode_may_have_no_family_and_says_nothing(no_tools, mode, caplog):
    """Removing the other mode's leftovers after a mode switch: a family the other mode cannot
    program has nothing to remove, and is no news for the log."""
    caplog.set_level(logging.WARNING)
    assert other_mode(mode) == []
    assert caplog.records == []
