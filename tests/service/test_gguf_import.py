"""`citadel-llm model import-gguf` refuses what it cannot convert with one line, exit 2, and
leaves nothing behind (the conversion itself runs in `make real-model`, checked in
tests/integration/test_real_model.py)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from service.gguf_import import GGUFImportError, import_gguf
from tests.helpers import ROOT


def _tiny_gguf(path: Path, arch: str) -> Path:
    """A GGUF file with a header, one metadata key and one tensor: a model of no known kind."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".importing-" in p.name)


def test_a_file_that_is_not_gguf_is_one_line_and_exit_2(tmp_path: Path) -> None:
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip, not a GGUF file")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "service", "model", "import-gguf", str(not_gguf), str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"citadel-llm: {not_gguf} is not a GGUF file (it starts with b'PK\\x03\\x04', not b'GGUF')"]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not out.exists()


def test_a_missing_file_and_a_short_file(tmp_path: Path) -> None:
    with pytest.raises(GGUFImportError, match="cannot read .*: No such file or directory"):
        import_gguf(tmp_path / "absent.gguf", tmp_path / "out")
    (tmp_path / "short.gguf").write_bytes(b"GG")
    with pytest.raises(GGUFImportError, match=r"is not a GGUF file \(it starts with b'GG', not b'GGUF'\)"):
        import_gguf(tmp_path / "short.gguf", tmp_path / "out")


def test_an_architecture_transformers_cannot_convert_is_named(tmp_path: Path) -> None:
    gguf = _tiny_gguf(tmp_path / "odd.gguf", "nosucharch")
    out = tmp_path / "out"
    with pytest.raises(GGUFImportError) as info:
        import_gguf(gguf, out, log=io.StringIO())
    message = str(info.value)
    assert "'nosucharch'" in message and "cannot be converted by transformers" in message
    assert "llama" in message  # and says which ones it converts
    assert "\n" not in message
    assert not out.exists() and _leftovers(tmp_path) == []


def test_a_gguf_that_is_no_model_is_refused(tmp_path: Path) -> None:
    from gguf import GGUFWriter

    path = tmp_path / "vocab-only.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(GGUFImportError, match="architecture 'llama'.* cannot be converted: .*tokenizer"):
        import_gguf(path, tmp_path / "out", log=io.StringIO())
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_an_existing_folder_is_not_overwritten(tmp_path: Path) -> None:
    gguf = _tiny_gguf(tmp_path / "m.gguf", "llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(GGUFImportError, match="already exists and is not empty"):
        import_gguf(gguf, out)
    assert [p.name for p in out.iterdir()] == ["config.json"]


def test_an_unknown_dtype_is_refused(tmp_path: Path) -> None:
    with pytest.raises(GGUFImportError, match="dtype 'int8' is not one of float32, bfloat16, float16"):
        import_gguf(tmp_path / "m.gguf", tmp_path / "out", dtype="int8")
