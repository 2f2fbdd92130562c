"""The `kproxy` command. `main` is the console script's entry point (pyproject.toml:
`kproxy.cli:main`) and `python -m kproxy`'s."""

from kproxy.cli.main import main

__all__ = ["main"]
