"""The service on a real instruct model (SmolLM2-135M-Instruct from `make real-model`), checked
as a user would: right answers, the chat template and its end token, stop strings, seeds,
streaming, log-probabilities, a long prompt, and Unicode through the tokenizer routes.
One service for the module; every answer compared is greedy or seeded, none is timed."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import openai
import pytest

from service.model_files import verify
from service.engine.settings import GIB
from tests.cgroups import MemoryGroup, memory_group
from tests.helpers import ROOT, ServiceProcess, wait_for

# The first test also waits for the start (setup counts against pytest-timeout's limit).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

REAL_MODEL_DIR = ROOT / "models" / "smollm2-135m-instruct"
SERVED = "smollm2-135m-instruct"
# Measured on this 2-core machine shared with other test runs (load 13-19): 417 s to healthy,
# ~12 s of it loading the weights and the KV cache, the rest starting processes starved of CPU.
REAL_MODEL_STARTUP_TIMEOUT_S = 840.0
# With vLLM's torch.compile warm-up of the model's 30 layers it took 766 s (the demo model's 2
# layers: ~30 s on a quiet machine). These tests are about what the model answers, not the
# compiled path (every other integration test runs that, on the demo model), so this service
# runs eager.
# The shipped ceilings (32 sequences, 1024 tokens a step): 32 full sequences would want 3 GB of
# KV cache here, more than memory_gb leaves, so the memory sizing is what decides.
MEMORY_GB = 4.0
# A latency target no request misses (as the fleet tests set it): these tests are about what the
# model answers and the memory it takes, and the latency steering (test_efficiency.py) would
# otherwise refuse a share of a burst that depends on this machine's pace.
REAL_MODEL_SETTINGS = {"enforce_eager": "true", "memory_gb": str(MEMORY_GB), "max_num_seqs": "32",
                       "max_num_batched_tokens": "1024", "metrics_collection_interval": "1",
                       "target_latency_ms": "600000", "engine_core": "auto"}
GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def memory_limit() -> Iterator[MemoryGroup]:
    """The service runs in a cgroup limited to memory_gb, as systemd's slice would run it:
    every test here runs under the cap, and going over it is an OOM kill, not a number."""
    with memory_group(int(MEMORY_GB * GIB)) as group:
        yield group


@pytest.fixture(scope="module")
def real_service(memory_limit: MemoryGroup) -> Iterator[ServiceProcess]:
    if not (REAL_MODEL_DIR / "model.sha256").exists():
        pytest.fail(f"{REAL_MODEL_DIR} is missing: run `make real-model` (make test does)")
    svc = ServiceProcess(model_path=str(REAL_MODEL_DIR), served_model_name=SERVED,
                         model_name="HuggingFaceTB/SmolLM2-135M-Instruct", **REAL_MODEL_SETTINGS)
    svc.start(preexec_fn=memory_limit.join)
    try:
        svc.wait_healthy(REAL_MODEL_STARTUP_TIMEOUT_S)
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def url(real_service: ServiceProcess) -> str:
    return real_service.base_url


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client: openai.OpenAI, question: str, **kwargs: object) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": question}],
                                          **{"max_tokens": 48, **GREEDY, **kwargs})  # type: ignore[arg-type]


def post_json(url: str, path: str, body: object) -> dict:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


async def post(url: str, path: str, body: object) -> dict:
    async with aiohttp.ClientSession() as session, session.post(url + path, json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()  # type: ignore[no-any-return]


# ------------------------------------------------------------------ the model that is served
def test_the_folder_is_a_complete_conversion() -> None:
    assert verify(REAL_MODEL_DIR) == []
    config = json.loads((REAL_MODEL_DIR / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert config["dtype"] == "float32"
    tokenizer_config = json.loads((REAL_MODEL_DIR / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tokenizer_config["chat_template"] and tokenizer_config["eos_token"] == "<|im_end|>"
    assert json.loads((REAL_MODEL_DIR / "generation_config.json").read_text())["eos_token_id"] == 2


def test_models_says_which_model_is_loaded(client: openai.OpenAI, url: str) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [SERVED, "HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert {getattr(m, "root") for m in models} == {str(REAL_MODEL_DIR)}
    card = client.models.retrieve(SERVED)
    assert getattr(card, "demo_model") is False and getattr(card, "dtype") == "float32"
    assert 134_000_000 < getattr(card, "parameter_count") < 135_000_000


def test_the_engine_core_runs_on_a_thread_of_the_engine_worker(real_service: ServiceProcess, url: str) -> None:
    """engine_core: auto puts a model of this size's EngineCore on a thread of the engine
    worker: no process of its own, torch loaded once, and the worker's CPU time is what the
    health probe and the CPU figures read as the EngineCore's."""
    engine = real_service.children()["engine"]
    assert engine.children(recursive=True) == [], [p.cmdline() for p in engine.children(recursive=True)]
    assert "EngineCore" in {t.name for t in _threads(engine.pid)}
    libraries = Path(f"/proc/{engine.pid}/maps").read_text()
    assert "libtorch_cpu.so" in libraries
    for package in ("sklearn", "scipy", "pandas", "pyarrow", "cv2"):
        assert f"/site-packages/{package}/" not in libraries, package
    doc = _efficiency(url)
    assert doc["optimizations"]["engine_core"]["value"] == "auto"
    card = json.loads(urllib.request.urlopen(f"{url}/v1/models/{SERVED}", timeout=30).read())
    assert card["engine_core"] == "thread"
    per_token = 2 * 30 * 3 * 64 * 4  # K and V, 30 layers, 3 KV heads of 64, float32
    assert card["kv_cache_tokens"] > 2048 and card["kv_cache_bytes"] == card["kv_cache_tokens"] * per_token
    with urllib.request.urlopen(f"http://127.0.0.1:{real_service.metrics_port}/metrics", timeout=30) as resp:
        rss = {ln.split('role="')[1].split('"')[0]: float(ln.split()[-1]) for ln in resp.read().decode().splitlines()
               if ln.startswith("phi3_mini_process_resident_memory_bytes{")}
    assert rss["engine"] > 0.3 * GIB  # the weights and the KV cache are in the worker
    assert rss.get("engine_core", 0.0) == 0.0  # and counted once


