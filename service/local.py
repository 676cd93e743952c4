"""`citadel-llm serve` as a child process on free ports of 127.0.0.1, with its own runtime
dir: what the test suite and the benchmarks start and stop, and what they load it with."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 300.0  # a cold torch.compile of the demo model takes ~30 s; CI may be slower


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def demo_model_dir() -> Path:
    path = Path(os.environ.get("PHI_3_MINI_DEMO_MODEL_DIR", ROOT / "models" / "demo"))
    if not (path / "config.json").exists():
        from service.demo_model import make_demo_model

        make_demo_model(path)
    return path


class ServiceProcess:
    """`citadel-llm serve` on a free port of 127.0.0.1 with its own runtime dir."""

    def __init__(self, **settings: str) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="citadel-"))
        self.log_path = self.runtime_dir / "serve.log"
        self.env = {
            **os.environ,
            "PHI_3_MINI_HOST": "127.0.0.1",
            "PHI_3_MINI_PORT": str(self.port),
            "PHI_3_MINI_METRICS_PORT": str(self.metrics_port),
            "PHI_3_MINI_RUNTIME_DIR": str(self.runtime_dir),
            "PHI_3_MINI_MODEL_PATH": str(self.runtime_dir / "no-weights-here"),
            "PHI_3_MINI_DEMO_MODEL_DIR": str(demo_model_dir()),
            "PHI_3_MINI_MAX_NUM_SEQS": "16",
            "PHI_3_MINI_MAX_NUM_BATCHED_TOKENS": "512",
            # the same numerics on every machine: `auto` is bfloat16 where the CPU has bf16
            # instructions, and exact comparisons (greedy text, log-probabilities) are written
            # for float32; the peer server in the benchmarks runs float32 too
            "PHI_3_MINI_DTYPE": "float32",
            **{f"PHI_3_MINI_{k.upper()}": v for k, v in settings.items()},
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, preexec_fn: Callable[[], None] | None = None) -> ServiceProcess:
        """Start serve; `preexec_fn` runs in the child before exec (e.g. to join a cgroup,
        which everything serve starts then inherits)."""
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "service", "serve"], env=self.env,
                                     stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     preexec_fn=preexec_fn)
        return self

    def wait_healthy(self, timeout_s: float = STARTUP_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout_s
        last: object = None
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, f"serve exited:\n{self.tail()}"
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                last = exc.read()
            except OSError as exc:
                last = exc
            time.sleep(0.25)
        raise AssertionError(f"not healthy after {timeout_s} s (last: {last!r}):\n{self.tail()}")

    def children(self) -> dict[str, psutil.Process]:
        """The role processes, by role (engine, gateway, orchestrator)."""
        assert self.proc is not None
        found = {}
        for child in psutil.Process(self.proc.pid).children():
            try:
                cmd = " ".join(child.cmdline())
            except psutil.Error:  # exited, not yet reaped by serve
                continue
            for role in ("engine", "gateway", "orchestrator"):
                if cmd.endswith(role) or f" {role} " in f"{cmd} ":
                    found[role] = child
        return found

    def replaced(self, role: str, old: psutil.Process) -> bool:
        """A process of this role runs, and it is not `old` (one look at the tree: the role
        can vanish between two looks while serve restarts it)."""
        now = self.children().get(role)
        return now is not None and now.pid != old.pid

    def tree(self) -> list[psutil.Process]:
        assert self.proc is not None
        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            for proc in self.tree():
                proc.kill()
            raise
        finally:
            self._log.close()

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def drop_page_cache(path: Path) -> None:
    """Drop the page cache of a file or of every file under a folder (pages no process maps),
    so that the next reader reads them in and is charged for them in its own memory cgroup."""
    for f in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def longest_tokens(count: int) -> list[int]:
    """The ids of the demo model's `count` longest tokens (to bias answers towards large events)."""
    vocab = json.loads((demo_model_dir() / "tokenizer.json").read_text())["model"]["vocab"]
    return [i for _, i in sorted(((-len(tok), i) for tok, i in vocab.items()))[:count]]


@contextmanager
def busy_cores(bound_s: float = 900.0) -> Iterator[None]:
    """A CPU-bound process per core, at the caller's priority, until the block ends (and never
    longer than bound_s): a host whose cores others take."""
    loop = f"import time\nend = time.monotonic() + {bound_s}\nwhile time.monotonic() < end: pass"
    burners = [subprocess.Popen([sys.executable, "-c", loop]) for _ in range(os.cpu_count() or 2)]
    try:
        yield
    finally:
        for burner in burners:
            burner.kill()
            burner.wait(10)
