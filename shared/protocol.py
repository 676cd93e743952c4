"""Every message that crosses a process boundary, and nothing else: gateway <-> engine
worker (data socket), orchestrator <-> engine worker (control socket), and the
orchestrator's report that the gateway shows on /efficiency.

Messages are msgspec Structs encoded as msgpack arrays (`array_like`), tagged so
that each direction is one union decoded by one typed `Decoder`. Evolve the
schema by appending fields with defaults and bumping PROTOCOL_VERSION.
"""

from __future__ import annotations

import enum

import msgspec

PROTOCOL_VERSION = 8  # 2: GetStats/EngineStats; 3: chat, logprobs, echo, tokenize; 4: admission, SetLimits; 5: probe;
# 6: structured output (SamplingSpec.response_format), prompt_tokens on every Output;
# 7: EngineStats.engine_cpu_s; 8: EngineStats.loop_lag_max_s


class FinishReason(enum.IntEnum):
    STOP = 0  # an EOS token, a stop string or a stop token id
    LENGTH = 1  # max_tokens or the context length reached
    ABORT = 2  # aborted inside the engine

    @property
    def openai(self) -> str:
        return ("stop", "length", "abort")[self]


class _Msg(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag_field="t"):
    pass


# ---------------------------------------------------------------- gateway -> worker
class Hello(_Msg, tag="hello"):
    protocol_version: int
    client: str  # who connects: "gateway", "orchestrator", "test"


class StructuredOutput(msgspec.Struct, array_like=True, gc=False):
    """The answer's form (OpenAI's response_format), enforced by vLLM's structured outputs."""

    json_schema: str | None  # JSON text of the schema the answer must satisfy; None: any JSON object