def _threads(pid: int) -> list[SimpleNamespace]:
    tasks = Path(f"/proc/{pid}/task")
    return [SimpleNamespace(tid=int(t.name), name=(t / "comm").read_text().strip()) for t in tasks.iterdir()]


# ------------------------------------------------------------------ answers
# Questions SmolLM2-135M-Instruct answers right when greedy (measured; it gets Italy's capital,
# the largest planet and the freezing point of water wrong).
@pytest.mark.parametrize(("question", "expected"), [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of the United Kingdom?", "London"),
    ("What is the chemical symbol for water?", "H2O"),
    ("What language is spoken in Spain?", "Spanish"),
])
def test_greedy_answers_are_right(client: openai.OpenAI, question: str, expected: str) -> None:
    answer = chat(client, question).choices[0].message.content
    assert answer is not None and expected in answer, answer


def test_chat_template_turns_and_the_end_token(client: openai.OpenAI, url: str) -> None:
    messages = [
        {"role": "system", "content": "You are a geography teacher."},
        {"role": "user", "content": "Name a country in Europe."},
        {"role": "assistant", "content": "France."},
        {"role": "user", "content": "What is its capital city?"},
    ]
    ids = post_json(url, "/tokenize", {"model": SERVED, "messages": messages})["tokens"]
    rendered = post_json(url, "/detokenize", {"model": SERVED, "tokens": ids})["prompt"]
    assert rendered == ("<|im_start|>system\nYou are a geography teacher.<|im_end|>\n"
                        "<|im_start|>user\nName a country in Europe.<|im_end|>\n"
                        "<|im_start|>assistant\nFrance.<|im_end|>\n"
                        "<|im_start|>user\nWhat is its capital city?<|im_end|>\n"
                        "<|im_start|>assistant\n")
    result = client.chat.completions.create(model=SERVED, messages=messages, max_tokens=200, **GREEDY)  # type: ignore[arg-type]
    choice = result.choices[0]
    # No stop string was given: "stop" before max_tokens is the model's own <|im_end|>.
    assert choice.finish_reason == "stop" and result.usage is not None and result.usage.completion_tokens < 200
    assert choice.message.content and "Paris" in choice.message.content
    assert "<|im_end|>" not in choice.message.content and "<|im_start|>" not in choice.message.content
    assert result.usage.prompt_tokens == len(ids)


