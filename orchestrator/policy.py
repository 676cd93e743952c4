"""The efficiency policy: steer the engine's admission limits toward the latency and memory
targets while keeping as much throughput as they allow.

The latency the limits control is a request's time inside vLLM (admission to last token):
a larger batch makes every step, and so every request, slower. Time spent waiting for
admission is not theirs to fix (lowering the limits would only lengthen the queue): the
engine's admission refuses what would wait too long.

AIMD with hysteresis, one decision per sample:
- decrease (×0.7, at least 1) when memory is at 90 % of its limit or memory pressure
  stalls tasks while requests run and the load's own share of the memory (above the last
  idle sample) is worth freeing, or when the p95 time in vLLM is over 80 % of `target_latency_ms`; a
  latency decrease keeps the sequences that `max_throughput_rps` needs (Little's law:
  the rate times the mean time a request spends in vLLM), so trimming for latency never
  takes the service below the throughput it is sized for (memory is not floored: it is hard);
- increase (+1/16 of the ceiling) while requests wait or are refused, the p95 time in vLLM
  is under half the target and memory under 80 %, or when the engine is idle and nothing
  was refused since the last sample (a quiet period restores the limits);
- hold in between (the band between 50 % and 80 % of the target), and for two samples
  after a decrease, so that the change shows in the latency before the next one.
The token budget moves with `max_num_seqs` in proportion to the ceilings, never under a
quarter of its ceiling (a long prompt would otherwise wait for the engine to empty).
Never below 1, never above the ceilings. With `efficiency_mode` false it decides nothing
and only observes.

Memory the limits cannot free is left alone: the weights, the preallocated KV cache and the
runtime are there at idle too (the idle footprint), and fewer sequences free none of it. At
idle the limits are restored whatever the memory; under load only memory above the idle
footprint counts as the load's, and a decrease needs it to be at least `LOAD_MEMORY_SHARE`
of the limit. Over the limit at idle is a sizing error (memory_gb below what the model
needs), reported in the reason, not a reason to cripple the batch.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from shared.config import Phi3MiniConfig
from shared.optimizations import optimization_settings
from shared.protocol import Decision


@dataclass(frozen=True)
class Observation:
    """What one decision is made on."""

    max_num_seqs: int  # limits in force
    max_num_batched_tokens: int
    max_num_seqs_ceiling: int
    max_num_batched_tokens_ceiling: int
    in_flight: int  # requests in the worker (admitted or queued)
    queued: int  # waiting for admission
    window_requests: int  # requests finished in the latency window
    service_p95_s: float  # admission into vLLM -> last token
    memory_used_mb: float
    memory_limit_mb: float
    memory_pressure: float | None = None  # % of time some task stalled on memory (avg10)
    refused: int = 0  # refused by admission since the last sample (demand beyond what was admitted)
    e2e_p95_s: float = 0.0  # arrival in the worker -> last token (logged, not steered on)
    mean_service_s: float = 0.0  # mean time a request spends in vLLM (admission -> last token)


class EfficiencyManager:
    DECREASE = 0.7
    SERVICE_SHARE = 0.8  # of the latency target that the time in vLLM may take
    LATENCY_HEADROOM = 0.5  # of the latency target: room to grow below it
    HEADROOM = 0.8  # of the memory limit: room to grow below it
    MEMORY_HIGH = 0.9  # of the memory limit: shrink above it
    PRESSURE_STALL = 10.0  # % (PSI some avg10): shrink above it
    LOAD_MEMORY_SHARE = 0.05  # of the memory limit: load-made memory worth shrinking the batch for
    COOLDOWN = 2  # samples without an increase (or another decrease) after a decrease
    MIN_REQUESTS = 3  # finished requests in the window before latency is judged
    HISTORY = 50  # decisions kept

    def __init__(self, config: Phi3MiniConfig | None = None) -> None:
        self.config = config or Phi3MiniConfig()
        self.target_s = self.config.target_latency_ms / 1000
        self.decisions: deque[Decision] = deque(maxlen=self.HISTORY)
        self.limits = (self.config.max_num_seqs, self.config.max_num_batched_tokens)
        self.ceilings = self.limits
        self._cooldown = 0
        self._idle_memory_mb: float | None = None  # the footprint at the last idle sample

    # ---------------------------------------------------------------- the policy
    def decide(self, obs: Observation, now: float | None = None) -> Decision:
        """The next limits and why; kept in `decisions` when they change anything."""
        self.ceilings = (obs.max_num_seqs_ceiling, obs.max_num_batched_tokens_ceiling)
        seqs, ceil_seqs = obs.max_num_seqs, obs.max_num_seqs_ceiling
        memory = obs.memory_used_mb / obs.memory_limit_mb if obs.memory_limit_mb > 0 else 0.0
        judged = obs.window_requests >= self.MIN_REQUESTS
        inputs = {"max_num_seqs": seqs, "in_flight": obs.in_flight, "queued": obs.queued, "refused": obs.refused,
                  "service_p95_ms": round(obs.service_p95_s * 1000, 1), "e2e_p95_ms": round(obs.e2e_p95_s * 1000, 1),
                  "target_ms": self.config.target_latency_ms,
                  "window_requests": obs.window_requests, "memory_fraction": round(memory, 3),
                  "memory_pressure": -1.0 if obs.memory_pressure is None else obs.memory_pressure}
        demand = ", ".join(part for part in (f"{obs.queued} requests wait" if obs.queued else "",
                                             f"{obs.refused} refused" if obs.refused else "") if part)
        cooling = self._cooldown > 0
        self._cooldown = max(0, self._cooldown - 1)
        idle = obs.in_flight == 0 and obs.queued == 0
        if idle:
            self._idle_memory_mb = obs.memory_used_mb
        memory_issue = self._memory_issue(obs, memory)
        action, reason, new = "hold", "within the band", seqs
        for_memory = False
        if not self.config.efficiency_mode:
            reason = "efficiency_mode is off: observing only"
        elif memory_issue and not idle and self._load_memory_mb(obs) >= self.LOAD_MEMORY_SHARE * obs.memory_limit_mb:
            action, reason, for_memory = "decrease", memory_issue, True
        elif judged and obs.service_p95_s > self.SERVICE_SHARE * self.target_s and not cooling:
            action, reason = "decrease", (f"p95 time in the engine {obs.service_p95_s * 1000:.0f} ms over "
                                          f"{self.SERVICE_SHARE:.0%} of the {self.config.target_latency_ms:g} ms target")
            floor = self.throughput_floor(obs)
            if seqs <= floor:
                action, reason = "hold", (f"{reason}, but max_num_seqs={seqs} is what max_throughput_rps="
                                          f"{self.config.max_throughput_rps:g} needs at "
                                          f"{obs.mean_service_s * 1000:.0f} ms per request")
        elif cooling:
            reason = "waiting for the last decrease to show"
        elif demand and memory < self.HEADROOM and (
                not judged or obs.service_p95_s < self.LATENCY_HEADROOM * self.target_s):
            action, reason = "increase", (f"{demand}; p95 time in the engine {obs.service_p95_s * 1000:.0f} ms "
                                          "has headroom" if judged else demand)
        elif obs.in_flight == 0 and not obs.refused and seqs < ceil_seqs:
            action, reason = "increase", "quiet: restoring the limits toward the ceilings"
        if action == "hold" and memory_issue and self.config.efficiency_mode:
            note = (f"{memory_issue} while idle: memory_gb is below this model's footprint" if idle else
                    f"{memory_issue}, but only {self._load_memory_mb(obs):.0f} MB of it comes with the "
                    "load: the rest is the idle footprint, which fewer sequences do not free")
            reason = note if reason == "within the band" else f"{reason}; {note}"
        if action == "decrease":
            new = max(1, min(seqs - 1, math.floor(seqs * self.DECREASE)))
            if not for_memory:  # a latency decrease: floored by max_throughput_rps (memory is not)
                new = max(new, self.throughput_floor(obs))
            self._cooldown = self.COOLDOWN
        elif action == "increase":
            new = min(ceil_seqs, seqs + max(1, ceil_seqs // 16))
        if new == seqs and action != "hold":
            action, reason = "hold", f"{reason}, but already at the {'floor' if new == 1 else 'ceiling'}"
        tokens = self._tokens_for(new, obs) if new != seqs else obs.max_num_batched_tokens
        decision = Decision(at=time.time() if now is None else now, action=action, reason=reason,
                            max_num_seqs=new, max_num_batched_tokens=tokens, inputs=inputs)
        self.limits = (new, tokens)
        if action != "hold":
            self.decisions.append(decision)
        return decision

    def _memory_issue(self, obs: Observation, memory: float) -> str:
        if memory >= self.MEMORY_HIGH:
            return f"memory at {memory:.0%} of its limit"
        if (obs.memory_pressure or 0.0) >= self.PRESSURE_STALL:
            return f"memory pressure: tasks stalled {obs.memory_pressure:.1f} % of the time"
        return ""

    def _load_memory_mb(self, obs: Observation) -> float:
        """Memory above the last idle sample: what the running requests hold (all of it
        before an idle sample has been seen, which errs toward freeing)."""
        return obs.memory_used_mb - (self._idle_memory_mb or 0.0)

    def throughput_floor(self, obs: Observation) -> int:
        """The sequences that serve `max_throughput_rps` at the current mean time in vLLM."""
        needed = math.ceil(self.config.max_throughput_rps * obs.mean_service_s)
        return min(obs.max_num_seqs_ceiling, max(needed, 1))

    @staticmethod
    def _tokens_for(seqs: int, obs: Observation) -> int:
        ceiling = obs.max_num_batched_tokens_ceiling
        share = round(ceiling * seqs / obs.max_num_seqs_ceiling)
        return min(ceiling, max(share, ceiling // 4, 1))

    # ---------------------------------------------------------------- status
    def get_optimization_status(self) -> dict[str, Any]:
        """What the efficiency settings do on this instance, and where the limits stand."""
        return {
            **optimization_settings(self.config),
            "limits": {"max_num_seqs": self.limits[0], "max_num_batched_tokens": self.limits[1]},
            "ceilings": {"max_num_seqs": self.ceilings[0], "max_num_batched_tokens": self.ceilings[1]},
            "decisions": len(self.decisions),
        }
