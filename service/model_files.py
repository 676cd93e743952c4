"""Model files on disk: download once, write a `sha256sum`-format manifest, verify it.

`model.sha256` lists every file of the model folder (`sha256sum -c model.sha256` checks it
too). The engine verifies a folder that has a manifest before loading it; the full hash runs
once per change of the files, then a stamp of sizes and mtimes stands for it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path

MANIFEST = "model.sha256"
STAMP = ".model.sha256.verified"
_SKIP = {MANIFEST, STAMP}
CHUNK_BYTES = 8 << 20


class ModelVerificationError(Exception):
    """The model folder does not match its manifest; str() names the files."""


def _files(model_dir: Path) -> list[Path]:
    return sorted(p for p in model_dir.rglob("*")
                  if p.is_file() and p.name not in _SKIP and ".cache" not in p.relative_to(model_dir).parts)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(model_dir: str | Path) -> Path:
    model_dir = Path(model_dir)
    lines = [f"{sha256_file(p)}  {p.relative_to(model_dir).as_posix()}\n" for p in _files(model_dir)]
    manifest = model_dir / MANIFEST
    manifest.write_text("".join(lines))
    return manifest


def verify(model_dir: str | Path) -> list[str]:
    """Problems found against the manifest: one line per file; [] when it all matches."""
    model_dir = Path(model_dir)
    manifest = model_dir / MANIFEST
    if not manifest.exists():
        return [f"{manifest}: no manifest"]
    problems = []
    listed = set()
    for line in manifest.read_text().splitlines():
        if not line.strip():
            continue
        digest, _, name = line.partition("  ")
        name = name.lstrip("*")
        listed.add(name)
        path = model_dir / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif sha256_file(path) != digest:
            problems.append(f"{name}: checksum mismatch")
    problems += [f"{name}: not in the manifest" for name in
                 (p.relative_to(model_dir).as_posix() for p in _files(model_dir)) if name not in listed]
    return problems


def _stamp_of(model_dir: Path) -> dict[str, list[int]]:
    return {p.relative_to(model_dir).as_posix(): [p.stat().st_size, p.stat().st_mtime_ns]
            for p in _files(model_dir) + [model_dir / MANIFEST]}


def verify_before_load(model_dir: str | Path) -> None:
    """Raise ModelVerificationError if a folder with a manifest fails it. A folder without
    one is loaded as it is (the demo model, or weights placed by hand)."""
    model_dir = Path(model_dir)
    if not (model_dir / MANIFEST).exists():
        return
    stamp_path = model_dir / STAMP
    current = _stamp_of(model_dir)
    try:
        if json.loads(stamp_path.read_text()) == current:
            return
    except (OSError, ValueError):
        pass
    problems = verify(model_dir)
    if problems:
        raise ModelVerificationError(
            f"model folder {model_dir} fails {MANIFEST}: " + "; ".join(problems)
            + " (run `citadel-llm model download` again, or `citadel-llm model verify`)")
    try:
        stamp_path.write_text(json.dumps(current))
    except OSError:
        pass  # a read-only model folder is verified at every start


def download(model_name: str, model_dir: str | Path) -> Path:
    """Fetch the model from the Hugging Face hub (resumable, with progress bars), then
    write its manifest."""
    from huggingface_hub import snapshot_download

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    os.environ.pop("HF_HUB_OFFLINE", None)
    snapshot_download(repo_id=model_name, local_dir=str(model_dir),
                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"])
    return write_manifest(model_dir)


def count_parameters(model_dir: str | Path) -> int:
    """Parameters in the safetensors files, from their headers (no weights are read)."""
    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        total += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    return total
