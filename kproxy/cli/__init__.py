"""The `kproxy` command. `main` is the console script's entry point (pyproject.toml:
`kproxy.cli:main`) and `python -m kproxy`'s; `kube_proxy_main` is the `kube-proxy` script's."""

from kproxy.cli.main import kube_proxy_main, main

__all__ = ["kube_proxy_main", "main"]
