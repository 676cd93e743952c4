"""This service's own CPU kernel: 4-bit weights x 8-bit activations on AVX-512 VNNI (w4a8.c).

Built with the host's C compiler the first time it is used, into the user's cache (one file
per source, flags and compiler: a change to any of them builds a new one), and called through
ctypes. It is compiled with -fopenmp and links libgomp by its soname: in a process where torch
has loaded its libgomp.so.1 the same runtime is used, the same threads (OMP_NUM_THREADS).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).with_name("w4a8.c")
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vnni", "-fopenmp", "-shared", "-fPIC")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512_vnni")
BLOCK = 16  # outputs per block: one int32 lane each
LAYOUT = 1  # of pack()'s output: part of the prepared weights' name, raised with any change to it


def supported(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU has the instructions the kernel is built for."""
    from service.engine.prepared_weights import cpu_flags

    return set(CPU_FLAGS) <= cpu_flags(cpuinfo)


def _compiler() -> str:
    return os.environ.get("CC", "cc")


def library_path(cache_dir: Path) -> Path:
    version = subprocess.run([_compiler(), "--version"], capture_output=True, text=True, check=True).stdout
    digest = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, version]).encode()).hexdigest()[:16]
    return cache_dir / f"w4a8-{digest}.so"


def _cache_dir() -> Path:
    from service.engine.settings import cache_dir

    return cache_dir() / "kernels"


@cache
def load() -> Any:
    """The kernel's library, built first where this host has none for this source."""
    path = library_path(_cache_dir())
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + f".partial-{os.getpid()}")
        subprocess.run([_compiler(), *FLAGS, str(SOURCE), "-o", str(partial), "-lm"], check=True,
                       capture_output=True, timeout=300)
        os.replace(partial, path)
    lib = ctypes.CDLL(str(path))
    lib.citadel_w4a8_mm.restype = ctypes.c_int
    lib.citadel_w4a8_mm.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                    ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def pack(codes: Any, scales: Any, group: int) -> tuple[Any, Any]:
    """GPTQ's symmetric 4-bit weight, unpacked: `codes` [N, K] (0..15, w = (q - 8) * scale) and
    `scales` [K / group, N], into the kernel's layout: (uint8 [N/16, K/8, 64], float [N/16, K/group, 16])."""
    import torch

    n, k = codes.shape
    if n % BLOCK or k % group or group % 8:
        raise ValueError(f"w4a8 needs N % {BLOCK} == 0 and K % group == 0 (N={n}, K={k}, group={group})")
    # [N/16 block, 16 lane, K/8 octet, 2 half, 4 j] -> [block, octet, lane, j, half]
    t = codes.to(torch.uint8).view(n // BLOCK, BLOCK, k // 8, 2, 4).permute(0, 2, 1, 4, 3)
    packed = (t[..., 0] | (t[..., 1] << 4)).contiguous().view(n // BLOCK, k // 8, BLOCK * 4)
    s = scales.to(torch.float32).t().contiguous().view(n // BLOCK, BLOCK, k // group).transpose(1, 2).contiguous()
    return packed, s


_registered = False


def mm(x: Any, packed: Any, scales: Any, group: int) -> Any:
    """x [M, K] bfloat16 times the packed weight: [M, N] bfloat16. Eager, a direct call (no
    dispatcher on a path taken 128 times a step); under torch.compile, the torch operator
    `torch.ops.citadel.w4a8_mm` (register() first), which it keeps whole."""
    import torch

    if torch.compiler.is_compiling():
        return torch.ops.citadel.w4a8_mm(x, packed, scales, group)
    return _mm(x, packed, scales, group)


def _mm(x: Any, packed: Any, scales: Any, group: int) -> Any:
    import torch

    x = x.contiguous()
    m, k = x.shape
    n = packed.shape[0] * BLOCK
    out = torch.empty(m, n, dtype=torch.bfloat16)
    if load().citadel_w4a8_mm(x.data_ptr(), m, k, packed.data_ptr(), scales.data_ptr(), n, group, out.data_ptr()):
        raise MemoryError("w4a8: out of memory for the quantized activations")
    return out


def register() -> None:
    """Make the operator; before a model that uses it is compiled (torch.compile cannot trace this)."""
    global _registered
    import torch

    if _registered:
        return

    # (the schema spelled out: this module's annotations are strings, and torch is imported late,
    # after the engine's environment is set)
    @torch.library.custom_op("citadel::w4a8_mm", mutates_args=(),
                             schema="(Tensor x, Tensor packed, Tensor scales, int group) -> Tensor")
    def w4a8_mm(x: Any, packed: Any, scales: Any, group: int) -> Any:
        return _mm(x, packed, scales, group)

    @w4a8_mm.register_fake
    def _(x: Any, packed: Any, scales: Any, group: int) -> Any:
        return x.new_empty(x.shape[0], packed.shape[0] * BLOCK, dtype=torch.bfloat16)

    _registered = True
