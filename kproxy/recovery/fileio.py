"""Files that must survive a crash or a full disk: written whole or not at all."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path


def write_atomically(
    path: str | Path, data: str | bytes | Iterable[str], mode: int = 0o600
) -> None:
    """Write `data` (or its pieces, in order) to `path` via a temporary file, fsync and rename:
    a reader sees the old file or the new one, never a part; if anything fails (e.g. ENOSPC)
    the old file stays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        pieces: Iterable[bytes] = [data.encode()]
    elif isinstance(data, bytes):
        pieces = [data]
    else:
        pieces = (piece.encode() for piece in data)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            for piece in pieces:
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself must reach the disk
    finally:
        os.close(dir_fd)
