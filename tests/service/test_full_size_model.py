"""`citadel-llm demo-model --size full`: Phi-3-mini-4k-instruct's configuration, and the shard
writer on shrunken variants (the full-size files are made only by the benchmark, never here)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from service import full_size_model as fsm
from service.cli import main
from service.model_files import verify
from tests.helpers import ROOT

# microsoft/Phi-3-mini-4k-instruct's published config.json, field by field (written out here,
# apart from the module's own copy, so that a change there is caught).
PUBLISHED = {
    "architectures": ["Phi3ForCausalLM"],
    "model_type": "phi3",
    "num_hidden_layers": 32,
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32064,
    "max_position_embeddings": 4096,
    "original_max_position_embeddings": 4096,
    "sliding_window": 2047,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "rms_norm_eps": 1e-05,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "embd_pdrop": 0.0,
    "resid_pdrop": 0.0,
    "initializer_range": 0.02,
    "use_cache": True,
    "bos_token_id": 1,
    "eos_token_id": 32000,
    "pad_token_id": 32000,
    "torch_dtype": "bfloat16",
}
PHI3_MINI_PARAMETERS = 3_821_079_552  # the published parameter count ("3.82B")
SMALL = {"num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 512,
         "num_attention_heads": 4, "num_key_value_heads": 4}
LINEARS = {"self_attn.qkv_proj": (768, 256), "self_attn.o_proj": (256, 256),
           "mlp.gate_up_proj": (1024, 256), "mlp.down_proj": (256, 512)}  # (out, in) for SMALL


@pytest.fixture(scope="module")
def config_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("full") / "phi3-full"
    assert main(["demo-model", "--size", "full", "--config-only", str(out)]) == 0
    return out


def test_config_only_writes_phi3_mini_4k_published_configuration(config_only: Path) -> None:
    assert sorted(p.name for p in config_only.iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((config_only / "config.json").read_text())
    for key, value in PUBLISHED.items():
        assert config[key] == value, key
    assert set(config) == set(PUBLISHED)
    assert config["hidden_size"] // config["num_attention_heads"] == 96  # head_dim
    gen = json.loads((config_only / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": [32000, 32001, 32007], "pad_token_id": 32000}

    from transformers import AutoConfig

    loaded = AutoConfig.from_pretrained(str(config_only))
    assert type(loaded).__name__ == "Phi3Config"
    assert str(loaded.dtype) == "torch.bfloat16"
    assert loaded.sliding_window == 2047


def test_vllm_reads_the_full_size_config(config_only: Path) -> None:
    """vLLM's ModelConfig (no engine, no weights): the sizes it will allocate for."""
    from vllm.engine.arg_utils import EngineArgs

    mc = EngineArgs(model=str(config_only), dtype="bfloat16", max_model_len=2048).create_model_config()
    assert mc.hf_config.model_type == "phi3" and str(mc.dtype) == "torch.bfloat16"
    assert (mc.get_vocab_size(), mc.get_hidden_size(), mc.get_head_size()) == (32064, 3072, 96)
    assert mc.hf_config.num_hidden_layers == 32 and mc.get_sliding_window() == 2047
    assert mc.quantization is None


def test_tokenizer_has_phi3_ids_and_the_demo_chat_template(config_only: Path) -> None:
    from transformers import AutoTokenizer

    from service.demo_model import PHI3_CHAT_TEMPLATE

    tok = AutoTokenizer.from_pretrained(str(config_only))
    assert len(tok) == 32011 <= PUBLISHED["vocab_size"]  # smaller than the embedding, as Phi-3's
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 32000, 32000)
    ids = {"<|endoftext|>": 32000, "<|assistant|>": 32001, "<|system|>": 32006, "<|end|>": 32007, "<|user|>": 32010}
    for token, expected in ids.items():
        assert tok.encode(token, add_special_tokens=False) == [expected], token
    assert tok.chat_template == PHI3_CHAT_TEMPLATE
    text = tok.apply_chat_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == "<|system|>\nbe brief<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\n"
    assert tok.decode(tok.encode("Performance test", add_special_tokens=False)) == "Performance test"


