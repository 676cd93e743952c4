"""`citadel-llm model download` through huggingface_hub against a local hub (tests/hub_server.py)
serving the demo model's files: progress, resume, one-line errors, and model_path whole or untouched."""

from __future__ import annotations

import fcntl
import os
import pty
import resource
import select
import shutil
import struct
import subprocess
import sys
import termios
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from huggingface_hub.constants import DOWNLOAD_CHUNK_SIZE

from service.model_files import MANIFEST, verify
from tests.helpers import ROOT, demo_model_dir, free_port
from tests.hub_server import HubServer

REPO = "microsoft/Phi-3-mini-4k-instruct"  # model_name in the shipped configuration
RUN_TIMEOUT_S = 120


@pytest.fixture()
def hub() -> Iterator[HubServer]:
    with HubServer(REPO, demo_model_dir()) as server:
        yield server


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    def one_line_error(self) -> str:
        """The error line; asserts it is the only line of ours and no traceback came with it."""
        assert self.returncode not in (0, None), self.stderr
        assert "Traceback" not in self.stderr, self.stderr
        ours = [line for line in self.stderr.splitlines() if line.startswith("citadel-llm:")]
        assert len(ours) == 1 and self.stderr.rstrip().endswith(ours[0]), self.stderr
        return ours[0]


def env_for(tmp_path: Path, endpoint: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PHI_3_MINI_", "HF_"))}
    return env | {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf-home")} | extra


def download(model_dir: Path, env: dict[str, str], *, wrap: list[str] | None = None,
             preexec_fn: Callable[[], None] | None = None) -> Run:
    cmd = (wrap or []) + [sys.executable, "-m", "service", "model", "download", "--dir", str(model_dir)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT,
                            timeout=RUN_TIMEOUT_S, preexec_fn=preexec_fn)
    return Run(result.returncode, result.stdout, result.stderr)


def download_on_a_terminal(model_dir: Path, env: dict[str, str]) -> Run:
    """stderr on a pseudo-terminal of 120 columns, as an operator runs it: huggingface_hub
    draws its byte bars only on a terminal."""
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "service", "model", "download", "--dir", str(model_dir)],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=secondary)
    os.close(secondary)
    err = b""
    try:
        while select.select([primary], [], [], RUN_TIMEOUT_S)[0]:
            try:
                chunk = os.read(primary, 1 << 16)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            err += chunk
        assert proc.stdout is not None
        out = proc.stdout.read().decode()
        proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        os.close(primary)
        if proc.poll() is None:
            proc.kill()
    return Run(proc.returncode, out, err.decode(errors="replace"))