def test_stop_strings_cut_real_text_where_they_first_occur(client: openai.OpenAI) -> None:
    prompt = "The three primary colors are"
    full = client.completions.create(model=SERVED, prompt=prompt, max_tokens=30, **GREEDY).choices[0].text  # type: ignore[arg-type]
    words = full.split()
    assert len(words) >= 6, full
    stop = " " + words[len(words) // 2]
    cut = client.completions.create(model=SERVED, prompt=prompt, max_tokens=30, stop=[stop, "never in this text"],
                                    **GREEDY).choices[0]  # type: ignore[arg-type]
    assert cut.finish_reason == "stop"
    assert cut.text == full[:full.index(stop)]


def test_the_same_seed_gives_the_same_text(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        return chat(client, "Write a short poem about the sea.", temperature=1.0, max_tokens=32,
                    seed=seed).choices[0].message.content or ""

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(seed) != first for seed in (1, 2, 3))


async def test_streamed_and_whole_greedy_text_are_identical(client: openai.OpenAI, url: str) -> None:
    question = "Explain in two sentences why the sky is blue."
    whole = chat(client, question, max_tokens=40).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(client, question, max_tokens=40, stream=True)
                       if c.choices)
    assert streamed == whole
    # the same through raw HTTP and legacy completions, the events read off the wire
    body = {"model": SERVED, "prompt": "Once upon a time", "max_tokens": 40, **GREEDY}
    whole_text = (await post(url, "/v1/completions", body))["choices"][0]["text"]
    pieces = []
    async with aiohttp.ClientSession() as session, \
            session.post(url + "/v1/completions", json={**body, "stream": True}) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        async for line in resp.content:
            if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                pieces.append(json.loads(line[6:])["choices"][0]["text"])
    assert "".join(pieces) == whole_text and len(pieces) > 1


def test_echo_logprobs_score_the_prompt_as_generation_scored_it(client: openai.OpenAI, url: str) -> None:
    prompt = "The capital of France is"
    prompt_ids = post_json(url, "/tokenize", {"model": SERVED, "prompt": prompt})["tokens"]
    gen = client.completions.create(model=SERVED, prompt=prompt, max_tokens=1, logprobs=1, echo=True,
                                    **GREEDY).choices[0]  # type: ignore[arg-type]
    lp = gen.logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    # the prompt's tokens first, the first one unscored, then the generated one
    assert len(lp.tokens) == len(prompt_ids) + 1
    assert "".join(lp.tokens[:-1]) == prompt and gen.text == prompt + lp.tokens[-1]
    assert lp.token_logprobs[0] is None and all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    generated, generated_logprob = lp.tokens[-1], lp.token_logprobs[-1]
    assert generated == " Paris"
    # score prompt + the generated token as a prompt: that token's logprob is the one generation gave it
    ids = post_json(url, "/tokenize", {"model": SERVED, "prompt": prompt + generated})["tokens"]
    assert ids[:-1] == prompt_ids and len(ids) == len(prompt_ids) + 1
    scored = client.completions.create(model=SERVED, prompt=ids, max_tokens=1, logprobs=0, echo=True,
                                       **GREEDY).choices[0].logprobs  # type: ignore[arg-type]
    assert scored is not None and scored.token_logprobs is not None and scored.tokens is not None
    assert scored.tokens[len(prompt_ids)] == generated
    assert scored.token_logprobs[len(prompt_ids)] == pytest.approx(generated_logprob, abs=1e-3)
    # and the prompt's own tokens are scored the same both times
    assert scored.token_logprobs[1:len(prompt_ids)] == pytest.approx(lp.token_logprobs[1:-1], abs=1e-3)


