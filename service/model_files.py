"""Model files on disk: download once, write a `sha256sum`-format manifest, verify it.

`model.sha256` lists every file of the model folder (`sha256sum -c model.sha256` checks it
too). The engine verifies a folder that has a manifest before loading it; the full hash runs
once per change of the files, then a stamp of sizes and mtimes stands for it.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MANIFEST = "model.sha256"
STAMP = ".model.sha256.verified"
_SKIP = {MANIFEST, STAMP}
CHUNK_BYTES = 8 << 20
# what `model download` fetches of a repository: weights, configuration, tokenizer, code
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"]


class ModelVerificationError(Exception):
    """The model folder does not match its manifest; str() names the files."""


class DownloadError(Exception):
    """`model download` failed; str() is one line for the operator."""


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
    """Fetch the model from the Hugging Face hub (`HF_ENDPOINT`, `HF_TOKEN`) into
    `<model_dir>.download` beside model_dir, write its manifest there, then rename it to
    model_dir: model_dir is the old folder or the whole new one, never part of one. A failed
    run keeps the files it completed there, and the next run fetches only the rest."""
    os.environ.pop("HF_HUB_OFFLINE", None)  # the engine's setting; huggingface_hub reads it once
    from huggingface_hub import HfApi, constants, snapshot_download

    constants.HF_HUB_OFFLINE = False  # in case huggingface_hub was imported before the pop
    model_dir = Path(os.path.realpath(model_dir))
    staging = model_dir.with_name(model_dir.name + ".download")
    try:
        info = HfApi().model_info(model_name, files_metadata=True)
        wanted = {s.rfilename: s.size for s in info.siblings or []
                  if any(fnmatch.fnmatch(s.rfilename, p) for p in ALLOW_PATTERNS)}
        snapshot_download(repo_id=model_name, revision=info.sha, local_dir=staging, allow_patterns=ALLOW_PATTERNS)
        # snapshot_download returns a non-empty local_dir as it is when the hub stops answering
        # after the info call: only files it completed for this commit count
        if missing := _not_fetched(staging, wanted, str(info.sha)):
            raise DownloadError(f"{model_name}: {len(missing)} file(s) not fetched ({', '.join(missing[:3])})"
                                f"; run again to fetch them (the others are kept in {staging})")
        shutil.rmtree(staging / ".cache", ignore_errors=True)  # huggingface_hub's download records
        write_manifest(staging)
        _swap_in(staging, model_dir)
    except DownloadError:
        raise
    except Exception as exc:
        if (message := _explain(exc, model_name, constants.ENDPOINT, staging)) is None:
            raise
        raise DownloadError(message) from exc
    return model_dir / MANIFEST


def _not_fetched(staging: Path, wanted: dict[str, int | None], commit: str) -> list[str]:
    from huggingface_hub._local_folder import read_download_metadata

    def fetched(name: str, size: int | None) -> bool:
        record = read_download_metadata(staging, name)
        return (record is not None and record.commit_hash == commit and (staging / name).is_file()
                and size in (None, (staging / name).stat().st_size))
    return [name for name, size in wanted.items() if not fetched(name, size)]


def _swap_in(staging: Path, model_dir: Path) -> None:
    old = model_dir.with_name(model_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if model_dir.exists():
        model_dir.rename(old)
    staging.rename(model_dir)
    shutil.rmtree(old, ignore_errors=True)


def _explain(exc: BaseException, model_name: str, endpoint: str, staging: Path) -> str | None:
    """One line for a failure of the download, or None for one that is a bug (its traceback shows)."""
    import httpx2
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    if staging.exists() and not _files(staging):
        shutil.rmtree(staging, ignore_errors=True)  # nothing fetched: nothing to keep
    kept = f" (the files fetched so far are kept in {staging}: run again to resume)" if staging.exists() else ""
    chain = [exc]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 10:
        chain.append(cause)
    network = next((e for e in chain if isinstance(e, (httpx2.TransportError, ConnectionError))), None)
    match exc:
        case GatedRepoError():
            return f"{model_name} is gated at {endpoint}: accept its conditions on the hub, then set HF_TOKEN"
        case RepositoryNotFoundError():
            return f"no repository {model_name} at {endpoint} (a private one needs HF_TOKEN)"
        case RevisionNotFoundError():
            return f"{model_name} at {endpoint}: {_first_line(exc)}"
        case HfHubHTTPError() if exc.response is not None and network is None:
            return f"the hub answered {exc.response.status_code} for {exc.response.url}{kept}"
        case _ if network is not None or isinstance(exc, LocalEntryNotFoundError):
            return f"cannot reach {endpoint}: {_first_line(network or exc)}{kept}"
        case OSError() if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return f"{exc.strerror} writing the model to {staging}{kept}"
        case OSError():
            return f"{exc.strerror or _first_line(exc)}{f': {exc.filename}' if exc.filename else ''}{kept}"
    return None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def count_parameters(model_dir: str | Path) -> int:
    """Parameters in the safetensors files, from their headers (no weights are read)."""
    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        total += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    return total


@contextmanager
def written_into_place(out: Path, tag: str) -> Iterator[Path]:
    """A temporary folder beside `out` to write a model into. When the block ends it gets the
    permissions the umask gives a new folder and file (mkdtemp's 0700 and safetensors' 0600
    would keep a service user other than the writer out) and is renamed to `out`, which must be
    absent or empty; when the block raises it is removed, and nothing is left at `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{tag}-", dir=out.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        for path in tmp.iterdir():
            path.chmod(0o666 & ~umask)
        if out.exists():
            out.rmdir()  # empty: the caller checked
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
