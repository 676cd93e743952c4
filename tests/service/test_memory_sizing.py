"""The KV cache's share of memory_gb: what the EngineCore may hold, handed to vLLM, which makes
the cache of what its own measurement leaves (pure arithmetic; the fit itself is measured by
the real-model memory test)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from service.engine.settings import (CORE_RUNTIME_BYTES, GIB, LOAD_HEADROOM_BYTES, OTHER_PROCESSES_BYTES,
                                     ModelDoesNotFit, OTHER_PROCESSES_THREAD_BYTES,
                                     kv_cache_args, kv_plan)
from shared.config import Phi3MiniConfig


def _model(tmp_path: Path, layers: int, kv_heads: int, head_dim: int, weight_bytes: int) -> Path:
    (tmp_path / "config.json").write_text(json.dumps({
        "num_hidden_layers": layers, "num_attention_heads": kv_heads, "num_key_value_heads": kv_heads,
        "head_dim": head_dim, "hidden_size": kv_heads * head_dim, "torch_dtype": "float32"}))
    with open(tmp_path / "model.safetensors", "wb") as f:
        f.truncate(weight_bytes)  # sparse: only its size is read
    return tmp_path


def test_a_small_model_gets_exactly_the_cache_its_sequences_need(tmp_path: Path) -> None:
    """Room to spare: the cache is set, not measured, so no estimate of the runtime can leave
    it short (a cap from one made vLLM refuse to start when the EngineCore came out larger)."""
    config = Phi3MiniConfig(max_num_seqs=16, max_model_len=2048)
    model = _model(tmp_path, 2, 4, 64, 14 << 20)
    plan = kv_plan(config, model, "float32")
    assert plan.per_token == 2 * 2 * 4 * 64 * 4
    assert plan.wanted == plan.per_token * 2048 * 16
    assert plan.fits_with_room(config)
    assert kv_cache_args(config, model, "float32") == {"kv_cache_memory_bytes": plan.wanted}


def test_a_large_model_gets_what_vllm_measures_free_of_its_budget(tmp_path: Path) -> None:
    """SmolLM2-135M's shape in float32: 32 full sequences want 3 GB of cache, more than fits."""
    config = Phi3MiniConfig(max_num_seqs=32, max_model_len=2048, memory_gb=4)
    model = _model(tmp_path, 30, 3, 64, 538_090_408)
    plan = kv_plan(config, model, "float32")
    assert plan.wanted > 3 * 10**9 and not plan.fits_with_room(config)
    budget = plan.engine_core_budget(config)
    assert budget == 4 * GIB - OTHER_PROCESSES_BYTES - LOAD_HEADROOM_BYTES
    [(name, fraction)] = kv_cache_args(config, model, "float32").items()
    assert name == "gpu_memory_utilization" and 0 < fraction < 1
    smaller = Phi3MiniConfig(max_num_seqs=32, max_model_len=2048, memory_gb=3)
    assert plan.engine_core_budget(smaller) == budget - GIB  # follows memory_gb one for one
    assert CORE_RUNTIME_BYTES + plan.weights + plan.wanted > budget


def test_bfloat16_halves_the_cache_and_the_weights(tmp_path: Path) -> None:
    config = Phi3MiniConfig()
    model = _model(tmp_path, 30, 3, 64, 538_090_408)
    f32, bf16 = kv_plan(config, model, "float32"), kv_plan(config, model, "bfloat16")
    assert bf16.per_token * 2 == f32.per_token and bf16.weights * 2 == f32.weights


def test_an_fp8_cache_holds_twice_bfloat16s_tokens_and_keeps_the_weights(tmp_path: Path) -> None:
    """kv_cache_dtype: fp8 is one byte a value: Phi-3-mini's 196,608 values a token are 192 KiB
    (384 KiB in bfloat16), and it reaches vLLM's engine arguments as set."""
    model = _model(tmp_path, 32, 32, 96, 2_280_000_000)
    bf16 = kv_plan(Phi3MiniConfig(), model, "bfloat16")
    fp8 = kv_plan(Phi3MiniConfig(kv_cache_dtype="fp8"), model, "bfloat16")
    assert (bf16.per_token, fp8.per_token) == (384 * 1024, 192 * 1024)
    assert fp8.weights == bf16.weights and fp8.wanted * 2 == bf16.wanted


def test_with_the_engine_core_on_a_thread_the_front_end_is_inside_the_measured_process(tmp_path: Path) -> None:
    """engine_core: thread leaves one process fewer outside vLLM's measurement: the budget it
    hands vLLM grows by what the front end's own process held, and the rest is unchanged."""
    config = Phi3MiniConfig(max_num_seqs=32, max_model_len=2048, memory_gb=4)
    model = _model(tmp_path, 30, 3, 64, 538_090_408)
    apart, together = kv_plan(config, model, "float32"), kv_plan(config, model, "float32", core_on_thread=True)
    assert together.engine_core_budget(config) == 4 * GIB - OTHER_PROCESSES_THREAD_BYTES - LOAD_HEADROOM_BYTES
    assert together.engine_core_budget(config) - apart.engine_core_budget(config) == \
        OTHER_PROCESSES_BYTES - OTHER_PROCESSES_THREAD_BYTES > 0
    [(_, fraction_apart)] = kv_cache_args(config, model, "float32").items()
    [(_, fraction_together)] = kv_cache_args(config, model, "float32", core_on_thread=True).items()
    assert fraction_together > fraction_apart


def test_weights_that_do_not_fit_the_budget_are_refused_with_the_numbers(tmp_path: Path) -> None:
    """Phi-3-mini's bfloat16 weights (7.64 GB) at memory_gb 4: refused before any loading, with
    what would be needed; at 12 the budget holds them and vLLM measures the rest. Its 4-bit
    weights (2.28 GB) fit 4 GB beside the smallest cache."""
    phi3 = _model(tmp_path, 32, 32, 96, 7_642_159_104)
    config = json.loads((phi3 / "config.json").read_text())
    (phi3 / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    with pytest.raises(ModelDoesNotFit, match=r"the weights \(7\.12 GiB in bfloat16\).*memory_gb=4.*budget is 2\.85 GiB"):
        kv_cache_args(Phi3MiniConfig(memory_gb=4), phi3, "bfloat16")
    [(name, _)] = kv_cache_args(Phi3MiniConfig(memory_gb=12), phi3, "bfloat16").items()
    assert name == "gpu_memory_utilization"
    os.truncate(phi3 / "model.safetensors", 2_280_000_000)  # the published 4-bit checkpoints' size
    for on_thread in (False, True):
        [(name, _)] = kv_cache_args(Phi3MiniConfig(memory_gb=4), phi3, "bfloat16", core_on_thread=on_thread).items()
        assert name == "gpu_memory_utilization"
