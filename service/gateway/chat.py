"""POST /v1/chat/completions: messages rendered with the model's chat template (Phi-3's
<|user|> … <|end|> <|assistant|> format), streaming and not."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from service.gateway import schemas as s
from service.gateway.common import (check_model, complete, decode_body, encode, finish, relay_stream, sampling_spec,
                                    sse, stream, usage_options)
from service.gateway.errors import ApiError
from service.gateway.keys import RECORD, REQUEST_ID
from service.gateway.request_record import request_record
from shared import protocol as p


def _logprobs(choice: p.Choice) -> s.ChatLogprobs | None:
    if choice.logprobs is None:
        return None
    return s.ChatLogprobs([
        s.ChatTokenLogprob(lp.token, lp.logprob, list(lp.token.encode()),
                           [s.TopLogprobOut(t.token, t.logprob, list(t.token.encode())) for t in lp.top])
        for lp in choice.logprobs
    ])


def chat_messages(messages: list[s.ChatMessageIn]) -> list[p.ChatMessage]:
    """The conversation for the chat template. Content given as parts is its text parts
    joined with a newline (as vLLM does); any other part is a 400 naming it."""
    out = []
    for i, m in enumerate(messages):
        if isinstance(m.content, str):
            out.append(p.ChatMessage(m.role, m.content))
            continue
        texts = []
        for j, part in enumerate(m.content):
            if part.type != "text" or part.text is None:
                raise ApiError(400, f"Content parts of type {part.type!r} cannot be served by this text model; "
                                    "only {'type': 'text', 'text': ...} parts", f"messages[{i}].content[{j}].type")
            texts.append(part.text)
        out.append(p.ChatMessage(m.role, "\n".join(texts)))
    return out


def _params(req: s.ChatCompletionRequest) -> p.SamplingSpec:
    if req.max_tokens is not None and req.max_completion_tokens is not None and req.max_tokens != req.max_completion_tokens:
        raise ApiError(400, "max_tokens and max_completion_tokens disagree; give one", "max_completion_tokens")
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    return sampling_spec(req, req.max_completion_tokens or req.max_tokens, logprobs)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    req = await decode_body(request, s.ChatCompletionRequest)
    model = check_model(request, req.model)
    params = _params(req)
    chat = chat_messages(req.messages)
    request_id = request[REQUEST_ID]
    if req.stream:
        return await _stream(request, req, model, chat, params, request_id)
    (out,) = await complete(request, [""], params, chat=chat)
    choices = []
    for c in out.choices:
        choices.append(s.ChatChoice(c.index, s.ChatMessageOut("assistant", c.text), _logprobs(c), finish(c.finish_reason)))
        if c.logprobs:
            await asyncio.sleep(0)  # a choice's log-probabilities a turn: other requests go on meanwhile
    completion_tokens = sum(c.tokens for c in out.choices)
    request[RECORD] = request_record([out], out.prompt_tokens, completion_tokens)
    body = encode(s.ChatCompletion(
        id=f"chatcmpl-{request_id}", created=int(time.time()), model=model, choices=choices,
        usage=s.Usage(out.prompt_tokens, completion_tokens, out.prompt_tokens + completion_tokens)))
    return web.Response(body=body, content_type="application/json")


async def _stream(request: web.Request, req: s.ChatCompletionRequest, model: str, chat: list[p.ChatMessage],
                  params: p.SamplingSpec, request_id: str) -> web.StreamResponse:
    created = int(time.time())
    cid = f"chatcmpl-{request_id}"

    def chunk(choices: list[s.ChatChunkChoice], usage: s.Usage | None = None) -> bytes:
        return sse(encode(s.ChatCompletionChunk(id=cid, created=created, model=model, choices=choices, usage=usage)))

    include_usage, continuous = usage_options(req)
    tokens: dict[int, int] = {}  # per choice, so far

    def events_of(_: int, out: p.Output) -> list[bytes]:  # one choice per chunk, as OpenAI and vLLM send
        events = []
        for c in out.choices:
            usage = None
            if c.index not in tokens:  # OpenAI's first chunk of each choice carries its role
                tokens[c.index] = 0
                if continuous:
                    usage = s.Usage(out.prompt_tokens, 0, out.prompt_tokens)
                events.append(chunk([s.ChatChunkChoice(c.index, s.ChatDelta(role="assistant", content=""))], usage))
            tokens[c.index] += c.tokens
            if continuous:
                usage = s.Usage(out.prompt_tokens, tokens[c.index], out.prompt_tokens + tokens[c.index])
            events.append(chunk([s.ChatChunkChoice(c.index, s.ChatDelta(content=c.text), _logprobs(c),
                                                   finish(c.finish_reason))], usage))
        return events

    return await relay_stream(request, stream(request, [""], params, chat=chat), events_of,
                              (lambda usage: chunk([], usage)) if include_usage else None)
