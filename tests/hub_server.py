"""A small Hugging Face hub on 127.0.0.1 for the tests: the routes huggingface_hub's
`snapshot_download` uses (repo info, tree listing, resolve), serving one folder as one
repository, with ways to make a transfer fail. Run in a thread: the tests stay synchronous.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf")  # what the hub keeps in LFS: resolved by a redirect


@dataclass
class HubFile:
    data: bytes
    blob_id: str  # git's blob sha1: the ETag of a file kept in git
    sha256: str  # the ETag of an LFS file (X-Linked-Etag)
    lfs: bool


@dataclass
class Seen:
    method: str
    path: str
    range: str | None


@dataclass
class HubServer:
    repo_id: str
    folder: Path
    files: dict[str, HubFile] = field(default_factory=dict)
    commit: str = ""
    # file name -> bytes after which the first GET of it is cut (the connection closed)
    cut_after_bytes: dict[str, int] = field(default_factory=dict)
    fail_get: set[str] = field(default_factory=set)  # file names whose GET answers 500
    seen: list[Seen] = field(default_factory=list)
    port: int = 0
    cdn_port: int = 0

    def __post_init__(self) -> None:
        commit = hashlib.sha1()
        for path in sorted(p for p in self.folder.rglob("*") if p.is_file()):
            name = path.relative_to(self.folder).as_posix()
            data = path.read_bytes()
            self.files[name] = HubFile(
                data=data, blob_id=hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
                sha256=hashlib.sha256(data).hexdigest(), lfs=name.endswith(LFS_SUFFIXES))
            commit.update(name.encode() + b"\0" + data)
        self.commit = commit.hexdigest()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ranges_of(self, name: str) -> list[str | None]:
        """The Range header of every GET of this file's bytes."""
        return [s.range for s in self.seen if s.method == "GET" and self._name_of(s.path) == name]

    def gets_of(self, name: str) -> int:
        return len(self.ranges_of(name))

    def _name_of(self, path: str) -> str | None:
        if path.startswith("/cdn/"):
            return next((n for n, f in self.files.items() if f.sha256 == path[5:]), None)
        marker = f"/{self.repo_id}/resolve/"
        return path[len(marker):].partition("/")[2] if path.startswith(marker) else None

    # --- the hub's answers -----------------------------------------------------------

    def _not_found(self, code: str, message: str) -> web.Response:
        # what huggingface_hub's hf_raise_for_status reads: X-Error-Code, X-Error-Message
        return web.json_response({"error": message}, status=404, headers={
            "X-Error-Code": code, "X-Error-Message": message, "X-Repo-Commit": self.commit})

    def _check(self, request: web.Request) -> web.Response | None:
        repo = f"{request.match_info['ns']}/{request.match_info['name']}"
        if repo != self.repo_id:
            return self._not_found("RepoNotFound", "Repository not found")
        rev = request.match_info.get("rev", "main")
        if rev not in ("main", self.commit):
            return self._not_found("RevisionNotFound", f"Invalid rev id: {rev}")
        return None

    def _entry(self, name: str, f: HubFile) -> dict[str, object]:
        entry: dict[str, object] = {"type": "file", "oid": f.blob_id, "size": len(f.data), "path": name}
        if f.lfs:
            entry["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": 134}
        return entry

    async def _model_info(self, request: web.Request) -> web.Response:
        if (refused := self._check(request)) is not None:
            return refused
        blobs = request.query.get("blobs", "").lower() == "true"
        siblings = [{"rfilename": n, **({"size": len(f.data), "blobId": f.blob_id} if blobs else {}),
                     **({"lfs": {"sha256": f.sha256, "size": len(f.data), "pointerSize": 134}}
                        if blobs and f.lfs else {})}
                    for n, f in self.files.items()]
        return web.json_response({"_id": "0" * 24, "id": self.repo_id, "modelId": self.repo_id,
                                  "sha": self.commit, "private": False, "gated": False,
                                  "disabled": False, "tags": [], "siblings": siblings})

    async def _tree(self, request: web.Request) -> web.Response:
        if (refused := self._check(request)) is not None:
            return refused
        return web.json_response([self._entry(n, f) for n, f in self.files.items()])

    async def _resolve(self, request: web.Request) -> web.StreamResponse:
        if (refused := self._check(request)) is not None:
            return refused
        name = request.match_info["file"]
        if name not in self.files:
            return self._not_found("EntryNotFound", f"{name} does not exist on \"{request.match_info['rev']}\"")
        f = self.files[name]
        headers = {"X-Repo-Commit": self.commit}
        if f.lfs:  # as the hub does: a redirect to another host, the file's metadata on the redirect
            headers |= {"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(len(f.data)),
                        "ETag": f'"{f.blob_id}"',
                        "Location": f"http://127.0.0.2:{self.cdn_port}/cdn/{f.sha256}"}
            return web.Response(status=302, headers=headers)
        return await self._send(request, name, f, headers | {"ETag": f'"{f.blob_id}"'})

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        name = self._name_of(request.path)
        if name is None:
            return web.Response(status=404)
        f = self.files[name]
        return await self._send(request, name, f, {"ETag": f'"{f.sha256}"'})

    async def _send(self, request: web.Request, name: str, f: HubFile, headers: dict[str, str]) -> web.StreamResponse:
        if request.method == "GET":
            self.seen.append(Seen("GET", request.path, request.headers.get("Range")))
            if name in self.fail_get:
                return web.json_response({"error": "Internal Error"}, status=500)
        start, status = 0, 200
        if (wanted := request.headers.get("Range")) and wanted.startswith("bytes="):
            start = int(wanted[6:].partition("-")[0])
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(f.data) - 1}/{len(f.data)}"
        body = f.data[start:]
        response = web.StreamResponse(status=status, headers=headers | {"Accept-Ranges": "bytes"})
        response.content_length = len(body)
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        cut = self.cut_after_bytes.pop(name, None)
        if cut is not None:
            await response.write(body[:cut])
            assert request.transport is not None
            request.transport.close()  # FIN after the bytes sent: the client sees a short body
            return response
        await response.write(body)
        await response.write_eof()
        return response

    # --- running it ------------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application()
        repo = "/{ns}/{name}"
        app.router.add_get("/api/models" + repo + "/revision/{rev}", self._model_info)
        app.router.add_get("/api/models" + repo, self._model_info)
        app.router.add_get("/api/models" + repo + "/tree/{rev}", self._tree)
        app.router.add_route("*", repo + "/resolve/{rev}/{file:.+}", self._resolve)
        app.router.add_route("*", "/cdn/{sha256}", self._cdn)
        return app

    def __enter__(self) -> HubServer:
        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(self._app(), handle_signals=False, access_log=None)

        async def start() -> None:
            await self._runner.setup()
            for host in ("127.0.0.1", "127.0.0.2"):
                site = web.TCPSite(self._runner, host, 0)
                await site.start()
                port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
                if host == "127.0.0.1":
                    self.port = port
                else:
                    self.cdn_port = port

        self._thread = threading.Thread(target=self._loop.run_forever, name="hub-server", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(start(), self._loop).result(timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
