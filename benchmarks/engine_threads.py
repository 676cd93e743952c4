"""The engine's OpenMP threads: this service with `engine_threads` 1 against every core, on one
model, one after the other in one run, `--rounds` of each figure (issue 18's threads rule):
c=1 mean latency, `ab -c 50` requests/s, output tokens per CPU-second at c=50, peak tree RSS
(benchmarks/ab_setting.py measures them).

    .venv/bin/python benchmarks/engine_threads.py --model models/demo [--rounds 3]

Prints the medians and the ratio (every core / one thread); writes
benchmarks/results/engine_threads-<model>.json. The rule `engine_threads: 0` applies
(shared/optimizations.py, `engine_thread_count`) was read from these runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ab_setting import compare  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=300, help="per c=50 load")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    compare(args.model, "engine_threads", ["1", str(cores)], args.rounds, args.requests)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
