"""llama.cpp's `llama-server`, the peer a user with a small CPU box picks instead (issues 31, 32).

- `build()`: llama.cpp from source, once, into a cache folder named by the sdist's version and
  this CPU's flags (GGML_NATIVE tunes it to them): PyPI's `llama-cpp-python` sdist vendors
  llama.cpp's whole tree; cmake, ninja and g++ are on these machines (~7 minutes on 2 cores).
- `phi3_gguf()`: a GGUF with Phi-3-mini-4k-instruct's exact shapes and random float16 weights
  (the same shapes as `citadel-llm demo-model --size full`; llama.cpp's converter wants a
  sentencepiece `tokenizer.model`, which the generated folder does not have, so the file is
  written here with llama.cpp's own gguf-py, the folder's byte-level BPE tokenizer included),
  then `llama-quantize` makes the Q4_K_M a user would download.
- `start()`: llama-server on one GGUF as a `servers.Server`, with the settings that serve it
  well on 2 cores: every core's thread, continuous batching, one slot per stream wanted, a
  unified KV cache shared by the slots.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SDIST = "llama-cpp-python==0.3.36"
CACHE = Path(os.environ.get("CITADEL_LLAMA_CPP_CACHE", "/var/tmp/citadel-llama-cpp"))
TARGETS = ("llama-server", "llama-quantize", "llama-bench")


def _flags_id() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return hashlib.sha256(" ".join(sorted(line.split(":", 1)[1].split())).encode()).hexdigest()[:8]
    return "unknown"


def build(cache: Path = CACHE) -> Path:
    """The folder of llama.cpp's binaries, built if missing."""
    version = SDIST.split("==")[1]
    bin_dir = cache / f"build-{version}-{_flags_id()}" / "bin"
    if all((bin_dir / t).exists() for t in TARGETS):
        return bin_dir
    cache.mkdir(parents=True, exist_ok=True)
    source = cache / f"llama_cpp_python-{version}"
    if not source.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", SDIST,
                        "-d", str(cache)], check=True)
        with tarfile.open(cache / f"llama_cpp_python-{version}.tar.gz") as tar:
            tar.extractall(cache, filter="data")
    build_dir = bin_dir.parent
    subprocess.run(["cmake", "-S", str(source / "vendor" / "llama.cpp"), "-B", str(build_dir), "-G", "Ninja",
                    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_CURL=OFF",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 2), "--target", *TARGETS],
                   check=True, stdout=subprocess.DEVNULL)
    return bin_dir


def gguf_py(cache: Path = CACHE) -> Path:
    """llama.cpp's own gguf-py, from the same source tree as the binaries."""
    return cache / f"llama_cpp_python-{SDIST.split('==')[1]}" / "vendor" / "llama.cpp" / "gguf-py"


def phi3_gguf(model_dir: Path, out: Path, seed: int = 0) -> Path:
    """A float16 GGUF of the Phi-3 model in `model_dir` (config and tokenizer; its weights are not
    read: random values of the same shapes), written tensor by tensor."""
    if out.exists():
        return out
    sys.path.insert(0, str(gguf_py()))
    import gguf
    import numpy as np

    config = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv_heads, vocab = config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]
    head_dim = hidden // heads
    partial = out.with_suffix(".partial")
    writer = gguf.GGUFWriter(str(partial), "phi3")
    writer.add_name("phi-3-mini random weights")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(inter)
    writer.add_block_count(layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    # the folder's byte-level BPE vocabulary, its merges and its added tokens, padded to vocab_size
    tokens = [""] * vocab
    types = [gguf.TokenType.UNUSED] * vocab
    for text, i in tok["model"]["vocab"].items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for added in tok.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    for i in range(vocab):
        if not tokens[i]:
            tokens[i] = f"[PAD{i}]"
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_add_bos_token(False)
    shapes: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (vocab, hidden))]
    for i in range(layers):
        shapes += [(f"blk.{i}.attn_norm.weight", (hidden,)),
                   (f"blk.{i}.attn_qkv.weight", ((heads + 2 * kv_heads) * head_dim, hidden)),
                   (f"blk.{i}.attn_output.weight", (hidden, heads * head_dim)),
                   (f"blk.{i}.ffn_norm.weight", (hidden,)),
                   (f"blk.{i}.ffn_up.weight", (2 * inter, hidden)),
                   (f"blk.{i}.ffn_down.weight", (hidden, inter))]
    shapes += [("output_norm.weight", (hidden,)), ("output.weight", (vocab, hidden))]
    for name, shape in shapes:
        dtype = np.float32 if len(shape) == 1 else np.float16
        writer.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, shape in shapes:
        if len(shape) == 1:
            writer.write_tensor_data(np.ones(shape, dtype=np.float32))
        else:
            writer.write_tensor_data((rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16))
    writer.close()
    partial.rename(out)
    return out


def quantize(bin_dir: Path, source: Path, out: Path, kind: str = "Q4_K_M") -> Path:
    if not out.exists():
        partial = out.with_suffix(".partial")
        subprocess.run([str(bin_dir / "llama-quantize"), str(source), str(partial), kind], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        partial.rename(out)
    return out


def server_args(gguf_path: Path, ctx: int, parallel: int, threads: int, cache_type: str = "q8_0") -> list[str]:
    """llama-server's settings, chosen to serve it well: `threads` for prompt and generation,
    continuous batching, `parallel` slots sharing one unified KV cache of `ctx` tokens (any slot
    may take up to the whole context, as a vLLM sequence may), flash attention (needed for a
    quantized V cache), batch 512 / micro-batch 512 (llama.cpp's defaults)."""
    return ["-m", str(gguf_path), "-c", str(ctx), "-np", str(parallel), "--kv-unified", "-t", str(threads),
            "-tb", str(threads), "-cb", "-fa", "on", "-ctk", cache_type, "-ctv", cache_type,
            "-b", "512", "-ub", "512", "--no-warmup"]


def start(bin_dir: Path, gguf_path: Path, port: int, log_path: Path, ctx: int, parallel: int, threads: int,
          cache_type: str = "q8_0", preexec_fn: Callable[[], None] | None = None) -> Any:
    from servers import Server

    log = open(log_path, "wb")
    proc = subprocess.Popen([str(bin_dir / "llama-server"), *server_args(gguf_path, ctx, parallel, threads, cache_type),
                             "--host", "127.0.0.1", "--port", str(port), "--alias", "phi-3-mini"],
                            stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec_fn)

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        log.close()

    server = Server("llama-server", f"http://127.0.0.1:{port}", proc, stop)
    server.log_path = log_path
    return server
