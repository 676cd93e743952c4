"""OpenAI-shaped request and response bodies, decoded and encoded with msgspec.

Bounds live in the types (`Meta`), so a bad value is a ValidationError naming the field,
and the OpenAPI document is generated from these same types. Unknown parameters are
refused by name, never silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

# Caps on what costs memory or time per request (documented in the README and the schema).
MAX_N = 16  # choices per prompt: each is a sequence in the KV cache
MAX_STOP = 16  # stop strings, and stop token ids
MAX_STOP_LEN = 256  # characters per stop string
MAX_PROMPTS = 64  # prompts in one completions request
MAX_TOP_LOGPROBS = 20  # vLLM's max_logprobs
MAX_LOGIT_BIAS = 300  # entries, as OpenAI allows
MAX_MESSAGES = 256
MAX_TOKENS_CAP = 1 << 20

Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
StopString = Annotated[str, Meta(min_length=1, max_length=MAX_STOP_LEN)]
Bias = Annotated[float, Meta(ge=-100.0, le=100.0)]
INT64_MAX = 2**63 - 1  # the largest integer the engine's wire protocol carries
TokenId = Annotated[int, Meta(ge=0, le=INT64_MAX)]  # beyond the vocabulary: a 400 from the engine


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, every chunk carries the usage so far


class _Format(msgspec.Struct, forbid_unknown_fields=True, tag_field="type"):
    pass


class TextFormat(_Format, tag="text"):
    """Free text: the default."""


class JsonObjectFormat(_Format, tag="json_object"):
    """Any JSON object (vLLM's structured outputs, json_object)."""


class JsonSchema(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: Annotated[str, Meta(max_length=1 << 16)] | None = None
    schema: dict[str, Any] | None = None  # the JSON Schema the answer satisfies; required here (vLLM too)
    strict: bool | None = None  # accepted: the grammar always holds the answer to the whole schema


class JsonSchemaFormat(_Format, tag="json_schema"):
    """A JSON value satisfying `json_schema.schema` (vLLM's structured outputs, json)."""

    json_schema: JsonSchema


# Another type (vLLM's structural_tag, a typo) is a 400 naming response_format.type.
ResponseFormat = TextFormat | JsonObjectFormat | JsonSchemaFormat


class SamplingFields(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Parameters both generation routes take."""

    model: str | None = None
    max_tokens: Annotated[int, Meta(ge=1, le=MAX_TOKENS_CAP)] | None = None  # None: what fits in the context
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: Annotated[int, Meta(ge=-1, le=INT64_MAX)] = -1  # -1 or 0: off
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.0
    n: Annotated[int, Meta(ge=1, le=MAX_N)] = 1
    stop: StopString | Annotated[list[StopString], Meta(max_length=MAX_STOP)] | None = None
    stop_token_ids: Annotated[list[TokenId], Meta(max_length=MAX_STOP)] | None = None
    seed: Annotated[int, Meta(ge=0, le=2**63 - 1)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, Meta(ge=0, le=MAX_TOKENS_CAP)] = 0
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: Annotated[float, Meta(gt=0.0, le=2.0)] = 1.0
    logit_bias: Annotated[dict[str, Bias], Meta(max_length=MAX_LOGIT_BIAS)] | None = None  # token id -> bias
    user: Annotated[str, Meta(max_length=256)] | None = None  # accepted, for the client's own tracking
    response_format: ResponseFormat | None = None  # chat's, and vLLM's on legacy completions too


class CompletionRequest(SamplingFields, kw_only=True):
    # A string, a list of strings, a list of token ids, or a list of lists of token ids.
    prompt: str | Annotated[list[Any], Meta(min_length=1)]
    echo: bool = False  # the prompt's text comes first in each choice
    logprobs: Annotated[int, Meta(ge=0, le=MAX_TOP_LOGPROBS)] | None = None  # top alternatives per token
    # OpenAI parameters this service does not implement: only their neutral value is accepted.
    best_of: Annotated[int, Meta(ge=1, le=1)] | None = None
    suffix: Annotated[str, Meta(max_length=0)] | None = None


class ContentPart(msgspec.Struct, kw_only=True):
    """One part of a message's content, as the official clients send it. Only text parts
    can be served (others get a 400 naming them); their other fields are not read."""

    type: Annotated[str, Meta(max_length=64)]
    text: Annotated[str, Meta(max_length=1 << 20)] | None = None


class ChatMessageIn(msgspec.Struct, forbid_unknown_fields=True):
    role: Literal["system", "user", "assistant"]
    content: Annotated[str, Meta(max_length=1 << 20)] | Annotated[list[ContentPart], Meta(max_length=256)]
    name: Annotated[str, Meta(max_length=64)] | None = None


class ChatCompletionRequest(SamplingFields, kw_only=True):
    messages: Annotated[list[ChatMessageIn], Meta(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: Annotated[int, Meta(ge=1, le=MAX_TOKENS_CAP)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Meta(ge=0, le=MAX_TOP_LOGPROBS)] | None = None


# ---------------------------------------------------------------- responses
class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(msgspec.Struct):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None


class Completion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    object: Literal["text_completion"] = "text_completion"


class TopLogprobOut(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprobOut]


class ChatLogprobs(msgspec.Struct):
    content: list[ChatTokenLogprob]


class ChatMessageOut(msgspec.Struct):
    role: Literal["assistant"]
    content: str


class ChatChoice(msgspec.Struct):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None


class ChatCompletion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: Literal["chat.completion"] = "chat.completion"


class ChatDelta(msgspec.Struct, omit_defaults=True):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(msgspec.Struct):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None


class ChatCompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"


class ModelCard(msgspec.Struct):
    id: str
    created: int
    max_model_len: int
    root: str
    owned_by: str = "citadel-llm"
    object: Literal["model"] = "model"


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: Literal["list"] = "list"


class Health(msgspec.Struct):
    status: Literal["healthy", "loading", "unavailable", "stalled", "draining"]
    model: str
    context_length: int
    efficiency_mode: bool
    timestamp: str


class TokenizeRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: str | None = None
    prompt: Annotated[str, Meta(max_length=1 << 20)] | None = None
    messages: Annotated[list[ChatMessageIn], Meta(min_length=1, max_length=MAX_MESSAGES)] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True  # vLLM's field: with messages, end with the assistant's turn opening


class TokenizeResponse(msgspec.Struct):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    tokens: Annotated[list[TokenId], Meta(max_length=1 << 16)]
    model: str | None = None


class DetokenizeResponse(msgspec.Struct):
    prompt: str


class Version(msgspec.Struct):
    version: str
    packages: dict[str, str]
    protocol_version: int


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(msgspec.Struct):
    error: ErrorDetail
