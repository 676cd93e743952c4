"""The instance's runtime dir (its sockets and report): private to the service's user.

A directory someone else made, or one others can enter, would let them swap a socket or
plant a symbolic link where the service writes (it may run as root): such a dir is refused,
never used, and files are written there without following links.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class UnsafeRuntimeDir(Exception):
    """str() says what is wrong with the dir and what to do."""


def ensure_private_dir(path: Path) -> Path:
    """Create `path` 0700, or accept an existing one only if it is a real directory of this
    user that no one else can enter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeRuntimeDir(f"runtime dir {path} is not a directory (a symbolic link?); remove it or set runtime_dir")
    if info.st_uid != os.getuid():
        raise UnsafeRuntimeDir(f"runtime dir {path} belongs to uid {info.st_uid}, not to this service's user "
                               f"(uid {os.getuid()}); remove it or set runtime_dir")
    if info.st_mode & 0o077:
        raise UnsafeRuntimeDir(f"runtime dir {path} has mode {stat.S_IMODE(info.st_mode):04o}: others can enter it; "
                               "0700 is required (chmod 700 it, or remove it)")
    return path


def write_private_file(path: Path, data: bytes) -> None:
    """Replace `path` atomically with a new 0600 file, never following a link planted in the dir."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        os.unlink(tmp)  # a leftover of a killed writer (or a planted link: unlink removes the link itself)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except BaseException:
        os.unlink(tmp)
        raise
    os.replace(tmp, path)  # rename replaces a link at `path`; it never writes through it
