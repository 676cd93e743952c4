"""OpenAI-shaped request and response bodies, decoded and encoded with msgspec.

Bounds live in the types (`Meta`), so a bad value is a ValidationError naming the
field; parameters OpenAI defines that this service does not implement are
rejected by name rather than silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

MAX_N = 16  # choices per prompt: each one is a sequence in the KV cache
MAX_STOP = 16  # stop strings
MAX_STOP_LEN = 256  # characters per stop string
MAX_PROMPTS = 64  # prompts in one request
MAX_TOKENS_CAP = 1 << 20

Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
StopString = Annotated[str, Meta(min_length=1, max_length=MAX_STOP_LEN)]


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool = False


class CompletionRequest(msgspec.Struct, forbid_unknown_fields=True):
    # A string, a list of strings, a list of token ids, or a list of lists of token ids.
    prompt: str | Annotated[list[Any], Meta(min_length=1)]
    model: str | None = None
    max_tokens: Annotated[int, Meta(ge=1, le=MAX_TOKENS_CAP)] | None = None  # None: what fits
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: Annotated[int, Meta(ge=-1)] = -1
    n: Annotated[int, Meta(ge=1, le=MAX_N)] = 1
    stop: StopString | Annotated[list[StopString], Meta(max_length=MAX_STOP)] | None = None
    stop_token_ids: Annotated[list[Annotated[int, Meta(ge=0)]], Meta(max_length=MAX_STOP)] | None = None
    seed: Annotated[int, Meta(ge=0, le=2**63 - 1)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, Meta(ge=0, le=MAX_TOKENS_CAP)] = 0
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: Annotated[float, Meta(gt=0.0, le=2.0)] = 1.0
    user: Annotated[str, Meta(max_length=256)] | None = None
    # OpenAI parameters not implemented yet: accepted only at their neutral value.
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None


UNSUPPORTED_PARAMS: dict[str, Any] = {
    "echo": False, "logprobs": None, "best_of": None, "suffix": None, "logit_bias": None,
}


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    object: Literal["text_completion"] = "text_completion"


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
    status: str
    model: str
    context_length: int
    efficiency_mode: bool
    timestamp: str
