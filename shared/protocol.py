"""Every message that crosses the gateway <-> engine worker boundary, and nothing else.

Messages are msgspec Structs encoded as msgpack arrays (`array_like`), tagged so
that each direction is one union decoded by one typed `Decoder`. Evolve the
schema by appending fields with defaults and bumping PROTOCOL_VERSION.
"""

from __future__ import annotations

import enum

import msgspec

PROTOCOL_VERSION = 3  # 2: GetStats/EngineStats; 3: chat, logprobs, echo, tokenize


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


class Tokenize(_Msg, tag="tok"):
    rid: int
    text: str | None = None
    chat: list[ChatMessage] | None = None  # rendered with the chat template first
    add_special_tokens: bool = True


class Detokenize(_Msg, tag="detok"):
    rid: int
    tokens: list[int]


class Abort(_Msg, tag="abort"):
    rid: int


class GetStats(_Msg, tag="getstats"):
    rid: int  # answered by an EngineStats with the same rid


GatewayMessage = Hello | Generate | Abort | GetStats | Tokenize | Detokenize


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


class HandshakeRefused(_Msg, tag="refused"):
    message: str


class TopLogprob(msgspec.Struct, array_like=True, gc=False):
    token: str
    logprob: float


class TokenLogprob(msgspec.Struct, array_like=True, gc=False):
    token: str  # the sampled token's text
    logprob: float
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
    prompt_tokens: int = 0  # set on the last message
    ttft_s: float = 0.0  # last message: engine arrival -> first token (0: unknown)
    decode_s: float = 0.0  # last message: first token -> last token


class Failure(_Msg, tag="fail"):
    """The request with this rid ended with an error; nothing more will come for it."""

    rid: int
    status: int  # the HTTP status this maps to: 400 bad input, 503 engine gone, 500 other
    message: str
    param: str | None = None  # the request field at fault, if any
    code: str | None = None


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
    engine_core_pids: list[int] = []  # vLLM's own processes under the worker
    seconds_since_output: float = 0.0  # how long ago the engine last produced a token


class TokenizeResult(_Msg, tag="tokres"):
    rid: int
    tokens: list[int]
    text: str


WorkerMessage = Welcome | HandshakeRefused | Output | Failure | EngineStats | TokenizeResult