class SamplingSpec(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """The sampling parameters the gateway validated, as vLLM's SamplingParams takes them."""

    max_tokens: int | None = None  # None: whatever fits in the context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    n: int = 1
    seed: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    min_p: float = 0.0
    logprobs: int | None = None  # None: none; k: the sampled token's and the k most likely
    logit_bias: list[tuple[int, float]] = []  # (token id, bias added to its logit)
    response_format: StructuredOutput | None = None  # None: free text


class ChatMessage(msgspec.Struct, array_like=True, gc=False):
    role: str  # system, user or assistant
    content: str


class Generate(_Msg, tag="gen"):
    rid: int  # multiplexing id, unique per connection
    prompt: str | list[int]  # text, or token ids (ignored when chat is set)
    params: SamplingSpec
    stream: bool = False  # deltas per engine step instead of one final Output
    request_id: str = ""  # the client-facing request id, for logs
    chat: list[ChatMessage] | None = None  # rendered with the model's chat template
    echo: bool = False  # the prompt's text comes first in each choice's text
    probe: bool = False  # the gateway's health probe: not refused, rate-limited or counted in the statistics


class Tokenize(_Msg, tag="tok"):
    rid: int
    text: str | None = None
    chat: list[ChatMessage] | None = None  # rendered with the chat template first
    add_special_tokens: bool = True
    add_generation_prompt: bool = True  # with chat: end with the opening of the assistant's turn


class Detokenize(_Msg, tag="detok"):
    rid: int
    tokens: list[int]


class Abort(_Msg, tag="abort"):
    rid: int


class GetStats(_Msg, tag="getstats"):
    rid: int  # answered by an EngineStats with the same rid
    window_s: float = 10.0  # latency percentiles over the requests finished this long ago or less


class SetLimits(_Msg, tag="setlimits"):
    """Control socket only: new admission limits, clamped to the ceilings; answered by LimitsSet."""

    rid: int
    max_num_seqs: int
    max_num_batched_tokens: int
    reason: str = ""


GatewayMessage = Hello | Generate | Abort | GetStats | Tokenize | Detokenize | SetLimits


# ---------------------------------------------------------------- worker -> gateway
class Welcome(_Msg, tag="welcome"):
    protocol_version: int
    model_name: str  # the configured model name (e.g. microsoft/Phi-3-mini-4k-instruct)
    model_path: str  # the folder the weights were loaded from
    served_names: list[str]
    max_model_len: int
    dtype: str
    demo_model: bool  # random weights: the real ones were not found
    load_seconds: float
    engine_pid: int
    parameter_count: int = 0
    kv_cache_tokens: int = 0  # what vLLM's KV cache holds, all sequences together
    kv_cache_bytes: int = 0
    engine_core: str = "process"  # where vLLM's EngineCore runs: "process" or "thread" (of the worker)


class HandshakeRefused(_Msg, tag="refused"):
    message: str


class TopLogprob(msgspec.Struct, array_like=True, gc=False):
    token: str
    logprob: float


class TokenLogprob(msgspec.Struct, array_like=True, gc=False):
    token: str  # the sampled token's text (or the prompt's, when echoed)
    logprob: float | None  # None only for the first token of an echoed prompt
    top: list[TopLogprob] = []  # the most likely tokens at this position, best first


class Choice(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    index: int
    text: str  # the whole text (final) or the new text (stream delta)
    tokens: int  # tokens generated in this message for this choice
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token in this message, when asked


class Output(_Msg, tag="out"):
    rid: int
    choices: list[Choice]
    finished: bool = False  # the last message for this rid
    prompt_tokens: int = 0  # the prompt's tokens (on every message; count them from the last)
    ttft_s: float = 0.0  # last message: engine arrival -> first token (0: unknown)
    decode_s: float = 0.0  # last message: first token -> last token


class Failure(_Msg, tag="fail"):
    """The request with this rid ended with an error; nothing more will come for it."""

    rid: int
    status: int  # the HTTP status this maps to: 400 bad input, 503 engine gone, 500 other
    message: str
    param: str | None = None  # the request field at fault, if any
    code: str | None = None
    retry_after_s: float = 0.0  # 429: when to try again


class EngineStats(_Msg, tag="stats"):
    """The engine's state now, from vLLM's scheduler (as of its last step) and the worker."""

    rid: int
    running: int  # sequences being generated
    waiting: int  # admitted to vLLM but not yet scheduled
    kv_cache_usage: float  # fraction of KV-cache blocks in use, 0..1
    max_num_seqs: int  # the limits in force
    max_num_batched_tokens: int
    in_flight: int  # requests the worker holds (all connections)
    prompt_tokens_total: int
    generation_tokens_total: int
    requests_finished_total: int
    # whose CPU is the EngineCore's: vLLM's own processes under the worker, or the worker itself when
    # the EngineCore runs on a thread of it (engine_core: thread)
    engine_core_pids: list[int] = []
    seconds_since_output: float = 0.0  # how long ago the engine last produced a token
    # admission (service/engine/admission.py)
    queued: int = 0  # sequences waiting: for admission here, and in vLLM's queue beyond max_num_seqs
    tokens_in_flight: int = 0
    max_num_seqs_ceiling: int = 0
    max_num_batched_tokens_ceiling: int = 0
    limits_reason: str = ""
    admitted_total: int = 0
    refused_total: dict[str, int] = {}  # by reason: queue_full, too_slow, rate_limit
    estimated_wait_s: float = 0.0
    # latency of the requests finished within the asked window, arrival in the worker -> last token
    window_requests: int = 0
    ttft_p50_s: float = 0.0
    ttft_p95_s: float = 0.0
    e2e_p50_s: float = 0.0
    e2e_p95_s: float = 0.0
    service_p95_s: float = 0.0  # admission into vLLM -> last token: the part the limits control
    mean_service_s: float = 0.0  # mean time in vLLM (moving average), used for the estimated wait
    # CPU seconds the EngineCore process has used: a step can take tens of seconds on a busy
    # or small CPU, and busy without output is slow, not stalled
    engine_cpu_s: float = 0.0
    # the worker's event loop: the worst lateness of a timer over the last 10 s (shared/loop_lag.py)
    loop_lag_max_s: float = 0.0


class LimitsSet(_Msg, tag="limitsset"):
    rid: int
    max_num_seqs: int  # now in force
    max_num_batched_tokens: int
    max_num_seqs_ceiling: int
    max_num_batched_tokens_ceiling: int


class TokenizeResult(_Msg, tag="tokres"):
    rid: int
    tokens: list[int]
    text: str


WorkerMessage = Welcome | HandshakeRefused | Output | Failure | EngineStats | TokenizeResult | LimitsSet


# ---------------------------------------------------------------- orchestrator -> gateway
# Written by the orchestrator as JSON to <runtime_dir>/efficiency.json after every sample
# (atomically: a temporary file, then rename); the gateway reads it for /efficiency.
class Decision(msgspec.Struct, kw_only=True):
    at: float  # unix time
    action: str  # "decrease", "increase" or "hold"
    reason: str
    max_num_seqs: int  # in force after the decision
    max_num_batched_tokens: int
    inputs: dict[str, float]  # what it was decided on


class ProcessSample(msgspec.Struct, kw_only=True):
    role: str  # engine, engine-core, gateway, orchestrator, serve
    pid: int
    rss_mb: float
    cpu_percent: float  # of one core, over the last interval


class CgroupSample(msgspec.Struct, kw_only=True):
    path: str
    version: int  # 2 or 1 (0: none found)
    memory_current_mb: float | None = None  # charged to the group, page cache included
    memory_max_mb: float | None = None  # None: no limit
    memory_high_mb: float | None = None
    memory_pressure_some_avg10: float | None = None  # % of time some task stalled on memory
    memory_pressure_full_avg10: float | None = None
    cpu_pressure_some_avg10: float | None = None
    cpu_throttled_periods: int | None = None
    cpu_throttled_s: float | None = None
    # memory_current_mb less the inactive page cache, which the kernel reclaims before it
    # would kill anything (the kubelet's working set): what the memory policy steers on
    memory_working_set_mb: float | None = None


class EfficiencyReport(msgspec.Struct, kw_only=True):
    at: float  # unix time of the sample
    interval_s: float
    efficiency_mode: bool
    connected: bool  # the orchestrator reached the engine's control socket this time
    engine_pid: int = 0  # the engine worker it reached
    processes: list[ProcessSample] = []
    cgroup: CgroupSample | None = None
    system_memory_used_percent: float = 0.0
    system_memory_available_mb: float = 0.0
    requests_per_s: float = 0.0
    tokens_per_s: float = 0.0  # prompt + generated
    generated_tokens_per_s: float = 0.0
    cpu_seconds_per_s: float = 0.0  # the service's processes together
    tokens_per_cpu_second: float = 0.0
    tokens_per_gb_second: float = 0.0
    memory_limit_mb: float = 0.0  # the limit the policy keeps to: cgroup memory.max, else memory_gb
    memory_used_mb: float = 0.0  # cgroup memory.current, else the processes' RSS
    decisions: list[Decision] = []  # the last ones, newest last
