"""bfloat16 against float32 on a real model: do the answers hold?

Greedy answers to a set of chat prompts: float32 generates; both dtypes then score that answer
in one forward pass. Greedy bfloat16 would follow float32's answer exactly up to the first
position where its own argmax differs, so that position gives the identical answers and the
agreeing prefix without generating in bfloat16 (which is slow where torch emulates it); and
the log-probability each dtype gives float32's tokens gives their mean and max difference.
Run with transformers on the CPU, so it measures the numerics of bfloat16 weights and
activations on any CPU; vLLM's CPU kernels differ in order of operations, not in precision.

    python benchmarks/bf16_quality.py --model models/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

PROMPTS = [
    "What is the capital of France?", "What is the capital of Japan?", "What is 12 times 12?",
    "Name the largest planet in the solar system.", "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?", "Translate 'thank you' into Spanish.",
    "Give me three colours of the rainbow.", "What is photosynthesis, in one sentence?",
    "What is the chemical symbol for gold?", "How many days are there in a leap year?",
    "Write a haiku about the sea.", "What does a CPU do?", "Name a mammal that can fly.",
    "What language is spoken in Brazil?", "What is the square root of 81?",
    "Explain gravity to a child in one sentence.", "What is the opposite of 'ancient'?",
    "Which ocean is the largest?", "Suggest a name for a black cat.",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/results/bf16_quality.json")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    models = {dtype: AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, dtype)).eval()
              for dtype in ("float32", "bfloat16")}
    rows = []
    started = time.monotonic()
    for prompt in PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        with torch.inference_mode():
            out = models["float32"].generate(ids, max_new_tokens=args.max_tokens, do_sample=False,
                                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
            ref = out[0, ids.shape[1]:].tolist()
            full = torch.tensor([ids[0].tolist() + ref])
            logits = {dtype: model(full).logits[0, ids.shape[1] - 1:-1].float() for dtype, model in models.items()}
        logps = {d: torch.log_softmax(l, -1).gather(1, torch.tensor(ref)[:, None])[:, 0] for d, l in logits.items()}
        diff = (logps["float32"] - logps["bfloat16"]).abs()
        bf16_choice = logits["bfloat16"].argmax(-1).tolist()
        same = next((i for i, (a, b) in enumerate(zip(ref, bf16_choice)) if a != b), len(ref))
        rows.append({"prompt": prompt, "float32": tok.decode(ref, skip_special_tokens=True),
                     "identical": same == len(ref), "agree_prefix": same / max(len(ref), 1),
                     "logprob_abs_diff_mean": float(diff.mean()), "logprob_abs_diff_max": float(diff.max())})
        print(f"{'=' if rows[-1]['identical'] else '≠'} {prompt[:40]:40s} prefix {rows[-1]['agree_prefix']:.2f} "
              f"|Δlogp| mean {rows[-1]['logprob_abs_diff_mean']:.3f} max {rows[-1]['logprob_abs_diff_max']:.3f}", flush=True)
    summary = {
        "prompts": len(rows), "identical_answers": sum(r["identical"] for r in rows),
        "mean_agreeing_prefix": statistics.fmean(r["agree_prefix"] for r in rows),
        "logprob_abs_diff_mean": statistics.fmean(r["logprob_abs_diff_mean"] for r in rows),
        "logprob_abs_diff_max": max(r["logprob_abs_diff_max"] for r in rows),
        "seconds": round(time.monotonic() - started, 1), "torch": torch.__version__,
    }
    print(json.dumps(summary, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
