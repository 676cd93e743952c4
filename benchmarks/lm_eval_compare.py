"""The same lm-eval tasks (benchmarks/lm_eval_tasks.py: a log-likelihood task through
local-completions, a generate_until task through local-chat-completions) against this service
and vLLM's own OpenAI server, on the same model, float32, greedy; one server at a time (the
machine has 2 cores). The scores must agree; so must each document's log-likelihoods (to
float tolerance) and generated text.

    .venv/bin/python benchmarks/lm_eval_compare.py [--model DIR] [--out FILE]

The model is models/smollm2-135m-instruct (`make real-model`) when it is there, else the
random-weight demo model. Both servers run eager (no torch.compile warm-up; the same
engine path for both)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.lm_eval_tasks import generations, loglikelihoods, run_lm_eval, write_tasks  # noqa: E402
from benchmarks import servers  # noqa: E402
from benchmarks.servers import RESULTS_DIR, Server, engine_config  # noqa: E402
from service.local import ROOT, ServiceProcess, demo_model_dir  # noqa: E402

REAL_MODEL_DIR = ROOT / "models" / "smollm2-135m-instruct"
SERVED = "model"
LOGPROB_TOLERANCE = 1e-3  # float32 sums of a few log-probabilities, batched differently by the two servers
STARTUP_TIMEOUT_S = 1200.0


def start_citadel(model: Path) -> Server:
    svc = ServiceProcess(model_path=str(model), served_model_name=SERVED, enforce_eager="true", dtype="float32",
                         log_level="WARNING")
    svc.start()
    assert svc.proc is not None
    return Server("citadel", svc.base_url, svc.proc, svc.stop)


def start_vllm(model: Path, log_path: Path) -> Server:
    return servers.start_vllm(engine_config(), log_path, model=model, served=SERVED, extra=("--enforce-eager",))


def evaluate(server: Server, model: Path, tasks: Path, out: Path) -> dict[str, Any]:
    started = time.monotonic()
    try:
        server.wait_ready(STARTUP_TIMEOUT_S)
        ready_s = time.monotonic() - started
        ll = run_lm_eval(server.url, SERVED, model, tasks, out / server.name / "ll", chat=False)
        gen = run_lm_eval(server.url, SERVED, model, tasks, out / server.name / "gen", chat=True)
    finally:
        server.stop()
    return {"ready_s": ready_s, "loglikelihood": ll, "generate": gen}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "lm_eval_compare.json")
    args = parser.parse_args()
    model = args.model or (REAL_MODEL_DIR if (REAL_MODEL_DIR / "config.json").exists() else demo_model_dir())
    work = Path(tempfile.mkdtemp(prefix="lm-eval-compare-"))
    tasks = write_tasks(work / "tasks")
    print(f"model {model}; work dir {work}", flush=True)
    runs = {}
    for name, start in (("citadel", lambda: start_citadel(model)),
                        ("vllm", lambda: start_vllm(model, work / "vllm.log"))):
        runs[name] = evaluate(start(), model, tasks, work)
        print(name, "ready in", round(runs[name]["ready_s"], 1), "s;",
              runs[name]["loglikelihood"]["metrics"], runs[name]["generate"]["metrics"], flush=True)

    c, v = runs["citadel"], runs["vllm"]
    ll_c, ll_v = loglikelihoods(c["loglikelihood"]["samples"]), loglikelihoods(v["loglikelihood"]["samples"])
    max_diff = max(abs(a - b) for da, db in zip(ll_c, ll_v) for a, b in zip(da, db))
    gen_c, gen_v = generations(c["generate"]["samples"]), generations(v["generate"]["samples"])
    same_text = sum(a == b for a, b in zip(gen_c, gen_v))
    report = {
        "model": str(model.relative_to(ROOT) if model.is_relative_to(ROOT) else model),
        "dtype": "float32", "greedy": True, "enforce_eager": True,
        "citadel": {"loglikelihood": c["loglikelihood"]["metrics"], "generate": c["generate"]["metrics"],
                    "lm_eval_seconds": [c["loglikelihood"]["seconds"], c["generate"]["seconds"]]},
        "vllm": {"loglikelihood": v["loglikelihood"]["metrics"], "generate": v["generate"]["metrics"],
                 "lm_eval_seconds": [v["loglikelihood"]["seconds"], v["generate"]["seconds"]]},
        "max_abs_loglikelihood_diff": max_diff,
        "same_generations": f"{same_text} of {len(gen_c)}",
        "generations": {"citadel": gen_c, "vllm": gen_v},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "generations"}, indent=1))
    agree = (c["loglikelihood"]["metrics"] == v["loglikelihood"]["metrics"]
             and c["generate"]["metrics"] == v["generate"]["metrics"] and max_diff <= LOGPROB_TOLERANCE
             and same_text == len(gen_c))
    print("AGREE" if agree else "DISAGREE")
    sys.exit(0 if agree else 1)


if __name__ == "__main__":
    main()
