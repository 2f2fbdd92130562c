"""A NETLINK_NETFILTER socket of the current network namespace: one batch per transaction,
and dumps.

The kernel runs a whole batch (BATCH_BEGIN, messages, BATCH_END) inside the one sendmsg()
that carries it, and commits it only when it reaches BATCH_END with every message accepted:
a kproxy killed before that call changes nothing, and a batch the kernel refuses anywhere is
aborted whole. Its errors (and the ack asked of the last message) are queued on the socket
before sendmsg returns.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from kproxy import tools
from kproxy.nftables import nlmsg

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
NLMSGERR_ATTR_MSG = 1
NLM_F_ACK_TLVS = 0x200
RECV_SIZE = 1 << 20
_REQUEST = struct.Struct("=IHHIIBBH")  # nlmsghdr and nfgenmsg
_NLMSG = struct.Struct("=IHHI")


@dataclass
class BatchError:
    seq: int
    errno: int
    message: str  # the kernel's extended ack text, when it gave one


class NetlinkSocket:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.bind((0, 0))
            tools.own_socket(self.sock.getsockname()[0])  # its commits are kproxy's own
            self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            self.sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
            self._force(SO_RCVBUFFORCE, 8 << 20)
        except BaseException:
            self.sock.close()
            raise
        self.seq = int.from_bytes(os.urandom(2), "big") << 8

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> NetlinkSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _force(self, option: int, size: int) -> None:
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, option, size)
        except PermissionError:  # without CAP_NET_ADMIN: as much as net.core.*mem_max allows
            plain = socket.SO_SNDBUF if option == SO_SNDBUFFORCE else socket.SO_RCVBUF
            self.sock.setsockopt(socket.SOL_SOCKET, plain, size)

    def next_seq(self, count: int = 1) -> int:
        first = self.seq
        self.seq += count
        return first

    def send_batch(self, batch: bytes | bytearray, last_seq: int) -> list[BatchError]:
        """Send one whole batch in one sendmsg; the errors the kernel answered ([]: committed).
        The kernel has run the batch and queued every answer by the time sendmsg returns, so
        they are read without waiting; the message with `last_seq` carries NLM_F_ACK, and
        without its ack (and without an error) the outcome is unknown and reported as one."""
        self._force(SO_SNDBUFFORCE, len(batch) + (1 << 16))
        self._drain()
        sent = self.sock.send(batch)
        if sent != len(batch):
            raise OSError(errno.EMSGSIZE, f"netlink batch cut short: {sent} of {len(batch)} bytes")
        errors: list[BatchError] = []
        acked = False
        while True:
            try:
                data = self.sock.recv(RECV_SIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError as err:
                if err.errno != errno.ENOBUFS:
                    raise
                # More answers than the receive buffer holds: some errors were lost.
                errors.append(BatchError(0, errno.ENOBUFS, "answers lost (ENOBUFS)"))
                continue
            for kind, flags, seq, _port, payload in nlmsg.iter_messages(data):
                if kind != nlmsg.NLMSG_ERROR:
                    continue
                code = -struct.unpack_from("=i", payload)[0]
                if code:
                    errors.append(BatchError(seq, code, _ext_ack_text(payload, flags)))
                elif seq == last_seq:
                    acked = True
        if not errors and not acked:
            errors.append(BatchError(0, errno.EPROTO, "the kernel did not answer the batch"))
        return errors

    def _drain(self) -> None:
        """Drop anything left from an earlier exchange."""
        while True:
            try:
                self.sock.recv(RECV_SIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return

    def dump(self, msg: int, family: int, body: bytes = b"") -> list[bytes]:
        """The payloads (nfgenmsg onward) of a dump's answers ([] when there is nothing)."""
        return next(self.dump_each(msg, family, [body]))

    def dump_each(self, msg: int, family: int, bodies: list[bytes]) -> Iterator[list[bytes]]:
        """One dump per body, in order (a netlink socket runs one dump at a time): for each,
        the payloads of its answers. The loop is kept tight: a verify at 10k Services dumps
        112k chains one by one (a table-wide rule dump costs the kernel more than linear
        time: each round of it skips again every rule already sent)."""
        sock = self.sock
        buf = bytearray(RECV_SIZE)
        header = _REQUEST.pack
        unpack = _NLMSG.unpack_from
        kind_out = (nlmsg.NFNL_SUBSYS_NFTABLES << 8) | msg
        flags = nlmsg.NLM_F_REQUEST | nlmsg.NLM_F_DUMP
        seq = self.next_seq(len(bodies))
        for body in bodies:
            seq += 1
            sock.send(header(20 + len(body), kind_out, flags, seq, 0, family, 0, 0) + body)
            answers: list[bytes] = []
            done = False
            while not done:
                n = sock.recv_into(buf)
                off = 0
                while off + 16 <= n:
                    length, kind, _, mseq = unpack(buf, off)
                    if mseq == seq:
                        if kind == nlmsg.NLMSG_DONE:
                            done = True
                            break
                        if kind == nlmsg.NLMSG_ERROR:
                            code = -struct.unpack_from("=i", buf, off + 16)[0]
                            if code and code != errno.ENOENT:
                                raise OSError(code, f"netlink dump {msg}: {os.strerror(code)}")
                            done = True
                            break
                        answers.append(bytes(buf[off + 16 : off + length]))
                    off += (length + 3) & ~3
            yield answers
        self.seq = max(self.seq, seq + 1)

    def request(self, msg: int, family: int, body: bytes = b"") -> list[bytes]:
        """One GET (not a dump): its answer's payloads; [] when the object does not exist."""
        seq = self.next_seq()
        self.sock.send(nlmsg.message(msg, nlmsg.NLM_F_ACK, seq, family, body))
        out: list[bytes] = []
        while True:
            data = self.sock.recv(RECV_SIZE)
            for kind, _flags, mseq, _port, payload in nlmsg.iter_messages(data):
                if mseq != seq:
                    continue
                if kind == nlmsg.NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    if code in (0, errno.ENOENT):
                        return out
                    raise OSError(code, f"netlink request {msg}: {os.strerror(code)}")
                out.append(payload)


def _ext_ack_text(payload: bytes, flags: int) -> str:
    """NLMSGERR_ATTR_MSG of an error (with NETLINK_CAP_ACK the original message is only its
    16-byte header, after the 4-byte error code)."""
    if not flags & NLM_F_ACK_TLVS:
        return ""
    for kind, value in nlmsg.iter_attrs(payload, 4 + 16):
        if kind == NLMSGERR_ATTR_MSG:
            return nlmsg.cstr(value)
    return ""
