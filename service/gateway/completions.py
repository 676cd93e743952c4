"""POST /v1/completions: OpenAI's text completions, streaming and not."""

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


def _prompts(req: s.CompletionRequest) -> list[str | list[int]]:
    prompt = req.prompt
    if isinstance(prompt, str):
        return [prompt]
    if all(type(x) is int for x in prompt):
        return [_token_ids(prompt)]  # one prompt of token ids
    if len(prompt) > s.MAX_PROMPTS:
        raise ApiError(400, f"At most {s.MAX_PROMPTS} prompts per request", "prompt")
    if all(type(x) is str for x in prompt):
        return list(prompt)
    if all(isinstance(x, list) and x and all(type(t) is int for t in x) for x in prompt):
        return [_token_ids(x) for x in prompt]
    raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids "
                        "or a list of lists of token ids", "prompt")


def _token_ids(ids: list[int]) -> list[int]:
    bad = next((t for t in ids if not 0 <= t <= s.INT64_MAX), None)
    if bad is not None:
        raise ApiError(400, f"Token id {bad} in prompt is not a token id (0 .. vocabulary size - 1)", "prompt")
    return ids


def _logprobs(choice: p.Choice, offset: int) -> s.CompletionLogprobs | None:
    if choice.logprobs is None:
        return None
    tokens, offsets = [], []
    for lp in choice.logprobs:
        tokens.append(lp.token)
        offsets.append(offset)
        offset += len(lp.token)
    return s.CompletionLogprobs(
        tokens=tokens, token_logprobs=[lp.logprob for lp in choice.logprobs],
        # the sampled token is always among them (OpenAI's legacy completions, and vLLM): "logprobs": 0 gives it alone
        # (None for an echoed prompt's first token, which has no log-probability)
        top_logprobs=[None if lp.logprob is None else {**{t.token: t.logprob for t in lp.top}, lp.token: lp.logprob}
                      for lp in choice.logprobs],
        text_offset=offsets)


async def completions(request: web.Request) -> web.StreamResponse:
    req = await decode_body(request, s.CompletionRequest)
    model = check_model(request, req.model)
    prompts = _prompts(req)
    params = sampling_spec(req, req.max_tokens, req.logprobs)
    request_id = request[REQUEST_ID]
    if req.stream:
        return await _stream(request, req, model, prompts, params, request_id)
    outputs = await complete(request, prompts, params, echo=req.echo)
    n = params.n
    choices = []
    for i, out in enumerate(outputs):
        for c in out.choices:
            choices.append(s.CompletionChoice(i * n + c.index, c.text, _logprobs(c, 0), finish(c.finish_reason)))
            if c.logprobs:
                await asyncio.sleep(0)  # a choice's log-probabilities a turn: other requests go on meanwhile
    prompt_tokens = sum(out.prompt_tokens for out in outputs)
    completion_tokens = sum(c.tokens for out in outputs for c in out.choices)
    request[RECORD] = request_record(outputs, prompt_tokens, completion_tokens)
    body = encode(s.Completion(
        id=f"cmpl-{request_id}", created=int(time.time()), model=model, choices=choices,
        usage=s.Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens),
    ))
    return web.Response(body=body, content_type="application/json")


async def _stream(request: web.Request, req: s.CompletionRequest, model: str, prompts: list[str | list[int]],
                  params: p.SamplingSpec, request_id: str) -> web.StreamResponse:
    n = params.n
    created = int(time.time())
    cid = f"cmpl-{request_id}"
    offsets: dict[int, int] = {}
    include_usage, continuous = usage_options(req)
    tokens: dict[int, int] = {}

    def events_of(index: int, out: p.Output) -> list[bytes]:  # one choice per chunk, as OpenAI and vLLM send
        events = []
        for c in out.choices:
            k = index * n + c.index
            choice = s.CompletionChoice(k, c.text, _logprobs(c, offsets.get(k, 0)), finish(c.finish_reason))
            offsets[k] = offsets.get(k, 0) + len(c.text)
            tokens[k] = tokens.get(k, 0) + c.tokens
            usage = s.Usage(out.prompt_tokens, tokens[k], out.prompt_tokens + tokens[k]) if continuous else None
            events.append(sse(encode(s.Completion(id=cid, created=created, model=model, choices=[choice],
                                                  usage=usage))))
        return events

    def usage_event(usage: s.Usage) -> bytes:
        return sse(encode(s.Completion(id=cid, created=created, model=model, choices=[], usage=usage)))

    return await relay_stream(request, stream(request, prompts, params, echo=req.echo), events_of,
                              usage_event if include_usage else None)