def test_n_samples_at_temperature_one_differ(client: openai.OpenAI) -> None:
    result = chat(client, "Tell me a fun fact.", n=4, temperature=1.0, max_tokens=24)
    texts = [c.message.content for c in result.choices]
    assert sorted(c.index for c in result.choices) == [0, 1, 2, 3]
    assert len(set(texts)) > 1, texts


def test_a_prompt_of_1900_tokens(client: openai.OpenAI, url: str) -> None:
    sentence = "The quick brown fox jumps over the lazy dog near the river bank. "
    # tokens per sentence as they come in a run of them (alone, the first one tokenizes apart)
    per = post_json(url, "/tokenize", {"model": SERVED, "prompt": sentence * 100})["count"] / 100
    prompt = sentence * round(1890 / per) + "Where does the fox jump?"
    count = post_json(url, "/tokenize", {"model": SERVED, "prompt": prompt})["count"]
    assert 1850 <= count <= 1950, count
    result = client.completions.create(model=SERVED, prompt=prompt, max_tokens=16, **GREEDY)  # type: ignore[arg-type]
    assert result.usage is not None and result.usage.prompt_tokens == count
    assert result.usage.completion_tokens >= 1 and result.choices[0].text.strip()


async def test_unicode_round_trips_through_the_tokenizer_routes(url: str) -> None:
    text = "Café naïve façade, Ærøskøbing — 東京は日本の首都です。你好，世界！ 🙂🚀👍🏽 👨‍👩‍👧"
    tokens = (await post(url, "/tokenize", {"model": SERVED, "prompt": text}))["tokens"]
    assert len(tokens) > 20
    assert (await post(url, "/detokenize", {"model": SERVED, "tokens": tokens}))["prompt"] == text


# ------------------------------------------------------------------ memory under the cap
def _efficiency(url: str) -> dict:
    with urllib.request.urlopen(url + "/efficiency", timeout=30) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


async def test_a_burst_of_long_requests_stays_under_the_memory_limit(real_service: ServiceProcess, url: str,
                                                                      memory_limit: MemoryGroup) -> None:
    """The whole batch at once (32 sequences of ~330-token prompts and 32-token answers, the
    1024-token step budget full for the prefills), beside a KV cache that is resident from the
    start (vLLM zeroes it when it makes it): every request is served (32 fit the ceilings and
    no latency target is missed here), nothing is killed for memory, the engine is the same
    process, and once idle the limits stand at their ceilings, not driven down for memory the
    batch cannot free."""
    def at_ceilings() -> bool:
        doc = _efficiency(url)
        return {k: doc["limits"][k] for k in doc["ceilings"]} == doc["ceilings"]

    wait_for(at_ceilings, 120, "the limits to stand at their ceilings before the burst")
    engine = real_service.children()["engine"].pid
    prompt = "Water flows downhill and the river carries sand toward the sea. " * 25
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
        async def one(i: int) -> int:
            body = {"model": SERVED, "prompt": f"{i} {prompt}", "max_tokens": 32, "ignore_eos": True}
            async with session.post(url + "/v1/completions", json=body) as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(one(i) for i in range(32)))
    assert statuses == [200] * 32, statuses
    assert memory_limit.oom_kills() == 0
    assert real_service.proc is not None and real_service.proc.poll() is None
    assert real_service.children()["engine"].pid == engine  # not killed and restarted
    wait_for(at_ceilings, 60, "the limits to stand at their ceilings once idle")
    assert _efficiency(url)["ceilings"]["max_num_seqs"] == 32