def model_verify(model_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHI_3_MINI_")}
    return subprocess.run([sys.executable, "-m", "service", "model", "verify", "--dir", str(model_dir)],
                          capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT_S, cwd=ROOT)


def assert_is_the_demo_model(model_dir: Path) -> None:
    demo = demo_model_dir()
    names = sorted(p.name for p in model_dir.iterdir())
    assert names == sorted([p.name for p in demo.iterdir()] + [MANIFEST]), names  # no .cache, no partials
    for p in demo.iterdir():
        assert (model_dir / p.name).read_bytes() == p.read_bytes(), p.name
    assert verify(model_dir) == []


def staging_of(model_dir: Path) -> Path:
    return model_dir.with_name(model_dir.name + ".download")


def test_download_shows_progress_writes_the_manifest_and_verifies(hub: HubServer, tmp_path: Path) -> None:
    model_dir = tmp_path / "models" / "phi-3"  # its parent does not exist yet either
    run = download_on_a_terminal(model_dir, env_for(tmp_path, hub.endpoint))
    assert run.returncode == 0, run.stderr
    assert f"wrote {model_dir / MANIFEST}" in run.stdout
    assert "Fetching 7 files: 100%" in run.stderr  # huggingface_hub's bars, on stderr
    assert "Download complete" in run.stderr and "13.9MB" in run.stderr  # the bytes of all 7 files
    assert_is_the_demo_model(model_dir)
    verified = model_verify(model_dir)
    assert verified.returncode == 0 and "OK" in verified.stdout, verified.stderr
    assert sorted(p.name for p in model_dir.parent.iterdir()) == ["phi-3"]  # nothing left beside it
    # huggingface_hub's own requests: the repository listing, then each file (LFS ones redirected)
    assert {n for n in hub.files if hub.gets_of(n) == 1} == set(hub.files)


def test_the_engines_offline_setting_does_not_stop_a_download(hub: HubServer, tmp_path: Path) -> None:
    # the engine runs with HF_HUB_OFFLINE=1; an operator's shell may carry it too
    run = download(tmp_path / "model", env_for(tmp_path, hub.endpoint, HF_HUB_OFFLINE="1"))
    assert run.returncode == 0, run.stderr
    assert_is_the_demo_model(tmp_path / "model")


def test_a_transfer_cut_in_the_middle_resumes_with_a_range_request(hub: HubServer, tmp_path: Path) -> None:
    # huggingface_hub writes what it receives in chunks of DOWNLOAD_CHUNK_SIZE (10 MiB) and
    # resumes after the last whole one: cut the 13.6 MB weights 12 MB in
    hub.cut_after_bytes["model.safetensors"] = 12_000_000
    run = download(tmp_path / "model", env_for(tmp_path, hub.endpoint))
    assert run.returncode == 0, run.stderr
    assert "Trying to resume download" in run.stderr  # huggingface_hub's warning, then its retry
    assert hub.ranges_of("model.safetensors") == [None, f"bytes={DOWNLOAD_CHUNK_SIZE}-"]
    assert_is_the_demo_model(tmp_path / "model")


def test_a_failed_run_leaves_model_path_as_it_was_and_the_next_run_fetches_the_rest(
        hub: HubServer, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "old-weights.safetensors").write_bytes(b"the model served until now")
    hub.fail_get.add("model.safetensors")  # 500: huggingface_hub does not retry it
    error = download(model_dir, env_for(tmp_path, hub.endpoint)).one_line_error()
    assert "answered 500" in error and "run again to resume" in error
    assert [p.name for p in model_dir.iterdir()] == ["old-weights.safetensors"]
    kept = {p.name for p in staging_of(model_dir).iterdir()}
    assert "tokenizer.json" in kept and "model.safetensors" not in kept

    hub.fail_get.clear()
    run = download(model_dir, env_for(tmp_path, hub.endpoint))
    assert run.returncode == 0, run.stderr
    assert hub.gets_of("model.safetensors") == 2
    assert all(hub.gets_of(n) == 1 for n in hub.files if n != "model.safetensors")  # not fetched again
    assert_is_the_demo_model(model_dir)  # the old file is gone with the old folder
    assert not staging_of(model_dir).exists()


def test_a_missing_repository_is_one_line(hub: HubServer, tmp_path: Path) -> None:
    run = download(tmp_path / "model", env_for(tmp_path, hub.endpoint, PHI_3_MINI_MODEL_NAME="nobody/no-such-model"))
    assert run.one_line_error() == (f"citadel-llm: model download failed: no repository nobody/no-such-model "
                                    f"at {hub.endpoint} (a private one needs HF_TOKEN)")
    assert not (tmp_path / "model").exists() and not staging_of(tmp_path / "model").exists()


def test_no_network_is_one_line(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    error = download(tmp_path / "model", env_for(tmp_path, closed)).one_line_error()
    assert error.startswith(f"citadel-llm: model download failed: cannot reach {closed}: ")
    assert "Connection refused" in error
    assert not (tmp_path / "model").exists() and not staging_of(tmp_path / "model").exists()


def _tmpfs_works() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1M tmpfs /mnt"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.parametrize("disk", ["tmpfs-ENOSPC", "rlimit-EFBIG"])
def test_a_full_disk_is_one_line_and_leaves_model_path_alone(hub: HubServer, tmp_path: Path, disk: str) -> None:
    disk_dir = tmp_path / "disk"
    disk_dir.mkdir()
    model_dir = disk_dir / "model"
    env = env_for(tmp_path, hub.endpoint)
    if disk == "tmpfs-ENOSPC":
        # a 1 MiB tmpfs in a private mount namespace: the small files fit, the 13.6 MB weights
        # do not (write(2) fails with ENOSPC); what it held is listed before the namespace goes
        if not _tmpfs_works():
            pytest.skip("needs root and unshare -m to mount a tmpfs")
        script = (f'mount -t tmpfs -o size=1M tmpfs {disk_dir} && "$@"; rc=$?; '
                  f'ls -A {disk_dir} > {tmp_path}/on-disk; ls -A {staging_of(model_dir)} > {tmp_path}/kept; exit $rc')
        run = download(model_dir, env, wrap=["unshare", "-m", "sh", "-c", script, "sh"])
        on_disk = set((tmp_path / "on-disk").read_text().split())
        kept = set((tmp_path / "kept").read_text().split())
        expected = "No space left on device"
    else:
        # RLIMIT_FSIZE of 1 MiB (`ulimit -f 1024`): a write past it fails with EFBIG (Python ignores SIGXFSZ)
        run = download(model_dir, env, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)))
        on_disk = {p.name for p in disk_dir.iterdir()}
        kept = {p.name for p in staging_of(model_dir).iterdir()}
        expected = "File too large"
    error = run.one_line_error()
    assert f"{expected} writing the model to {staging_of(model_dir)}" in error
    assert "run again to resume" in error
    assert on_disk == {"model.download"}  # no model_path at all
    assert "tokenizer.json" in kept and "model.safetensors" not in kept  # the completed files are kept
