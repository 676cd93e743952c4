"""The prepared-weights format (service/engine/prepared_weights.py) and what names a folder:
pure logic on real files, no engine."""

from __future__ import annotations

import json
import mmap
from pathlib import Path

import pytest
import torch

from service.engine import prepared_weights as pw
from service.engine.settings import FOUR_BIT_METHODS, checkpoint_quantization, serving_dtype
from shared.config import Phi3MiniConfig


def test_tensors_come_back_bit_for_bit_page_aligned_and_aliases_kept(tmp_path: Path) -> None:
    tensors = {"a.qweight": torch.randint(-2**31, 2**31 - 1, (48, 64), dtype=torch.int32),
               "b.weight": torch.randn(5, 7).to(torch.bfloat16),
               "c.scale": torch.tensor([0.5]),
               "d.empty": torch.empty(0, dtype=torch.float16),
               "e.strided": torch.arange(24, dtype=torch.int64).view(4, 6).t()}  # not contiguous
    folder = tmp_path / "k"
    pw.save(folder, tensors, {"lm_head.weight": "b.weight"}, {"x": 1})
    assert pw.is_whole(folder)
    mapped = pw.Mapped(folder)
    assert mapped.aliases == {"lm_head.weight": "b.weight"}
    for name, tensor in tensors.items():
        assert mapped.tensors[name].dtype == tensor.dtype and mapped.tensors[name].shape == tensor.shape
        assert torch.equal(mapped.tensors[name], tensor), name
    manifest = json.loads((folder / pw.MANIFEST).read_text())
    assert all(e["offset"] % pw.ALIGN == 0 for e in manifest["tensors"].values())
    assert manifest["identity"] == {"x": 1}


def test_a_write_to_a_mapped_tensor_stays_private(tmp_path: Path) -> None:
    folder = tmp_path / "k"
    pw.save(folder, {"w": torch.zeros(1024)}, {}, {})
    mapped = pw.Mapped(folder)
    mapped.tensors["w"] += 1  # copy-on-write: the file is never changed
    assert torch.equal(pw.Mapped(folder).tensors["w"], torch.zeros(1024))


def test_settle_releases_what_the_model_no_longer_holds(tmp_path: Path) -> None:
    folder = tmp_path / "k"
    pw.save(folder, {"kept": torch.ones(4096), "dropped": torch.ones(4096), "emb": torch.ones(4096)}, {}, {})
    mapped = pw.Mapped(folder)
    kept, emb = mapped.tensors["kept"], mapped.tensors["emb"]
    faulted, released = mapped.settle({kept.data_ptr(), emb.data_ptr()}, cold={"emb"})
    assert (faulted, released) == (4096 * 4, 4096 * 4)
    assert torch.equal(kept, torch.ones(4096)) and torch.equal(emb, torch.ones(4096))


def test_the_resident_bytes_are_those_of_the_pages_faulted_in_and_fall_when_released(tmp_path: Path) -> None:
    folder = tmp_path / "k"
    pw.save(folder, {"a": torch.ones(256 * 1024), "b": torch.ones(256 * 1024)}, {}, {})  # 1 MiB each
    mapped = pw.Mapped(folder)
    a = mapped.tensors["a"]
    mapped.settle({a.data_ptr()}, cold=set())  # faults "a" in, releases "b"
    assert pw.resident_bytes(mapped.data_file) == 1 << 20
    mapped._map.madvise(mmap.MADV_DONTNEED)  # as the kernel may under pressure: clean pages, dropped
    assert pw.resident_bytes(mapped.data_file) == 0
    assert torch.equal(a, torch.ones(256 * 1024))  # and read again on use
    assert pw.resident_bytes(tmp_path / "not-mapped") == 0


def test_a_folder_without_its_manifest_is_not_whole(tmp_path: Path) -> None:
    folder = tmp_path / "k"
    pw.save(folder, {"w": torch.ones(3)}, {}, {})
    (folder / pw.MANIFEST).unlink()
    assert not pw.is_whole(folder)
    assert not pw.is_whole(tmp_path / "missing")


def test_the_folder_is_named_by_everything_the_layout_depends_on(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "model.sha256").write_text("abc  model.safetensors\n")
    base = pw.identity(tmp_path, {"dtype": "torch.bfloat16"})
    assert set(base) == {"format", "checkpoint", "vllm", "torch", "cpu_flags", "env", "settings"}
    monkeypatch.setenv("VLLM_CPU_INT4_W4A8", "1")
    assert pw.key(pw.identity(tmp_path, {"dtype": "torch.bfloat16"})) != pw.key(base)
    monkeypatch.delenv("VLLM_CPU_INT4_W4A8")
    assert pw.key(pw.identity(tmp_path, {"dtype": "torch.bfloat16"})) == pw.key(base)
    for change in ({"vllm": "0.0.1"}, {"torch": "1.0"}, {"cpu_flags": ["avx2"]}, {"settings": {"dtype": "torch.float16"}}):
        assert pw.key({**base, **change}) != pw.key(base), change
    (tmp_path / "model.sha256").write_text("def  model.safetensors\n")
    assert pw.key(pw.identity(tmp_path, {"dtype": "torch.bfloat16"})) != pw.key(base)


def test_a_four_bit_checkpoint_is_served_in_bfloat16_on_any_cpu(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq"}}))
    auto = Phi3MiniConfig(dtype="auto")
    assert checkpoint_quantization(auto, tmp_path) == "gptq" and "gptq" in FOUR_BIT_METHODS
    assert serving_dtype(auto, tmp_path, cpu=True) == "bfloat16"
    assert serving_dtype(Phi3MiniConfig(dtype="float16"), tmp_path, cpu=True) == "float16"  # as set
    (tmp_path / "config.json").write_text("{}")
    assert checkpoint_quantization(auto, tmp_path) == ""
    assert checkpoint_quantization(Phi3MiniConfig(quantization="awq"), tmp_path) == "awq"


def test_a_four_bit_checkpoint_on_a_cpu_without_the_kernel_is_refused_before_loading(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.engine import settings

    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq"}}))
    monkeypatch.setattr(settings, "host_runs_four_bit", lambda: False)
    model = settings.ModelChoice(tmp_path, demo=False)
    with pytest.raises(settings.StartRefused, match=r"no AVX-512.*4-bit GEMM \(cpu_gemm_wna16\)"):
        settings.engine_args(Phi3MiniConfig(), model, cpu=True)