def test_full_size_plan_and_estimates() -> None:
    bf16 = fsm.tensor_specs(fsm.model_config())
    assert sum(math.prod(s.shape) for s in bf16) == PHI3_MINI_PARAMETERS
    assert 7.5e9 < fsm.estimate_bytes(fsm.model_config()) < 7.7e9  # 7.64 GB
    shards = fsm.plan_shards(bf16)
    assert len(shards) == 4 and all(sum(s.nbytes for s in shard) <= fsm.SHARD_BYTES for shard in shards)
    gptq = fsm.tensor_specs(fsm.model_config(quantization="gptq"), "gptq")
    assert 2.2e9 < sum(s.nbytes for s in gptq) < 2.4e9  # 2.28 GB, as the published 4-bit checkpoints
    for spec in gptq:  # vLLM's CPU wna16 kernel takes inputs and outputs in multiples of 32
        if spec.name.endswith(".scales"):
            groups, out = spec.shape
            assert out % 32 == 0 and (groups * fsm.GPTQ_GROUP) % 32 == 0, spec
    assert {s.dtype for s in gptq if s.fill == "normal" or s.fill == "ones"} == {"bfloat16"}


def test_gptq_config(tmp_path: Path) -> None:
    out = tmp_path / "gptq"
    assert main(["demo-model", "--size", "full", "--quantization", "gptq", "--config-only", str(out)]) == 0
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (q["quant_method"], q["bits"], q["group_size"], q["sym"], q["desc_act"]) == ("gptq", 4, 128, True, False)


def _tensors(model_dir: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    from safetensors import safe_open

    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    found = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(model_dir / shard), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                assert index["weight_map"][name] == shard
                t = f.get_tensor(name)
                found[name] = (tuple(t.shape), str(t.dtype).removeprefix("torch."))
    assert set(found) == set(index["weight_map"])
    return found


def test_shrunken_bfloat16_model_loads_back(tmp_path: Path) -> None:
    lines: list[str] = []
    out = fsm.make_full_model(tmp_path / "m", overrides=SMALL, shard_bytes=10_000_000, progress=lines.append)
    tensors = _tensors(out)
    expected = {"model.embed_tokens.weight": ((32064, 256), "bfloat16"), "lm_head.weight": ((32064, 256), "bfloat16"),
                "model.norm.weight": ((256,), "bfloat16")}
    for i in range(2):
        expected[f"model.layers.{i}.input_layernorm.weight"] = ((256,), "bfloat16")
        expected[f"model.layers.{i}.post_attention_layernorm.weight"] = ((256,), "bfloat16")
        for name, shape in LINEARS.items():
            expected[f"model.layers.{i}.{name}.weight"] = (shape, "bfloat16")
    assert tensors == expected
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) == 3  # the two 16 MB embeddings alone, the layers together
    assert sum(line.startswith("shard ") for line in lines) == 3
    assert verify(out) == []  # model.sha256 as `citadel-llm model verify` checks it
    marker = json.loads((out / "citadel-demo-model.json").read_text())
    assert (marker["size"], marker["dtype"], marker["quantization"]) == ("full", "bfloat16", None)
    # The same request again keeps the folder.
    assert fsm.make_full_model(out, overrides=SMALL, shard_bytes=10_000_000, progress=lines.append) == out
    assert lines[-1].endswith("kept")

    import torch
    from safetensors.torch import load_file

    weights = {name: t for shard in shards for name, t in load_file(str(out / shard)).items()}
    for name, t in weights.items():
        if name.endswith("proj.weight") or "embed" in name or "lm_head" in name:
            assert abs(t.float().std().item() - 0.02) < 0.002, name
        else:
            assert torch.equal(t, torch.ones_like(t)), name


