"""Debian's nginx, unprivileged, in front of local replicas: it runs the shipped
deploy/nginx/citadel-llm.conf itself, from a small nginx.conf that includes it, with the
replicas and the listen address in the two site files that file includes."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from service.local import ROOT, free_port

SHIPPED = ROOT / "deploy" / "nginx" / "citadel-llm.conf"
SHIPPED_REPLICAS = ROOT / "deploy" / "nginx" / "citadel-llm" / "replicas.conf"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


def render_replicas(ports: list[int]) -> str:
    """The shipped replicas.conf with these ports in place of its own, in order of their first
    appearance (its parameters, comments and backup lines as they are)."""
    text = SHIPPED_REPLICAS.read_text()
    shipped = list(dict.fromkeys(re.findall(r"^server\s+127\.0\.0\.1:(\d+)", text, re.M)))
    assert len(shipped) == len(ports), f"{SHIPPED_REPLICAS} has {len(shipped)} replicas, not {len(ports)}"
    port_for = dict(zip(shipped, map(str, ports)))
    return re.sub(r"^(server\s+127\.0\.0\.1:)(\d+)", lambda m: m.group(1) + port_for[m.group(2)], text, flags=re.M)


class Nginx:
    """`nginx -p DIR -c DIR/nginx.conf` with daemon off, on 127.0.0.1:port."""

    def __init__(self, replica_ports: Iterable[int]) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="citadel-nginx-"))
        self.access_log = self.dir / "access.log"
        self.error_log = self.dir / "error.log"
        self.proc: subprocess.Popen[bytes] | None = None
        site = self.dir / "citadel-llm"
        site.mkdir()
        (site / "replicas.conf").write_text(render_replicas(list(replica_ports)))
        (site / "site.conf").write_text(
            f"listen 127.0.0.1:{self.port};\naccess_log {self.access_log} citadel_llm;\n")
        temp = "\n".join(f"  {kind}_temp_path {self.dir / kind};"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        # As root nginx's workers would switch to nobody; stay the user that runs the tests.
        user = "user root;\n" if os.geteuid() == 0 else ""
        (self.dir / "nginx.conf").write_text(
            f"{user}worker_processes 1;\nevents {{ worker_connections 1024; }}\n"
            f"http {{\n{temp}\n  access_log off;\n  include {SHIPPED};\n}}\n")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self, *extra: str) -> list[str]:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        return [nginx, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf"), "-e", str(self.error_log),
                "-g", f"daemon off; pid {self.dir / 'nginx.pid'}; error_log {self.error_log} info;", *extra]

    def start(self) -> Nginx:
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"nginx exited: {self.errors()}"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"nginx not listening after {START_TIMEOUT_S} s: {self.errors()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGQUIT)  # graceful: finish what is in flight
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT_S)

    def errors(self) -> str:
        try:
            return self.error_log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def log_lines(self) -> list[dict[str, str]]:
        """The access log, one dict per request: rid, upstream, upstream_status, status."""
        lines = []
        for line in self.access_log.read_text(errors="replace").splitlines():
            fields = dict(re.findall(r"(rid|upstream|upstream_status|rt)=(.*?)(?= \w+=|$)", line))
            status = re.search(r'" (\d{3}) ', line)
            fields["status"] = status.group(1) if status else ""
            lines.append(fields)
        return lines
