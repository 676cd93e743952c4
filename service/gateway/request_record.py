"""What the gateway learned about one generation request, for its log line and the metrics."""

from __future__ import annotations

from dataclasses import dataclass

from shared import protocol as p


@dataclass
class RequestRecord:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float = 0.0
    itl_s: float = 0.0


def request_record(outputs: list[p.Output], prompt_tokens: int, completion_tokens: int) -> RequestRecord:
    rec = RequestRecord(prompt_tokens, completion_tokens)
    timed = [o for o in outputs if o.ttft_s > 0]
    if timed:
        rec.ttft_s = max(o.ttft_s for o in timed)
        gaps = completion_tokens - len(timed)  # token-to-token intervals (n=1 per output)
        if gaps > 0:
            rec.itl_s = sum(o.decode_s for o in timed) / gaps
    return rec
