"""Starting the two systems under test on the same demo model and engine settings:
this service (`citadel-llm serve`) and vLLM's own OpenAI server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from service.engine.settings import kv_cache_args  # noqa: E402
from shared.config import Phi3MiniConfig  # noqa: E402
from service.local import ServiceProcess, demo_model_dir, free_port  # noqa: E402


class Server:
    """One system under test: its URL, its process tree, and a sampler of the tree's RSS."""

    def __init__(self, name: str, url: str, proc: subprocess.Popen[bytes], stop: object) -> None:
        self.name, self.url, self.proc, self._stop = name, url, proc, stop
        self.ready_s = 0.0  # from this object's making (just after the process's start) to /health 200
        self._started = time.monotonic()
        self.metrics_url = ""  # where the system serves Prometheus metrics, if it is known
        self.log_path: Path | None = None  # its output
        self.peak_rss_mb = 0.0
        self._sampling = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def tree_rss_mb(self) -> float:
        return sum(_safe(lambda p: p.memory_info().rss, proc) for proc in self._tree()) / 2**20

    def tree_cpu_s(self) -> float:
        return sum(_safe(lambda p: sum(p.cpu_times()[:2]), proc) for proc in self._tree())

    def _sample(self) -> None:
        while not self._sampling.wait(0.25):
            self.peak_rss_mb = max(self.peak_rss_mb, self.tree_rss_mb())

    def wait_ready(self, timeout_s: float = 600, give_up: Callable[[], str] = lambda: "") -> None:
        """Until /health answers 200; RuntimeError if the server exits, `give_up` says why not
        to wait any longer (e.g. an OOM kill that a supervisor would only restart), or time runs out."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}")
            if why := give_up():
                raise RuntimeError(f"{self.name}: {why}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        self.ready_s = time.monotonic() - self._started
                        self._thread.start()
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready")

    def stop(self) -> None:
        self._sampling.set()
        self._stop()  # type: ignore[operator]


def _safe(measure: Callable[[psutil.Process], float], proc: psutil.Process) -> float:
    try:
        return measure(proc)
    except psutil.Error:  # exited between listing and measuring
        return 0.0


def bench_model() -> Path:
    """The model both systems serve: $CITADEL_BENCH_MODEL (a model folder, e.g.
    models/smollm2-135m-instruct from `make real-model`), else the demo model."""
    chosen = os.environ.get("CITADEL_BENCH_MODEL")
    return (ROOT / chosen).resolve() if chosen else demo_model_dir()


def engine_config() -> Phi3MiniConfig:
    return Phi3MiniConfig()  # the shipped defaults: max_num_seqs 32, max_num_batched_tokens 1024


# Throughput against throughput: the same fixed limits as vLLM's server and no load shedding
# (efficiency mode refuses, with 429, what would miss target_latency_ms; goodput.py measures that).
CAPACITY = {"efficiency_mode": "false"}


def model_card(server: Server) -> dict[str, Any]:
    """What a running citadel-llm really serves: its model card (dtype, kv_cache_bytes, ...)."""
    with urllib.request.urlopen(f"{server.url}/v1/models/phi-3-mini", timeout=30) as resp:
        return json.loads(resp.read())


def start_citadel(config: Phi3MiniConfig, name: str = "citadel", preexec_fn: Callable[[], None] | None = None,
                  **settings: str) -> Server:
    """This service with the engine settings of `config`, plus `settings` (PHI_3_MINI_* names);
    `preexec_fn` runs in its process before exec (e.g. to join a memory cgroup)."""
    svc = ServiceProcess(**{"model_path": str(bench_model()), "max_num_seqs": str(config.max_num_seqs),
                            "max_num_batched_tokens": str(config.max_num_batched_tokens), "log_level": "WARNING",
                            **settings})
    svc.start(preexec_fn)
    assert svc.proc is not None
    server = Server(name, svc.base_url, svc.proc, svc.stop)
    server.log_path = svc.log_path
    server.metrics_url = f"http://127.0.0.1:{svc.metrics_port}/metrics"
    return server


def start_vllm(config: Phi3MiniConfig, log_path: Path, model: Path | None = None, served: str = "phi-3-mini",
               extra: tuple[str, ...] = (), dtype: str = "float32", kv_cache_bytes: int = 0,
               preexec_fn: Callable[[], None] | None = None) -> Server:
    """vLLM's own server on `model` (default: bench_model()) in `dtype` (float32: what
    ServiceProcess, and so start_citadel, pins this service to unless told) with the engine
    settings of `config` and this service's KV cache arguments, or exactly `kv_cache_bytes` of
    cache (what a running citadel-llm reports it got); `extra` are more of its flags."""
    model = model or bench_model()
    port = free_port()
    kv = ({"kv_cache_memory_bytes": kv_cache_bytes} if kv_cache_bytes
          else kv_cache_args(config, model, dtype))
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", served, "--dtype", dtype, *extra,
            "--max-model-len", str(config.max_model_len), "--max-num-seqs", str(config.max_num_seqs),
            "--max-num-batched-tokens", str(config.max_num_batched_tokens),
            *[f"--{k.replace('_', '-')}={v}" for k, v in kv.items()],
            "--host", "127.0.0.1", "--port", str(port), "--disable-log-stats", "--disable-uvicorn-access-log"]
    env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"}
    log = open(log_path, "wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=preexec_fn)

    def stop() -> None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
        log.close()

    server = Server("vllm", f"http://127.0.0.1:{port}", proc, stop)
    server.log_path = log_path
    return server


def wait_quiet(servers: list[Server], max_cores: float = 0.1, window_s: float = 0.5, timeout_s: float = 15.0) -> float:
    """Wait until every system is idle (all its processes together below max_cores over a
    window), so that one system's after-run activity does not tax the next run of the other.
    Returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        before = [s.tree_cpu_s() for s in servers]
        time.sleep(window_s)
        after = [s.tree_cpu_s() for s in servers]
        if all((a - b) / window_s < max_cores for a, b in zip(after, before)):
            break
    return time.monotonic() - started


def write_result(name: str, report: dict[str, Any]) -> Path:
    """A benchmark's report as JSON under benchmarks/results (not committed); prints where."""
    out = RESULTS_DIR / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return out
