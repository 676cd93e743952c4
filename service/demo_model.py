"""A small random-weight model with Phi-3's architecture, made locally.

No model hub is reachable where this project is tested, so the tests and the
default `make serve` use this model. It goes through the same loading code as
the real weights: a `Phi3ForCausalLM` in safetensors with a `config.json`, and a
fast tokenizer carrying Phi-3's chat special tokens and chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

# Phi-3-mini-4k-instruct's chat template, verbatim in behaviour.
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# Phi-3's special tokens; the real ones sit at ids 32000.. above the base vocab.
SPECIAL_TOKENS = [
    "<unk>",
    "<s>",
    "</s>",
    "<|endoftext|>",
    "<|assistant|>",
    "<|system|>",
    "<|end|>",
    "<|user|>",
]

BPE_VOCAB_SIZE = 4096
# head_dim = hidden_size / heads must be a multiple of 32 for vLLM's CPU attention.
HIDDEN_SIZE = 256
NUM_HEADS = 4
NUM_LAYERS = 2
INTERMEDIATE_SIZE = 512
MARKER_FILE = "citadel-demo-model.json"


def _corpus() -> list[str]:
    """English text to train the BPE merges on: CPython's own bundled docs."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def build_tokenizer(out_dir: Path) -> int:
    """Train a byte-level BPE tokenizer locally and save it; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        model_max_length=4096,
    )
    fast.chat_template = PHI3_CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return len(fast)


def make_demo_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the demo model to `out_dir` (idempotent: an existing one is kept)."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    out = Path(out_dir)
    if (out / MARKER_FILE).exists() and (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out)
    vocab_padded = (vocab + 63) // 64 * 64
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    config = Phi3Config(
        vocab_size=vocab_padded,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_HEADS,
        max_position_embeddings=4096,
        original_max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        sliding_window=None,
        tie_word_embeddings=False,
    )
    config.architectures = ["Phi3ForCausalLM"]
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(config).to(torch.float32)
    model.save_pretrained(str(out), safe_serialization=True)
    # Phi-3 stops on <|end|> as well as <|endoftext|>.
    gen = {"bos_token_id": tok.bos_token_id,
           "eos_token_id": [tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")],
           "pad_token_id": tok.pad_token_id}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    (out / MARKER_FILE).write_text(
        json.dumps({"demo": True, "seed": seed, "vocab_size": vocab_padded}) + "\n"
    )
    return out


def is_demo_model(path: str | Path) -> bool:
    return (Path(path) / MARKER_FILE).exists()
