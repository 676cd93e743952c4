"""Two small lm-evaluation-harness tasks defined locally (YAML + JSONL, no dataset hub) and a
runner of PyPI's `lm-eval` against an OpenAI-compatible server: a log-likelihood task through
`local-completions` (echo + logprobs) and a `generate_until` task through
`local-chat-completions`. Used by tests/integration/test_lm_eval.py and benchmarks/lm_eval_compare.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

LOGLIKELIHOOD_TASK = "citadel_capitals_mc"
GENERATE_TASK = "citadel_arithmetic_gen"

_CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Spain", "Madrid"),
             ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Kenya", "Nairobi"),
             ("Peru", "Lima"), ("Norway", "Oslo"), ("Greece", "Athens"), ("Chile", "Santiago")]
_ARITHMETIC = [("2 + 2", "4"), ("3 + 5", "8"), ("10 - 7", "3"), ("6 * 2", "12"), ("9 + 1", "10"), ("15 - 5", "10")]

_MC_YAML = """task: LOGLIKELIHOOD_TASK
dataset_path: json
dataset_kwargs:
  data_files:
    test: DATA/capitals.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: What is the capital of {{country}}?\\nAnswer:"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_GEN_YAML = """task: GENERATE_TASK
dataset_path: json
dataset_kwargs:
  data_files:
    test: DATA/arithmetic.jsonl
test_split: test
output_type: generate_until
doc_to_text: "What is {{question}}? Answer with the number only."
doc_to_target: answer
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 16
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
metadata:
  version: 1.0
"""


def write_tasks(folder: Path) -> Path:
    """The two tasks' YAML and JSONL in `folder` (lm-eval's --include_path)."""
    folder.mkdir(parents=True, exist_ok=True)
    capitals = [c for _, c in _CAPITALS]
    with open(folder / "capitals.jsonl", "w") as f:
        for i, (country, capital) in enumerate(_CAPITALS):
            # four choices, the right one at a position that varies (lm-eval puts a space before each)
            others = [c for c in capitals if c != capital][i % 8: i % 8 + 3]
            choices = others[: i % 4] + [capital] + others[i % 4:]
            f.write(json.dumps({"country": country, "choices": choices, "label": i % 4}) + "\n")
    with open(folder / "arithmetic.jsonl", "w") as f:
        for question, answer in _ARITHMETIC:
            f.write(json.dumps({"question": question, "answer": answer}) + "\n")
    for task, text in ((LOGLIKELIHOOD_TASK, _MC_YAML), (GENERATE_TASK, _GEN_YAML)):
        (folder / f"{task}.yaml").write_text(text.replace("LOGLIKELIHOOD_TASK", LOGLIKELIHOOD_TASK)
                                             .replace("GENERATE_TASK", GENERATE_TASK).replace("DATA", str(folder)))
    return folder


def run_lm_eval(base_url: str, model: str, tokenizer: Path, tasks_dir: Path, out_dir: Path, chat: bool,
                timeout_s: float = 900) -> dict[str, Any]:
    """One `lm-eval run` in a subprocess: the log-likelihood task through local-completions
    (chat=False) or the generate_until task through local-chat-completions (chat=True).
    Returns {"metrics": {name: value}, "samples": [per-document records], "seconds": float}."""
    import time

    task = GENERATE_TASK if chat else LOGLIKELIHOOD_TASK
    if chat:
        model_args = f"model={model},base_url={base_url}/v1/chat/completions,num_concurrent=1,max_retries=1"
        extra = ["--apply_chat_template"]
    else:
        model_args = (f"model={model},base_url={base_url}/v1/completions,tokenizer={tokenizer},"
                      f"tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,max_retries=1")
        extra = []
    out_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "lm_eval", "run", "--model", "local-chat-completions" if chat else "local-completions",
            "--model_args", model_args, "--tasks", task, "--include_path", str(tasks_dir),
            "--output_path", str(out_dir), "--log_samples", "--batch_size", "1" if chat else "8", *extra]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(out_dir / "hf-datasets"), "OPENAI_API_KEY": "unused",
           "TOKENIZERS_PARALLELISM": "false"}
    started = time.monotonic()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout_s)
    seconds = time.monotonic() - started
    (out_dir / "lm_eval.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"lm-eval exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")
    (results_path,) = sorted(out_dir.rglob("results_*.json"))[-1:]
    results = json.loads(results_path.read_text())
    metrics = {k.split(",")[0]: v for k, v in results["results"][task].items()
               if isinstance(v, (int, float)) and "stderr" not in k}
    (samples_path,) = sorted(out_dir.rglob(f"samples_{task}_*.jsonl"))[-1:]
    samples = [json.loads(line) for line in samples_path.read_text().splitlines() if line.strip()]
    return {"metrics": metrics, "samples": samples, "seconds": seconds}


def loglikelihoods(samples: list[dict[str, Any]]) -> list[list[float]]:
    """Per document, the log-likelihood lm-eval computed for each choice."""
    return [[float(r[0][0]) for r in s["resps"]] for s in sorted(samples, key=lambda s: s["doc_id"])]


def generations(samples: list[dict[str, Any]]) -> list[str]:
    """Per document, the text generated (greedy)."""
    return [s["resps"][0][0] for s in sorted(samples, key=lambda s: s["doc_id"])]
