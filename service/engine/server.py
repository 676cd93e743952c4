"""The engine worker's socket server: many concurrent requests over Unix-socket connections,
multiplexed by rid, each run as one task against vLLM's AsyncLLM.

An error in one request ends that request with a `Failure`; only an engine-level
failure (EngineDeadError) ends the process, so that `serve` restarts it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from service.engine.admission import Admission, Refused, Ticket
from service.engine.stats import Counters, SchedulerSnapshot
from shared import protocol as p
from shared.framing import FrameConnection, FrameTooLarge, PeerNotReading
from shared.logging import bind_request_id, get_logger
from shared.loop_lag import LoopLag
from shared.process_tree import child_pids, cpu_seconds

log = get_logger(__name__)
_debug = False  # set by the worker's main when log_level is DEBUG

# Above this share of one core, an EngineCore without output is computing (a long step), not stuck.
BUSY_CORES = 0.05
# Positions of an answer's log-probabilities converted in one turn of the event loop (~5 ms
# with 20 top log-probabilities each)
LOGPROB_POSITIONS_PER_TURN = 256
INLINE_TOKENIZE_CHARS = 8192  # texts up to this are tokenized on the loop (~0.1 ms); longer ones on a thread
_FINISH = {"stop": p.FinishReason.STOP, "length": p.FinishReason.LENGTH, "abort": p.FinishReason.ABORT}


class RequestError(Exception):
    """Bad input found by the worker (it knows the tokenizer and the context length)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.status = param, status


