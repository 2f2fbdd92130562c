#!/usr/bin/env python3
"""A tiny "pod": answers every TCP connection and every UDP datagram with ``NAME <peer-ip>``.

Server mode (run inside a pod network namespace)::

    podserver.py --name web-a --tcp 8080 [--tcp 9090] [--udp 5353]

prints ``READY`` on stdout once every socket listens, then serves until SIGTERM/SIGINT.
``--bind ::`` serves IPv6 and IPv4 on the same sockets (IPV6_V6ONLY off); an IPv4 peer is
still printed as ``10.244.1.10``, never ``::ffff:10.244.1.10``.

Client mode (used by the tests and the demo from any namespace)::

    podserver.py --client tcp|udp --host H --port P [--timeout T] [--count N] [--json]

prints one line per attempt: the answer (``web-a 10.244.1.10``), ``REFUSED`` or ``TIMEOUT``
(``ERROR <text>`` for anything else); ``H`` may be an IPv6 address. With ``--json`` each line
is a JSON object with the keys ``result`` (ok/refused/timeout/error), ``answer``, ``pod``,
``peer`` and ``elapsed`` (seconds).
Exit status: 0 when every attempt was answered, otherwise that of the first failure:
3 refused, 4 timeout, 5 other error.

Only the standard library is used, so any python3 can run it.
"""

from __future__ import annotations

import argparse
import errno
import json
import signal
import socket
import socketserver
import sys
import threading
import time

EXIT_OK = 0
EXIT_REFUSED = 3
EXIT_TIMEOUT = 4
EXIT_ERROR = 5


# --------------------------------------------------------------------------- server


def _peer(address: str) -> str:
    """The peer address as the pod would name it: IPv4-mapped IPv6 shown as plain IPv4."""
    if address.lower().startswith("::ffff:") and "." in address:
        return address[7:]
    return address


def _reply(name: str, peer_ip: str) -> bytes:
    return f"{name} {_peer(peer_ip)}\n".encode()


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


class _TCPServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 128


class _TCP6Server(_TCPServer):
    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def _tcp_handler(name: str) -> type[socketserver.BaseRequestHandler]:
    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            try:
                self.request.sendall(_reply(name, self.client_address[0]))
                self.request.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    return Handler


def _serve_udp(sock: socket.socket, name: str) -> None:
    while True:
        try:
            _data, peer = sock.recvfrom(2048)
            sock.sendto(_reply(name, peer[0]), peer)
        except OSError:
            # e.g. ECONNREFUSED reported for an earlier reply: keep serving
            continue


def serve(name: str, tcp_ports: list[int], udp_ports: list[int], bind: str) -> int:
    servers = []
    v6 = _family(bind) == socket.AF_INET6
    for port in tcp_ports:
        srv = (_TCP6Server if v6 else _TCPServer)((bind, port), _tcp_handler(name))
        servers.append(srv)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    for port in udp_ports:
        sock = socket.socket(_family(bind), socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if v6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((bind, port))
        threading.Thread(target=_serve_udp, args=(sock, name), daemon=True).start()

    stop = threading.Event()

    def _stop(_signum, _frame):
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print("READY", flush=True)
    while not stop.wait(3600):
        pass
    for srv in servers:
        srv.server_close()
    return 0


# --------------------------------------------------------------------------- client


def _one_tcp(host: str, port: int, timeout: float) -> tuple[str, str]:
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            chunks = []
            while True:
                data = sock.recv(4096)
                if not data:
                    break
                chunks.append(data)
        answer = b"".join(chunks).decode(errors="replace").strip()
        if not answer:
            return "error", "connection closed without an answer"
        return "ok", answer
    except TimeoutError:
        return "timeout", ""
    except ConnectionRefusedError:
        return "refused", ""
    except ConnectionResetError:
        return "error", "connection reset"
    except OSError as exc:
        return "error", exc.strerror or str(exc)


def _one_udp(host: str, port: int, timeout: float) -> tuple[str, str]:
    try:
        with socket.socket(_family(host), socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            sock.connect((host, port))
            sock.send(b"ping\n")
            data = sock.recv(4096)
        return "ok", data.decode(errors="replace").strip()
    except TimeoutError:
        return "timeout", ""
    except ConnectionRefusedError:
        return "refused", ""
    except OSError as exc:
        if exc.errno == errno.ECONNREFUSED:
            return "refused", ""
        return "error", exc.strerror or str(exc)


def client(proto: str, host: str, port: int, timeout: float, count: int, as_json: bool) -> int:
    one = _one_tcp if proto == "tcp" else _one_udp
    status = EXIT_OK
    for _ in range(count):
        start = time.monotonic()
        result, answer = one(host, port, timeout)
        elapsed = time.monotonic() - start
        pod, _, peer = answer.partition(" ") if result == "ok" else ("", "", "")
        if as_json:
            line = json.dumps(
                {
                    "result": result,
                    "answer": answer,
                    "pod": pod,
                    "peer": peer,
                    "elapsed": round(elapsed, 4),
                }
            )
        elif result == "ok":
            line = answer
        elif result == "error":
            line = f"ERROR {answer}"
        else:
            line = result.upper()
        print(line, flush=True)
        if status == EXIT_OK and result != "ok":
            status = {"refused": EXIT_REFUSED, "timeout": EXIT_TIMEOUT}.get(result, EXIT_ERROR)
    return status


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", help="server: the pod name put in every answer")
    parser.add_argument("--tcp", type=int, action="append", default=[], help="server: TCP port")
    parser.add_argument("--udp", type=int, action="append", default=[], help="server: UDP port")
    parser.add_argument(
        "--bind", default="0.0.0.0", help="server: address to bind (:: for IPv6 and IPv4)"
    )
    parser.add_argument("--client", choices=["tcp", "udp"], help="client mode: protocol")
    parser.add_argument("--host", help="client: destination address")
    parser.add_argument("--port", type=int, help="client: destination port")
    parser.add_argument("--timeout", type=float, default=2.0, help="client: seconds per attempt")
    parser.add_argument("--count", type=int, default=1, help="client: number of attempts")
    parser.add_argument("--json", action="store_true", help="client: one JSON object per line")
    args = parser.parse_args(argv)

    if args.client:
        if not args.host or not args.port:
            parser.error("--client needs --host and --port")
        return client(args.client, args.host, args.port, args.timeout, args.count, args.json)
    if not args.name or not (args.tcp or args.udp):
        parser.error("server mode needs --name and at least one --tcp or --udp port")
    return serve(args.name, args.tcp, args.udp, args.bind)


if __name__ == "__main__":
    sys.exit(main())
