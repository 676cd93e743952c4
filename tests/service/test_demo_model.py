"""The demo model is a real Phi-3 checkpoint folder: what vLLM and transformers load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.demo_model import PHI3_CHAT_TEMPLATE, is_demo_model, make_demo_model
from tests.helpers import demo_model_dir


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return demo_model_dir()


def test_is_a_phi3_checkpoint(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["Phi3ForCausalLM"]
    assert config["model_type"] == "phi3"
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    assert head_dim % 32 == 0  # vLLM's CPU attention needs it
    assert list(model_dir.glob("*.safetensors"))
    assert is_demo_model(model_dir)


def test_tokenizer_has_phi3_chat_tokens_and_template(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    for special in ("<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|endoftext|>"):
        ids = tok.encode(special, add_special_tokens=False)
        assert len(ids) == 1, special
    text = tok.apply_chat_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == "<|system|>\nbe brief<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\n"
    assert tok.chat_template == PHI3_CHAT_TEMPLATE
    assert len(tok) <= json.loads((model_dir / "config.json").read_text())["vocab_size"]


def test_existing_model_is_kept(model_dir: Path) -> None:
    before = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert make_demo_model(model_dir) == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == before