def failure_for(rid: int, exc: Exception) -> p.Failure:
    """The one final message of a request that ended with `exc`, by the kind of error: the
    client's are 4xx naming the field, the server's 5xx, and anything else is a bug, a 500
    (vLLM's `exceptions.py` splits its own the same way)."""
    from vllm.exceptions import VLLMClientError
    from vllm.v1.engine.exceptions import EngineDeadError

    match exc:
        case Refused(reason=reason, retry_after_s=retry_after_s):
            code = "rate_limit_exceeded" if reason == "rate_limit" else "overloaded"
            return p.Failure(rid, 429, str(exc), code=code, retry_after_s=retry_after_s)
        case RequestError(status=status, param=param):
            return p.Failure(rid, status, str(exc), param)
        case VLLMClientError():
            return p.Failure(rid, 400, str(exc), getattr(exc, "parameter", None))
        case EngineDeadError():
            return p.Failure(rid, 503, f"engine unavailable: {exc}", code="engine_dead")
        case PeerNotReading():
            return p.Failure(rid, 503, f"The gateway stopped reading the engine's answers: {exc}",
                             code="gateway_not_reading")
        case _:
            return p.Failure(rid, 500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")


class EngineServer:
    """Owns the AsyncLLM and the tasks of all requests in flight."""

    def __init__(self, engine: Any, welcome: p.Welcome, vocab_size: int, admission: Admission,
                 scheduler: SchedulerSnapshot | None = None,
                 core_pids: Callable[[], list[int]] = child_pids) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        self.engine = engine
        self.welcome = welcome
        self.max_model_len = welcome.max_model_len
        self.vocab_size = vocab_size
        self.admission = admission
        self.tokenizer = engine.get_tokenizer()
        self.scheduler = scheduler or SchedulerSnapshot()
        # Whose CPU time is the EngineCore's: this worker's children (vLLM's EngineCore process),
        # or this process when the EngineCore runs on a thread of it (engine_core: thread).
        self.core_pids = core_pids
        self.counters = Counters()
        self.loop_lag = LoopLag()  # started and closed by the process entry (main)
        self.dead = asyncio.Event()  # set when the engine core has died
        self.last_output = time.monotonic()  # when the engine last produced anything
        self._progress_seen = (self.last_output, 0.0)  # (when, EngineCore CPU seconds) at making_progress
        self._tasks: set[asyncio.Task[None]] = set()
        self.tokenizing = 0  # tokenize and detokenize calls in flight
        self._tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")
        self._conn_ids = itertools.count(1)
        self._SamplingParams = SamplingParams
        self._TokensPrompt = TokensPrompt
        self._StructuredOutputsParams = StructuredOutputsParams
        self._kinds = (RequestOutputKind.FINAL_ONLY, RequestOutputKind.DELTA)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def making_progress(self, stall_s: float) -> bool:
        """Idle, some output within the last stall_s seconds, or the EngineCore computing
        since the last call (one prefill step of a larger model can outlast stall_s)."""
        now, cpu_s = time.monotonic(), cpu_seconds(self.core_pids())
        since, used = self._progress_seen
        self._progress_seen = (now, cpu_s)
        last = max(self.last_output, self.scheduler.last_step)
        computing = (cpu_s - used) / max(now - since, 1e-3) >= BUSY_CORES
        return not self._tasks or now - last < stall_s or computing

    def connection(self) -> EngineConnection:
        return EngineConnection(self, next(self._conn_ids))

    def control_connection(self) -> EngineConnection:
        return EngineConnection(self, next(self._conn_ids), control=True)

    def set_limits(self, msg: p.SetLimits) -> p.LimitsSet:
        before = self.admission.limits
        limits = self.admission.set_limits(msg.max_num_seqs, msg.max_num_batched_tokens, msg.reason)
        if limits != before:
            log.info("limits set", max_num_seqs=limits.max_num_seqs,
                     max_num_batched_tokens=limits.max_num_batched_tokens, reason=msg.reason)
        c = self.admission.ceilings
        return p.LimitsSet(msg.rid, limits.max_num_seqs, limits.max_num_batched_tokens,
                           c.max_num_seqs, c.max_num_batched_tokens)

    # ---------------------------------------------------------------- one request
    def start(self, conn: EngineConnection, msg: p.Generate) -> asyncio.Task[None]:
        if not self._tasks:
            self.last_output = time.monotonic()  # progress is measured from the first request on
        task = asyncio.get_running_loop().create_task(self._run(conn, msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. A long text is tokenized on the tokenizer's own thread (one,
        so tokenizing takes at most that much of the CPU): the loop that serves every other
        request and the progress probe never waits for it (30 x 1 MB /tokenize stalled it)."""
        if len(text) <= INLINE_TOKENIZE_CHARS:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)  # type: ignore[no-any-return]
        return await asyncio.get_running_loop().run_in_executor(
            self._tokenizer_thread, partial(self.tokenizer.encode, text, add_special_tokens=add_special_tokens))

    async def _decode(self, ids: list[int]) -> str:
        if len(ids) <= INLINE_TOKENIZE_CHARS // 4:
            return self.tokenizer.decode(ids)  # type: ignore[no-any-return]
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, self.tokenizer.decode, ids)

    async def _chat_ids(self, chat: list[p.ChatMessage], add_generation_prompt: bool = True) -> list[int]:
        if not chat:
            raise RequestError("messages must not be empty", "messages")
        try:
            text = self.tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in chat], add_generation_prompt=add_generation_prompt,
                tokenize=False)
        except Exception as exc:  # a template may reject a conversation (e.g. role order)
            raise RequestError(f"messages cannot be rendered with the chat template: {exc}", "messages") from None
        return await self._encode(text, add_special_tokens=False)

    async def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("prompt must not be empty", "prompt")
            ids: list[int] = await self._encode(prompt)
        else:
            ids = prompt
            if not ids:
                raise RequestError("prompt must not be empty", "prompt")
            self._check_vocabulary(ids, "prompt")
        return self._fit(ids)

    def _prompt_logprobs(self, ids: list[int], positions: Any, k: int | None) -> list[p.TokenLogprob]:
        """The echoed prompt's tokens with their log-probabilities (vLLM's prompt_logprobs: the
        first token has none), as OpenAI's legacy completions list them before the answer's."""
        result = [p.TokenLogprob(self.tokenizer.decode(ids[:1]), None, [])]
        for token_id, position in zip(ids[1:], (positions or [])[1:]):
            entry = position.get(token_id) if position else None
            if entry is None:
                result.append(p.TokenLogprob(self.tokenizer.decode([token_id]), None, []))
                continue
            ranked = sorted(position.values(), key=lambda lp: lp.rank or 0)
            result.append(p.TokenLogprob(entry.decoded_token or "", entry.logprob,
                                         [p.TopLogprob(lp.decoded_token or "", lp.logprob) for lp in ranked[: k or 0]]))
        return result

    def _check_vocabulary(self, ids: list[int], param: str) -> None:
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is out of vocabulary: this model's vocabulary size is "
                               f"{self.vocab_size} (ids 0..{self.vocab_size - 1})", param)

    def _fit(self, ids: list[int], param: str = "prompt") -> list[int]:
        if not ids:
            raise RequestError(f"{param} must not be empty", param)
        if len(ids) >= self.max_model_len:
            raise RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. "
                f"However, your prompt contains {len(ids)} tokens, leaving no room for output.",
                param,
            )
        return ids

    def _sampling(self, spec: p.SamplingSpec, prompt_len: int, stream: bool, echo: bool = False) -> Any:
        room = self.max_model_len - prompt_len
        max_tokens = room if spec.max_tokens is None else spec.max_tokens
        if max_tokens > room:
            raise RequestError(
                f"max_tokens={max_tokens} does not fit: the prompt has {prompt_len} tokens and the "
                f"context is {self.max_model_len}, so at most {room} tokens can be generated.",
                "max_tokens",
            )
        for name, token_ids in (("logit_bias", [t for t, _ in spec.logit_bias]), ("stop_token_ids", spec.stop_token_ids)):
            self._check_vocabulary(token_ids, name)
        try:
            # echo with logprobs: the prompt's own log-probabilities too (evaluation harnesses score them)
            return self._sampling_params(spec, max_tokens, stream, spec.logprobs if echo else None)
        except ValueError as exc:  # vLLM's checks of the parameters themselves: the client's error
            raise RequestError(str(exc)) from None

    def _sampling_params(self, spec: p.SamplingSpec, max_tokens: int, stream: bool,
                         prompt_logprobs: int | None = None) -> Any:
        return self._SamplingParams(
            n=spec.n,
            prompt_logprobs=prompt_logprobs,
            min_p=spec.min_p,
            logprobs=spec.logprobs,
            logit_bias=dict(spec.logit_bias) or None,
            max_tokens=max_tokens,
            temperature=spec.temperature,
            top_p=spec.top_p,
            top_k=spec.top_k,
            seed=spec.seed,
            stop=spec.stop or None,
            stop_token_ids=spec.stop_token_ids or None,
            ignore_eos=spec.ignore_eos,
            presence_penalty=spec.presence_penalty,
            frequency_penalty=spec.frequency_penalty,
            repetition_penalty=spec.repetition_penalty,
            min_tokens=spec.min_tokens,
            output_kind=self._kinds[stream],
            structured_outputs=self._structured_outputs(spec.response_format),
        )

    def _structured_outputs(self, fmt: p.StructuredOutput | None) -> Any:
        """response_format as vLLM's own OpenAI server maps it: json_object, or json with the
        schema (vLLM picks the backend, xgrammar first; its check of the schema runs when the
        request is added, see _run)."""
        if fmt is None:
            return None
        if fmt.json_schema is None:
            return self._StructuredOutputsParams(json_object=True)
        return self._StructuredOutputsParams(json=fmt.json_schema)

    async def _run(self, conn: EngineConnection, msg: p.Generate) -> None:
        bind_request_id(msg.request_id)  # this task's lines carry the client's request id
        rid = msg.rid
        arrived = time.monotonic()
        ticket: Ticket | None = None
        ttft: float | None = None
        running_s: float | None = None  # vLLM's own: scheduled -> last token
        finished = False
        try:
            n = msg.params.n
            if not msg.probe:  # the health probe is never refused: it asks whether the engine moves
                self.admission.check()  # before tokenizing: refusing must be the cheapest answer
            with self.admission.preparing(0 if msg.probe else n):
                if msg.chat is not None:
                    ids = self._fit(await self._chat_ids(msg.chat), "messages")
                else:
                    ids = await self._prompt_ids(msg.prompt)
                want_logprobs = msg.params.logprobs is not None
                params = self._sampling(msg.params, len(ids), msg.stream, echo=msg.echo and want_logprobs)
                echo = ""
                if msg.echo:
                    echo = msg.prompt if isinstance(msg.prompt, str) else await self._decode(ids)
            echo_logprobs: list[p.TokenLogprob] | None = None
            ticket = await self.admission.admit(n, max(len(ids), n), arrived, counted=not msg.probe)
            prompt = self._TokensPrompt(prompt_token_ids=ids)
            request_id = f"{conn.conn_id}-{rid}"
            finish = _FINISH
            generated = 0
            async for out in self.engine.generate(prompt, params, request_id):
                if echo and want_logprobs and echo_logprobs is None:  # they come with the first output
                    echo_logprobs = self._prompt_logprobs(ids, out.prompt_logprobs, msg.params.logprobs)
                if echo and msg.stream:  # the prompt first, once, for every choice
                    conn.send(p.Output(rid, [p.Choice(i, echo, 0, None, echo_logprobs) for i in range(n)],
                                       prompt_tokens=len(ids)))
                    echo, echo_logprobs = "", []
                if out.finished and any(c.finish_reason == "error" for c in out.outputs):
                    raise _finished_with_error(msg.params)
                choices = [
                    p.Choice(c.index, echo + c.text if echo else c.text, len(c.token_ids),
                             finish.get(c.finish_reason),  # type: ignore[arg-type]
                             (echo_logprobs or []) + await _logprobs(c, msg.params.logprobs) if want_logprobs else None)
                    for c in out.outputs
                ]
                generated += sum(ch.tokens for ch in choices)
                self.last_output = now = time.monotonic()
                if ttft is None:
                    ttft = now - arrived
                if out.finished:
                    finished = True
                    m = out.metrics
                    if m is not None and m.scheduled_ts and m.last_token_ts >= m.scheduled_ts:
                        running_s = m.last_token_ts - m.scheduled_ts
                    if m is not None and m.first_token_ts:
                        conn.send(p.Output(rid, choices, True, len(ids), m.first_token_latency,
                                           max(m.last_token_ts - m.first_token_ts, 0.0)))
                    else:
                        conn.send(p.Output(rid, choices, True, len(ids)))
                    if not msg.probe:
                        self._count(len(ids), generated)
                    if _debug:
                        log.debug("request finished", prompt_tokens=len(ids),
                                  generated_tokens=generated)
                    return
                conn.send(p.Output(rid, choices, prompt_tokens=len(ids)))  # for continuous usage stats
                await conn.wait_writable(30.0)
        except asyncio.CancelledError:
            raise  # AsyncLLM.generate aborts the request inside the engine on cancel
        except Exception as exc:  # one bad request must not take the worker down
            failure = failure_for(rid, exc)
            if failure.status == 400 and failure.param is None and ttft is None and msg.params.response_format:
                # vLLM checks the structured-output constraint when the request is added (its other
                # checks are made here first): the schema (or the format) is at fault
                failure.param = (
                    "response_format" if msg.params.response_format.json_schema is None
                    else "response_format.json_schema.schema")
            if failure.status >= 500 and failure.code == "internal_error":
                log.exception("request failed", rid=rid)  # a bug: its traceback
            elif failure.status < 500 and failure.status != 429:
                log.info("request refused", status=failure.status, param=failure.param,
                         reason=failure.message)
            elif failure.code == "gateway_not_reading":
                log.warning("gateway stopped reading: request aborted", rid=rid)
            if failure.code == "engine_dead":
                self.dead.set()
            conn.send(failure)
        finally:
            conn.requests.pop(rid, None)
            if ticket is not None:
                self.admission.finish(ticket, ttft if finished else None, running_s)

    def _count(self, prompt_tokens: int, generated: int) -> None:
        counters = self.counters
        counters.requests_finished += 1
        counters.prompt_tokens += prompt_tokens
        counters.generation_tokens += generated

    async def tokenize(self, msg: p.Tokenize | p.Detokenize) -> p.TokenizeResult | p.Failure:
        try:
            self.admission.check_tokenizing(self.tokenizing)
        except Refused as exc:
            return failure_for(msg.rid, exc)
        self.tokenizing += 1
        try:
            if isinstance(msg, p.Detokenize):
                self._check_vocabulary(msg.tokens, "tokens")
                return p.TokenizeResult(msg.rid, msg.tokens, await self._decode(msg.tokens))
            if msg.chat is not None:
                ids = await self._chat_ids(msg.chat, msg.add_generation_prompt)
            else:
                ids = await self._encode(msg.text or "", add_special_tokens=msg.add_special_tokens)
            return p.TokenizeResult(msg.rid, ids, msg.text or "")
        except Exception as exc:
            failure = failure_for(msg.rid, exc)
            if failure.code == "internal_error":
                log.exception("tokenize failed", rid=msg.rid)  # a bug: its traceback
            return failure
        finally:
            self.tokenizing -= 1

    def stats(self, rid: int, window_s: float = 10.0) -> p.EngineStats:
        sched, counters, adm = self.scheduler, self.counters, self.admission
        idle = not self._tasks
        pct = adm.percentiles(window_s)
        return p.EngineStats(
            rid=rid,
            running=0 if idle else sched.running,
            waiting=0 if idle else sched.waiting,
            kv_cache_usage=0.0 if idle else sched.kv_cache_usage,
            max_num_seqs=adm.limits.max_num_seqs,
            max_num_batched_tokens=adm.limits.max_num_batched_tokens,
            in_flight=len(self._tasks),
            prompt_tokens_total=counters.prompt_tokens,
            generation_tokens_total=counters.generation_tokens,
            requests_finished_total=counters.requests_finished,
            engine_core_pids=self.core_pids(),
            seconds_since_output=time.monotonic() - max(self.last_output, sched.last_step),
            queued=adm.backlog,
            tokens_in_flight=adm.tokens,
            max_num_seqs_ceiling=adm.ceilings.max_num_seqs,
            max_num_batched_tokens_ceiling=adm.ceilings.max_num_batched_tokens,
            limits_reason=adm.limits_reason,
            admitted_total=adm.admitted_total,
            refused_total=dict(adm.refused_total),
            estimated_wait_s=min(adm.estimated_wait_s(), 3600.0),
            window_requests=pct.count, ttft_p50_s=pct.ttft_p50_s, ttft_p95_s=pct.ttft_p95_s,
            e2e_p50_s=pct.e2e_p50_s, e2e_p95_s=pct.e2e_p95_s, service_p95_s=pct.service_p95_s,
            mean_service_s=adm.service_s,
            engine_cpu_s=cpu_seconds(self.core_pids()),
            loop_lag_max_s=self.loop_lag.max_s(),
        )

    async def drain(self, timeout_s: float) -> None:
        """Let requests in flight finish (bounded), then cancel the rest."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5.0)
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)


