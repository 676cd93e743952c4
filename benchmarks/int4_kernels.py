"""The 4-bit GEMMs alone, on Phi-3-mini's projections (issue 31): `benchmarks/int4_kernels.py`.

torch's `_weight_int4pack_mm_for_cpu` against this service's `w4a8` (service/engine/kernels),
the same symmetric 4-bit weights (group 128), alternating in one process, bfloat16 in and out,
2 threads; the error of each against a float32 product with the same 4-bit weights. Repeated
calls read a small weight (the down projection's 12.6 MB) from the CPU's cache, which a model
reads once a step from memory: the gate/up projection (25 MB) is the truer figure.

    .venv/bin/python benchmarks/int4_kernels.py [--rows 1,4,16,256]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {"gate/up": (3072, 16384), "down": (8192, 3072), "qkv": (3072, 9216)}  # (in, out)
GROUP = 128


def _ms(fn, calls: int) -> float:
    fn(), fn()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,4,16,256")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import torch

    from service.engine import kernels

    torch.set_num_threads(args.threads)
    print("| projection | M | torch int4 (ms) | w4a8 (ms) | w4a8 / torch | error torch / w4a8 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, (k, n) in SHAPES.items():
        codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
        scales = (torch.rand(k // GROUP, n) * 0.01 + 0.001).to(torch.bfloat16)
        dense = (codes.float() - 8) * scales.float().repeat_interleave(GROUP, 0).t()
        packed, packed_scales = kernels.pack(codes, scales, GROUP)
        t4 = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
        t4_scales = torch.stack([scales, torch.zeros_like(scales)], -1).contiguous()
        for m in map(int, args.rows.split(",")):
            x = torch.randn(m, k).to(torch.bfloat16)
            want = x.float() @ dense.t()
            ours = lambda: kernels.mm(x, packed, packed_scales, GROUP)  # noqa: E731
            theirs = lambda: torch._weight_int4pack_mm_for_cpu(x, t4, GROUP, t4_scales)  # noqa: E731
            err = [((f().float() - want).norm() / want.norm()).item() for f in (theirs, ours)]
            calls = 10 if m > 16 else 30
            a, b = _ms(theirs, calls), _ms(ours, calls)
            print(f"| {label} {k} -> {n} | {m} | {a:.2f} | {b:.2f} | {a / b:.2f}x | {err[0]:.2%} / {err[1]:.2%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
