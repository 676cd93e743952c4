"""Model files: the manifest, `model verify`, and the engine refusing a folder that fails it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.model_files import MANIFEST, ModelVerificationError, verify_before_load, write_manifest
from tests.helpers import ROOT, demo_model_dir


@pytest.fixture()
def model_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(demo_model_dir(), copy)
    write_manifest(copy)
    return copy


def flip_one_byte(path: Path, offset: int = 200) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHI_3_MINI_")}
    return subprocess.run([sys.executable, "-m", "service", *args], capture_output=True, text=True,
                          env=env, timeout=120, cwd=ROOT)


def test_manifest_is_sha256sum_format(model_copy: Path) -> None:
    result = subprocess.run(["sha256sum", "-c", MANIFEST], cwd=model_copy, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "model.safetensors: OK" in result.stdout


def test_model_verify_passes_on_the_demo_model(model_copy: Path) -> None:
    result = cli("model", "verify", "--dir", str(model_copy))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_model_verify_fails_naming_the_changed_file(model_copy: Path) -> None:
    flip_one_byte(model_copy / "model.safetensors")
    result = cli("model", "verify", "--dir", str(model_copy))
    assert result.returncode == 1
    assert "model.safetensors" in result.stderr and "mismatch" in result.stderr
    assert "tokenizer.json" not in result.stderr


def test_missing_file_is_named(model_copy: Path) -> None:
    (model_copy / "tokenizer.json").unlink()
    result = cli("model", "verify", "--dir", str(model_copy))
    assert result.returncode == 1 and "tokenizer.json: missing" in result.stderr


def test_a_file_missing_from_the_manifest_is_named(model_copy: Path) -> None:
    (model_copy / "extra.safetensors").write_bytes(b"weights nobody listed")
    result = cli("model", "verify", "--dir", str(model_copy))
    assert result.returncode == 1 and "extra.safetensors: not in the manifest" in result.stderr


def test_verification_is_remembered_until_the_files_change(model_copy: Path) -> None:
    verify_before_load(model_copy)
    assert (model_copy / ".model.sha256.verified").exists()
    # the stamp (sizes and mtimes) stands for the full hash: a change that keeps both is not
    # re-hashed (which is how a stamp can be told from a hash that is merely fast)
    weights = model_copy / "model.safetensors"
    before = weights.stat()
    flip_one_byte(weights)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    verify_before_load(model_copy)
    flip_one_byte(weights)  # back to the verified bytes
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    flip_one_byte(model_copy / "model.safetensors")
    with pytest.raises(ModelVerificationError, match="model.safetensors: checksum mismatch"):
        verify_before_load(model_copy)


def test_engine_refuses_a_folder_that_fails_its_manifest(model_copy: Path, tmp_path: Path) -> None:
    flip_one_byte(model_copy / "model.safetensors")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHI_3_MINI_")}
    env.update(PHI_3_MINI_MODEL_PATH=str(model_copy), PHI_3_MINI_RUNTIME_DIR=str(tmp_path / "run"))
    result = subprocess.run([sys.executable, "-m", "service", "engine"], capture_output=True, text=True,
                            env=env, timeout=120, cwd=ROOT)
    assert result.returncode == 2  # failed to start
    output = result.stdout + result.stderr
    assert "fails model.sha256" in output and "model.safetensors: checksum mismatch" in output