def test_shrunken_gptq_model_is_what_vllm_loads(tmp_path: Path) -> None:
    out = fsm.make_full_model(tmp_path / "q", overrides=SMALL, quantization="gptq", progress=lambda _: None)
    tensors = _tensors(out)
    for i in range(2):
        prefix = f"model.layers.{i}."
        for name, (n_out, n_in) in LINEARS.items():
            assert tensors.pop(prefix + name + ".qweight") == ((n_in // 8, n_out), "int32")
            assert tensors.pop(prefix + name + ".qzeros") == ((n_in // 128, n_out // 8), "int32")
            assert tensors.pop(prefix + name + ".scales") == ((n_in // 128, n_out), "float16")
            assert tensors.pop(prefix + name + ".g_idx") == ((n_in,), "int32")
        for norm in ("input_layernorm", "post_attention_layernorm"):
            assert tensors.pop(f"{prefix}{norm}.weight") == ((256,), "bfloat16")
    assert tensors == {"model.embed_tokens.weight": ((32064, 256), "bfloat16"),
                       "lm_head.weight": ((32064, 256), "bfloat16"), "model.norm.weight": ((256,), "bfloat16")}
    assert verify(out) == []

    # Dequantized as vLLM's uint4b8 (code - 8) * scale: about the initializer's spread.
    import torch
    from safetensors import safe_open

    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
        qweight = f.get_tensor("model.layers.0.mlp.down_proj.qweight")
        scales = f.get_tensor("model.layers.0.mlp.down_proj.scales")
        g_idx = f.get_tensor("model.layers.0.mlp.down_proj.g_idx")
    codes = torch.stack([(qweight >> (4 * k)) & 0xF for k in range(8)], dim=1).reshape(512, 256)
    weight = (codes - 8).float() * scales.float()[g_idx.long()]
    assert 0.015 < weight.std().item() < 0.025
    assert torch.equal(g_idx, torch.arange(512, dtype=torch.int32) // 128)

    # vLLM's own reading of the checkpoint: its GPTQ config, and which layers it quantizes.
    from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig

    config = json.loads((out / "config.json").read_text())
    quant = AutoGPTQConfig.from_config(config["quantization_config"])
    assert (quant.weight_bits, quant.group_size, quant.is_sym, quant.desc_act) == (4, 128, True, False)
    quant.maybe_update_config(str(out))
    assert sorted(quant.modules_in_block_to_quantize) == sorted(
        f"model.layers.{i}.{name}" for i in range(2) for name in LINEARS)


_PEAK_SCRIPT = """
import json, resource, sys, torch
from pathlib import Path
from service import full_size_model as fsm

config = fsm.model_config(overrides=json.loads(sys.argv[2]))
shards = fsm.plan_shards(fsm.tensor_specs(config), 100_000_000)
fsm.write_safetensors(Path(sys.argv[1]) / "warm.safetensors", shards[1][:3], torch.Generator(), 0.02, 1 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
fsm._write_weights(Path(sys.argv[1]), shards, 0, 0.02, 1 << 20, lambda line: print(line, file=sys.stderr))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"before": before, "after": after, "bytes": sum(s.nbytes for sh in shards for s in sh)}))
"""


def test_writer_never_holds_the_model_in_memory(tmp_path: Path) -> None:
    """A 211 MB variant written in 2 MB chunks: the writer's peak RSS grows by a few chunks."""
    overrides = {"num_hidden_layers": 4, "hidden_size": 1024, "intermediate_size": 2048,
                 "num_attention_heads": 8, "num_key_value_heads": 8}
    proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path), json.dumps(overrides)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    peak = json.loads(proc.stdout.splitlines()[-1])
    assert peak["bytes"] > 200e6
    assert peak["after"] - peak["before"] < 40e6, (peak, proc.stderr)
    assert len(list(tmp_path.glob("model-*.safetensors"))) == 3


def test_refuses_without_disk_room(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(fsm, "_free_bytes", lambda _path: 5 * 10**9)
    out = tmp_path / "full"
    assert main(["demo-model", "--size", "full", str(out)]) == 2
    err = capsys.readouterr()
    assert "7.64 GB on disk" in err.out
    assert "not enough disk space" in err.err and "5.00 GB is free" in err.err
    assert list(tmp_path.iterdir()) == []  # nothing written
    # 2.28 GB of GPTQ fits in the same 5 GB (only the plan is made: stop before writing).
    monkeypatch.setattr(fsm, "_trained_tokenizer", lambda: (_ for _ in ()).throw(fsm.DemoModelError("stop here")))
    assert main(["demo-model", "--size", "full", "--quantization", "gptq", str(out)]) == 2
    assert "stop here" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo-model", "--dtype", "float32", str(tmp_path / "a")]) == 2
    assert "go with --size full" in capsys.readouterr().err
    assert main(["demo-model", "--size", "full", "--quantization", "gptq", "--dtype", "float32",
                 "--config-only", str(tmp_path / "b")]) == 2
    assert "16 bits" in capsys.readouterr().err
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("x")
    assert main(["demo-model", "--size", "full", "--config-only", str(tmp_path / "c")]) == 2
    assert "not empty" in capsys.readouterr().err
