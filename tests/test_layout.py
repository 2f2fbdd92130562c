"""The layout's rules, checked on the source (README "How a sync works"; issue 14):

- one proxy mode, one package: nothing under kproxy/iptables imports kproxy.nftables, and
  nothing under kproxy/nftables imports kproxy.iptables;
- what every mode shares depends on no mode;
- the pure core imports nothing that does I/O, and opens no file.

Every import counts, also one inside a function or under `if TYPE_CHECKING:`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kproxy"

MODES = ("kproxy.iptables", "kproxy.nftables")

# What every mode shares (beside the mode packages, never inside one).
SHARED = (
    "kproxy.model",
    "kproxy.policy",
    "kproxy.endpoints",
    "kproxy.ports",
    "kproxy.rendercache",
    "kproxy.tracecore",
    "kproxy.errors",
    "kproxy.mode",
    "kproxy.drift",
)

# The pure core: cluster model to rules, plans and traces, no I/O (tested without root).
PURE = SHARED + (
    "kproxy.iptables.render",
    "kproxy.iptables.rules",
    "kproxy.iptables.plan",
    "kproxy.iptables.ipvs",
    "kproxy.iptables.trace",
    "kproxy.nftables.render",
    "kproxy.nftables.table",
    "kproxy.nftables.plan",
    "kproxy.nftables.nlmsg",
    "kproxy.nftables.nlencode",
    "kproxy.nftables.nlrules",
    "kproxy.nftables.trace",
    "kproxy.recovery.snapshot",  # the snapshot format: parse, check, dump
)

# Modules that do I/O: processes, sockets and netlink, files, the API server, the kernel's
# tables; and kproxy's own modules that do any of it.
IO_MODULES = (
    "subprocess",
    "socket",
    "os",
    "pathlib",
    "shutil",
    "tempfile",
    "fcntl",
    "signal",
    "select",
    "io",
    "http",
    "urllib",
    "urllib3",
    "wsgiref",
    "pyroute2",
    "kubernetes",
    "prometheus_client",
    "tenacity",
    "yaml",
    "kproxy.sources",
    "kproxy.daemon",
    "kproxy.recovery.restore",
    "kproxy.recovery.cleanup",
    "kproxy.recovery.fileio",
    "kproxy.recovery.lockfile",
    "kproxy.cli",
    "kproxy.families",
    "kproxy.nodeinfo",
    "kproxy.tools",
    "kproxy.iptables.restore",
    "kproxy.iptables.sync",
    "kproxy.iptables.foreign_watch",
    "kproxy.iptables.mode",
    "kproxy.nftables.nft",
    "kproxy.nftables.sync",
    "kproxy.nftables.mode",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> set[str]:
    """Every module `name` imports, anywhere in it; `from X import y` counts as X and X.y (y
    may be a module)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def within(module: str, prefixes: tuple[str, ...] | str) -> bool:
    if isinstance(prefixes, str):
        prefixes = (prefixes,)
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_modules_named_here_exist():
    """The lists above name real modules: a module moved or renamed must be placed again."""
    named = set(PURE) | set(MODES) | {m for m in IO_MODULES if m.startswith("kproxy.")}
    missing = sorted(m for m in named if m not in MODULES)
    assert not missing, missing


@pytest.mark.parametrize(("mode", "other"), [MODES, MODES[::-1]])
def test_no_mode_imports_the_other(mode, other):
    wrong = {
        name: sorted(m for m in imports(name) if within(m, other))
        for name in MODULES
        if within(name, mode)
    }
    wrong = {name: found for name, found in wrong.items() if found}
    assert not wrong, f"{mode} imports {other}: {wrong}"


def test_what_the_modes_share_depends_on_no_mode():
    wrong = {name: sorted(m for m in imports(name) if within(m, MODES)) for name in SHARED}
    wrong = {name: found for name, found in wrong.items() if found}
    assert not wrong, wrong


def test_the_pure_core_does_no_io():
    wrong = {name: sorted(m for m in imports(name) if within(m, IO_MODULES)) for name in PURE}
    wrong = {name: found for name, found in wrong.items() if found}
    assert not wrong, f"the pure core imports I/O modules: {wrong}"
    opens = [
        f"{name}:{node.lineno}"
        for name in PURE
        for node in ast.walk(ast.parse(MODULES[name].read_text()))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open"
    ]
    assert not opens, f"the pure core opens files: {opens}"


def test_the_check_sees_lazy_imports():
    """A function-level import is an import: cli/commands.py imports the daemon lazily (it
    loads the kubernetes client), and the check must see it."""
    assert "kproxy.daemon.daemon" in imports("kproxy.cli.commands")