def _finished_with_error(spec: p.SamplingSpec) -> RequestError:
    """vLLM finished the request with finish_reason "error": with response_format, its grammar
    failed to compile in the EngineCore (vLLM fails that request alone); otherwise a
    request-level failure inside vLLM."""
    if spec.response_format is not None:
        return RequestError("vLLM could not compile the grammar of this response_format",
                            "response_format" if spec.response_format.json_schema is None
                            else "response_format.json_schema.schema")
    return RequestError("vLLM failed this request (finish_reason 'error')", status=500)


async def _logprobs(completion: Any, k: int | None) -> list[p.TokenLogprob]:
    """vLLM's per-position {token id: Logprob} maps, as the sampled token plus the top k. A whole
    answer's (2,000 positions of 21 each, for each of 16 sequences) is converted a slice at a
    time, the loop turning between slices: built in one go it held every other request and the
    health probe for seconds."""
    result = []
    for i, (token_id, position) in enumerate(zip(completion.token_ids, completion.logprobs or ())):
        if i and i % LOGPROB_POSITIONS_PER_TURN == 0:
            await asyncio.sleep(0)
        if position is None:
            continue
        sampled = position.get(token_id)
        ranked = sorted(position.values(), key=lambda lp: lp.rank or 0)
        top = [p.TopLogprob(lp.decoded_token or "", lp.logprob) for lp in ranked[: k or 0]]
        if sampled is None:
            continue
        result.append(p.TokenLogprob(sampled.decoded_token or "", sampled.logprob, top))
    return result


