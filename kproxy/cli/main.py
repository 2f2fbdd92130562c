"""The `kproxy` command: parse the command line (cli/flags.py), set up logging, run the
subcommand (cli/commands.py)."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time
import traceback

from kproxy.cli import commands
from kproxy.cli.flags import build_parser, detect_local_error


class _Formatter(logging.Formatter):
    """One-shot commands: `kproxy: [level: ]message`."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = "kproxy: " + (
            "" if record.levelno == logging.INFO else record.levelname.lower() + ": "
        )
        return prefix + record.getMessage()


class _DaemonFormatter(logging.Formatter):
    """The daemon: a UTC timestamp and the level on every line."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{ts}.{int(record.msecs):03d}Z {record.levelname.lower():<7} {record.getMessage()}"


class _JsonFormatter(logging.Formatter):
    """`--log-format json`: one JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        entry = {
            "ts": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _setup_logging(verbose: bool, fmt: str = "oneshot") -> None:
    handler = logging.StreamHandler(sys.stderr)
    formatter = {"json": _JsonFormatter, "text": _DaemonFormatter}.get(fmt, _Formatter)
    handler.setFormatter(formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
        if os.path.basename(sys.argv[0]) == "kube-proxy":  # the image's kube-proxy link
            return kube_proxy_main(argv)
    if argv[:1] == ["run"]:  # kube-proxy's spellings of -v and boolean flags
        from kproxy.cli.dropin import kube_proxy_argv

        argv = ["run", *kube_proxy_argv(argv[1:])]
    parser = build_parser()
    args = parser.parse_args(argv)
    config_error = commands.resolve_run(args, argv) if args.command == "run" else None
    config_error = config_error or detect_local_error(args)
    _setup_logging(
        getattr(args, "verbose", False),
        getattr(args, "log_format", "text") if args.command == "run" else "oneshot",
    )
    if config_error:  # --config or a kube-proxy flag kproxy cannot use: one line, exit 2
        logging.getLogger("kproxy").error("%s", config_error)
        return commands.EXIT_ERROR
    collecting = gc.isenabled()
    if args.command != "run":
        # A one-shot command builds millions of small objects (100k endpoints: model, rules,
        # payload) and holds them to the end; the cyclic collector's passes over them cost
        # ~40% of load + render at that size and would free nothing. The daemon instead
        # freezes what it holds after its first sync (daemon/daemon.py).
        gc.disable()
    try:
        return _dispatch(parser, args)
    except Exception as err:
        # An error no command foresaw (each reports its own inputs' errors): one line rather
        # than a traceback at a new user; -v logs the traceback for a bug report.
        verbose = getattr(args, "verbose", False)
        logging.getLogger("kproxy").error(
            "%s: %s%s",
            type(err).__name__,
            " ".join(str(err).split()),
            "" if verbose else " (-v shows the traceback)",
        )
        logging.getLogger("kproxy").debug("%s", traceback.format_exc())
        return commands.EXIT_ERROR
    finally:
        if collecting:
            gc.enable()


def kube_proxy_main(argv: list[str] | None = None) -> int:
    """`kube-proxy`: `kproxy run` with kube-proxy's command line (README "Replacing
    kube-proxy"), as kubeadm's DaemonSet starts it."""
    argv = sys.argv[1:] if argv is None else argv
    if "--version" in argv or any(a.startswith("--version=") for a in argv):
        from kproxy import __version__

        print(f"kproxy {__version__} (as kube-proxy)")
        return commands.EXIT_OK
    return main(["run", "--as-kube-proxy", *argv])


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.command == "sync":
        return commands.run_sync(args, dry_run=False)
    if args.command == "diff":
        return commands.run_sync(args, dry_run=True)
    if args.command == "trace":
        return commands.run_trace(args)
    if args.command == "run":
        return commands.run_daemon(args)
    if args.command == "snapshot":
        return commands.run_snapshot(args)
    if args.command == "restore":
        return commands.run_restore(args)
    if args.command == "cleanup":
        return commands.run_cleanup(args)
    if args.command == "doctor":
        return commands.run_doctor(args)
    parser.error(f"unknown command {args.command}")
    return commands.EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
