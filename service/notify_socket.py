"""The receiving side of systemd's notify protocol, for `serve`'s children: one datagram
socket per child, private to this user, read without blocking. `shared/sd_notify.py` is the
sending side; a child cannot tell this socket from systemd's.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

MAX_DATAGRAM_BYTES = 4096  # a state message is a few short KEY=VALUE lines


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # left by a serve that was killed
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        old_umask = os.umask(0o177)  # the socket file is created 0600: only this user may send
        try:
            self._sock.bind(str(path))
        except OSError:
            self._sock.close()
            raise
        finally:
            os.umask(old_umask)

    def fileno(self) -> int:
        return self._sock.fileno()

    def receive(self) -> list[dict[str, str]]:
        """Every message waiting, each as its KEY=VALUE lines ({"READY": "1", "STATUS": …})."""
        messages = []
        while True:
            try:
                data = self._sock.recv(MAX_DATAGRAM_BYTES)
            except (BlockingIOError, InterruptedError):
                return messages
            messages.append(parse(data))

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def parse(data: bytes) -> dict[str, str]:
    fields = {}
    for line in data.decode(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key] = value
    return fields