def _peer_uid(transport: asyncio.BaseTransport) -> int | None:
    """The connecting process's uid (SO_PEERCRED), where the platform tells it."""
    sock = transport.get_extra_info("socket")
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


class EngineConnection(FrameConnection[p.GatewayMessage]):
    """One client connection (the gateway, or a test): handshake first, then requests."""

    def __init__(self, server: EngineServer, conn_id: int, control: bool = False) -> None:
        super().__init__(p.GatewayMessage)
        self.server = server
        self.conn_id = conn_id
        self.control = control  # the control socket: stats and limits, no generation
        self.greeted = False
        self.requests: dict[int, asyncio.Task[None]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        uid = _peer_uid(transport)
        if uid is not None and uid not in (os.getuid(), 0):
            # the socket is 0600 already; this also holds if its folder is ever shared
            log.warning("refusing a peer of another user", conn=self.conn_id, peer_uid=uid)
            transport.close()

    def send(self, msg: Any) -> bool:
        """An answer too large for one frame fails its own request, never the connection
        that every other request shares."""
        try:
            return super().send(msg)
        except FrameTooLarge as exc:
            rid = getattr(msg, "rid", None)
            if rid is None:
                raise
            log.warning("answer too large for a frame: request failed", rid=rid, size_mib=round(exc.size / 2**20, 1))
            task = self.requests.get(rid)
            if task is not None:
                task.cancel()  # a stream would go on generating for no one: aborted in vLLM
            return super().send(p.Failure(rid, 400, f"The answer is too large to return: {exc}; ask for fewer "
                                                    "choices (n), tokens (max_tokens) or log-probabilities",
                                          code="answer_too_large"))

    def on_message(self, msg: p.GatewayMessage) -> None:
        match msg:
            case p.Generate() if self.greeted and not self.control:
                if msg.rid in self.requests:
                    self.send(p.Failure(msg.rid, 400, f"rid {msg.rid} is already in flight"))
                    return
                self.requests[msg.rid] = self.server.start(self, msg)
            case p.GetStats(rid=rid, window_s=window_s) if self.greeted:
                self.send(self.server.stats(rid, window_s))
            case p.SetLimits() if self.greeted and self.control:
                self.send(self.server.set_limits(msg))
            case p.Tokenize() | p.Detokenize() if self.greeted:
                if msg.rid in self.requests:
                    self.send(p.Failure(msg.rid, 400, f"rid {msg.rid} is already in flight"))
                    return
                self.requests[msg.rid] = asyncio.get_running_loop().create_task(self._tokenize(msg))
            case p.Abort(rid=rid):
                task = self.requests.pop(rid, None)
                if task is not None:
                    task.cancel()
            case p.Hello(protocol_version=version):
                if version != p.PROTOCOL_VERSION:
                    self.send(p.HandshakeRefused(f"protocol {version} unsupported; this worker speaks {p.PROTOCOL_VERSION}"))
                    self.close()
                    return
                self.greeted = True
                self.send(self.server.welcome)
            case _:
                log.warning("message before handshake or on the wrong socket: closing connection",
                            conn=self.conn_id, message=type(msg).__name__, control=self.control)
                self.close()

    async def _tokenize(self, msg: p.Tokenize | p.Detokenize) -> None:
        try:
            self.send(await self.server.tokenize(msg))
        finally:
            self.requests.pop(msg.rid, None)

    def on_lost(self, exc: Exception | None) -> None:
        # The peer is gone: abort everything it asked for.
        for task in self.requests.values():
            task.cancel()
        self.requests.clear()

    def on_bad_frame(self, exc: Exception) -> None:
        log.warning("malformed frame: closing connection", conn=self.conn_id, error=str(exc))
        super().on_bad_frame(exc)  # type: ignore[arg-type]
