"""vLLM's parallelism and quantization settings pass through: tensor_parallel_size,
pipeline_parallel_size, distributed_executor_backend, quantization and kv_cache_dtype reach AsyncEngineArgs as
set, and vLLM's choice is the default."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import DEFAULT_CONFIG_FILE, ConfigError, load_config


def _args(environ: dict[str, str]):  # type: ignore[no-untyped-def]
    from service.engine.settings import ModelChoice, engine_args

    config = load_config(DEFAULT_CONFIG_FILE, environ=environ)
    return engine_args(config, ModelChoice(path=Path("/models/x"), demo=False), cpu=False)


def test_defaults_leave_the_choice_to_vllm() -> None:
    args = _args({})
    assert (args.tensor_parallel_size, args.pipeline_parallel_size) == (1, 1)
    assert args.distributed_executor_backend is None
    assert args.quantization is None  # the checkpoint's quantization_config decides


def test_parallelism_is_passed_to_vllm() -> None:
    args = _args({"PHI_3_MINI_TENSOR_PARALLEL_SIZE": "2", "PHI_3_MINI_PIPELINE_PARALLEL_SIZE": "2",
                  "PHI_3_MINI_DISTRIBUTED_EXECUTOR_BACKEND": "ray"})
    assert (args.tensor_parallel_size, args.pipeline_parallel_size) == (2, 2)
    assert args.distributed_executor_backend == "ray"


def test_quantization_is_passed_to_vllm() -> None:
    assert _args({"PHI_3_MINI_QUANTIZATION": "gptq"}).quantization == "gptq"


def test_kv_cache_dtype_is_passed_to_vllm() -> None:
    assert _args({}).kv_cache_dtype == "auto"  # vLLM's default: the serving dtype
    assert _args({"PHI_3_MINI_KV_CACHE_DTYPE": "fp8"}).kv_cache_dtype == "fp8"


@pytest.mark.parametrize(("name", "value", "rule"), [
    ("KV_CACHE_DTYPE", "int4", "allowed: auto, fp8"),
    ("QUANTIZATION", "GPTQ 4bit", "quantization"),
    ("PIPELINE_PARALLEL_SIZE", "0", ">= 1"),
    ("DISTRIBUTED_EXECUTOR_BACKEND", "threads", "allowed: , mp, ray, uni, external_launcher"),
])
def test_bad_values_are_refused_by_name(name: str, value: str, rule: str) -> None:
    with pytest.raises(ConfigError, match=name.lower()) as err:
        load_config(DEFAULT_CONFIG_FILE, environ={f"PHI_3_MINI_{name}": value})
    assert rule in str(err.value)
