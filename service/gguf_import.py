"""`citadel-llm model import-gguf`: a GGUF file (llama.cpp's, Ollama's) to a Hugging Face
folder vLLM serves, dequantized, with its tokenizer, chat template, generation config and
`model.sha256`. Written to a temporary folder beside the target and renamed at the end.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TextIO

GGUF_MAGIC = b"GGUF"
DTYPES = ("float32", "bfloat16", "float16")


class GGUFImportError(Exception):
    """A conversion that cannot succeed; str() is the one-line reason."""


def check_magic(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except IsADirectoryError:
        raise GGUFImportError(f"{path} is a directory, not a GGUF file") from None
    except OSError as exc:
        raise GGUFImportError(f"cannot read {path}: {exc.strerror or exc}") from None
    if head != GGUF_MAGIC:
        raise GGUFImportError(f"{path} is not a GGUF file (it starts with {head!r}, not {GGUF_MAGIC!r})")


def gguf_architecture(path: Path) -> str:
    """`general.architecture` from the file's header (the tensors are not read)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        field = reader.get_field("general.architecture")
        if field is None:
            raise GGUFImportError(f"{path} has no general.architecture: not a model GGUF")
        return str(field.contents())
    except GGUFImportError:
        raise
    except Exception as exc:  # a truncated or corrupt file fails in the reader in many ways
        raise GGUFImportError(f"{path} is not a readable GGUF file: {exc}") from None


def hf_architecture(path: Path, gguf_arch: str) -> str:
    """The transformers class this GGUF becomes (e.g. LlamaForCausalLM), or an error that names
    the architecture transformers cannot convert."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, NotImplementedError) as exc:
        supported = ", ".join(sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")))
        raise GGUFImportError(f"GGUF architecture {gguf_arch!r} cannot be converted by transformers ({exc}); "
                              f"it converts: {supported}") from None
    try:
        return AutoModelForCausalLM._model_mapping[type(config)].__name__  # type: ignore[attr-defined]
    except KeyError:
        raise GGUFImportError(f"GGUF architecture {gguf_arch!r} ({type(config).__name__}) "
                              "is not a causal language model") from None


def check_vllm_serves(arch: str, gguf_arch: str) -> None:
    try:
        from vllm.model_executor.models import ModelRegistry
    except ImportError:
        return  # no vLLM here: the conversion itself does not need it
    if arch not in ModelRegistry.get_supported_archs():
        raise GGUFImportError(f"GGUF architecture {gguf_arch!r} converts to {arch}, which vLLM cannot serve")


def import_gguf(gguf_file: str | Path, out_dir: str | Path, dtype: str = "float32",
                log: TextIO = sys.stderr) -> Path:
    """Convert `gguf_file` into the new folder `out_dir`; returns its manifest."""
    started = time.monotonic()

    def stage(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {text}", file=log, flush=True)

    if dtype not in DTYPES:
        raise GGUFImportError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    src = Path(gguf_file).resolve()
    out = Path(out_dir).absolute()
    check_magic(src)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GGUFImportError(f"{out} already exists and is not empty; remove it or choose another folder")
    import torch

    from service.model_files import write_manifest, written_into_place

    stage(f"reading {src.name}")
    gguf_arch = gguf_architecture(src)
    arch = hf_architecture(src, gguf_arch)
    stage(f"architecture {gguf_arch} -> {arch}; checking vLLM serves it")
    check_vllm_serves(arch, gguf_arch)

    with written_into_place(out, "importing") as tmp:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            stage("tokenizer and chat template")
            tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
            stage(f"dequantizing the weights to {dtype}")
            model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=getattr(torch, dtype))
        except (ValueError, KeyError, NotImplementedError) as exc:  # what transformers raises for what it cannot map
            reason = " ".join(str(exc).split())
            raise GGUFImportError(f"{src.name} (architecture {gguf_arch!r}) cannot be converted: {reason}") from None
        # The weights are plain tensors now: a quantization_config left in config.json would make
        # vLLM look for GGUF-quantized weights.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.config.dtype = getattr(torch, dtype)
        stage("writing safetensors, config and generation config")
        model.save_pretrained(tmp, safe_serialization=True)
        # GGUF carries no tokenizer length limit; the model's context is the honest one.
        tokenizer.model_max_length = getattr(model.config, "max_position_embeddings", tokenizer.model_max_length)
        # The chat template inside tokenizer_config.json, where every reader of the folder looks.
        tokenizer.save_pretrained(tmp, save_jinja_files=False)
        stage("writing model.sha256")
        manifest = write_manifest(tmp)
    stage(f"done: {out}")
    return out / manifest.name
