"""The runtime dir is private: another user's dir, an open one or a link is refused, and the
report is written without following a link planted in the dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared.runtime_dir import UnsafeRuntimeDir, ensure_private_dir, write_private_file


def test_a_new_dir_is_made_0700(tmp_path: Path) -> None:
    path = ensure_private_dir(tmp_path / "a" / "run")
    assert path.is_dir() and (path.stat().st_mode & 0o777) == 0o700


def test_an_open_dir_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "open"
    path.mkdir()
    path.chmod(0o777)
    with pytest.raises(UnsafeRuntimeDir, match="0777"):
        ensure_private_dir(path)


def test_a_link_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(UnsafeRuntimeDir, match="not a directory"):
        ensure_private_dir(tmp_path / "link")


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to make a dir of another user")
def test_another_users_dir_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "theirs"
    path.mkdir(mode=0o700)
    os.chown(path, 65534, 65534)
    with pytest.raises(UnsafeRuntimeDir, match="belongs to uid 65534"):
        ensure_private_dir(path)


def test_the_report_replaces_a_planted_link_instead_of_writing_through_it(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    run = ensure_private_dir(tmp_path / "run")
    (run / "efficiency.json").symlink_to(victim)
    (run / f".efficiency.json.{os.getpid()}").symlink_to(victim)  # the temporary name too
    write_private_file(run / "efficiency.json", b"{}")
    assert victim.read_bytes() == b"precious"
    assert (run / "efficiency.json").read_bytes() == b"{}" and not (run / "efficiency.json").is_symlink()
    assert ((run / "efficiency.json").stat().st_mode & 0o777) == 0o600
