"""Heap probe for benchmarks/overload_memory.py --heap-probe (never used by the service itself).

On PYTHONPATH only for the benchmark's service. In a process that may become vLLM's
EngineCore (a multiprocessing spawn child, or a fork child of the engine worker) it starts
a daemon thread that waits for a request file `$HEAP_PROBE_DIR/request-<pid>-<tag>`.
Tag `start` starts tracemalloc ($HEAP_PROBE_FRAMES frames, 12 by default; started only then
because tracing vLLM's start-up, torch.compile included, takes minutes): what is traced is
what was allocated after it. Any other tag writes `<pid>-<tag>.snap` (a tracemalloc
snapshot) and `<pid>-<tag>.json` (traced total, live gc objects by type, malloc_info).
The request is then renamed to `done-<pid>-<tag>`.
"""

from __future__ import annotations

import os
import sys


def _probe_thread(folder: str) -> None:
    import ctypes
    import gc
    import json
    import time
    import tracemalloc
    from collections import Counter

    pid = os.getpid()
    prefix = f"request-{pid}-"
    while True:
        time.sleep(0.5)
        try:
            names = [n for n in os.listdir(folder) if n.startswith(prefix)]
        except OSError:
            continue
        for name in names:
            tag = name[len(prefix):]
            if tag == "start":
                tracemalloc.start(int(os.environ.get("HEAP_PROBE_FRAMES", "12")))
                os.rename(os.path.join(folder, name), os.path.join(folder, f"done-{pid}-{tag}"))
                continue
            snap = tracemalloc.take_snapshot()
            snap.dump(os.path.join(folder, f"{pid}-{tag}.snap"))
            types = Counter(type(o).__qualname__ for o in gc.get_objects())
            info = {"traced": tracemalloc.get_traced_memory(), "gc_counts": gc.get_count(),
                    "types": dict(types.most_common(60))}
            try:  # glibc's own view of its arenas
                libc = ctypes.CDLL("libc.so.6")
                buf = ctypes.c_char_p()
                size = ctypes.c_size_t()
                libc.open_memstream.restype = ctypes.c_void_p
                stream = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
                libc.malloc_info(0, ctypes.c_void_p(stream))
                libc.fclose(ctypes.c_void_p(stream))
                info["malloc_info"] = ctypes.string_at(buf, size.value).decode()
            except Exception as exc:  # noqa: BLE001
                info["malloc_info"] = repr(exc)
            with open(os.path.join(folder, f"{pid}-{tag}.json"), "w") as out:
                json.dump(info, out)
            os.rename(os.path.join(folder, name), os.path.join(folder, f"done-{pid}-{tag}"))


def _start() -> None:
    import threading

    folder = os.environ.get("HEAP_PROBE_DIR")
    if not folder:
        return
    threading.Thread(target=_probe_thread, args=(folder,), name="heap-probe", daemon=True).start()


def _install() -> None:
    if not os.environ.get("HEAP_PROBE_DIR"):
        return
    try:
        with open("/proc/self/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return
    if "spawn_main" in cmd and "resource_tracker" not in cmd:
        _start()  # a spawned child: vLLM's EngineCore when it spawns
    elif cmd.rstrip().endswith(" engine"):
        os.register_at_fork(after_in_child=_start)  # vLLM's EngineCore when it forks


_install()
del sys
