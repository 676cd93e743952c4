"""A real evaluation client end to end: PyPI's lm-eval against the service, with two small
tasks written here (no dataset hub): a log-likelihood task through `local-completions` and a
`generate_until` task through `local-chat-completions`. What lm-eval reads must be what the
service computed: each choice's log-likelihood equals the sum the service gives for the
same continuation tokens, and each generation is the service's own greedy answer."""

from __future__ import annotations

import json
import math
import urllib.request
from pathlib import Path

import pytest

from benchmarks.lm_eval_tasks import generations, loglikelihoods, run_lm_eval, write_tasks
from tests.helpers import ServiceProcess, demo_model_dir

pytestmark = pytest.mark.integration


def post_json(base_url: str, path: str, body: object) -> dict:
    req = urllib.request.Request(base_url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("lm-eval-tasks"))


def test_loglikelihood_task_through_local_completions(service: ServiceProcess, tasks_dir: Path,
                                                      tmp_path: Path) -> None:
    result = run_lm_eval(service.base_url, "phi-3-mini", demo_model_dir(), tasks_dir, tmp_path, chat=False)
    samples = sorted(result["samples"], key=lambda s: s["doc_id"])
    assert len(samples) == 12 and 0.0 <= result["metrics"]["acc"] <= 1.0
    scores = loglikelihoods(samples)
    assert all(len(doc) == 4 and all(math.isfinite(x) and x < 0 for x in doc) for doc in scores), scores
    # acc is what the log-likelihoods say: the right choice scored highest
    acc = sum(max(range(4), key=doc.__getitem__) == int(s["target"]) for doc, s in zip(scores, samples)) / len(samples)
    assert result["metrics"]["acc"] == pytest.approx(acc)
    # and each log-likelihood is the service's: the continuation's tokens scored after the context
    # (tokenized as lm-eval does: no special tokens, the whole text split at the context's length)
    doc = samples[0]
    context, continuation = doc["arguments"]["gen_args_0"]["arg_0"], doc["arguments"]["gen_args_0"]["arg_1"]
    ctx_ids = post_json(service.base_url, "/tokenize", {"prompt": context, "add_special_tokens": False})["tokens"]
    whole = post_json(service.base_url, "/tokenize", {"prompt": context + continuation,
                                                      "add_special_tokens": False})["tokens"]
    assert whole[: len(ctx_ids)] == ctx_ids
    scored = post_json(service.base_url, "/v1/completions", {"prompt": whole, "max_tokens": 1, "echo": True,
                                                              "logprobs": 1, "temperature": 0})
    token_logprobs = scored["choices"][0]["logprobs"]["token_logprobs"]
    assert sum(token_logprobs[len(ctx_ids): len(whole)]) == pytest.approx(scores[0][0], abs=1e-4)


def test_generate_until_task_through_local_chat_completions(service: ServiceProcess, tasks_dir: Path,
                                                            tmp_path: Path) -> None:
    result = run_lm_eval(service.base_url, "phi-3-mini", demo_model_dir(), tasks_dir, tmp_path, chat=True)
    samples = sorted(result["samples"], key=lambda s: s["doc_id"])
    assert len(samples) == 6 and 0.0 <= result["metrics"]["exact_match"] <= 1.0
    texts = generations(samples)
    # the first document asked again the way lm-eval asks (its messages, greedy, its seed): the same answer
    messages = json.loads(samples[0]["arguments"]["gen_args_0"]["arg_0"][0])
    assert messages == [{"role": "user", "content": "What is 2 + 2? Answer with the number only."}]
    answer = post_json(service.base_url, "/v1/chat/completions", {
        "messages": messages, "max_tokens": 16, "temperature": 0, "stop": ["\n"], "seed": 1234})
    assert texts[0] == answer["choices"][0]["message"]["content"], (texts[0], answer)
