"""deploy/nginx/: installed as its header says into Debian's own /etc/nginx layout (a copy
in a temporary directory), `nginx -t` accepts it. What it does is tests/integration/test_fleet.py's."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

NGINX_DIR = Path(__file__).resolve().parents[2] / "deploy" / "nginx"
needs_nginx = pytest.mark.skipif(shutil.which("nginx") is None or not Path("/etc/nginx/nginx.conf").exists(),
                                 reason="nginx missing; `make test` installs Debian's nginx")


@needs_nginx
def test_debians_nginx_accepts_the_shipped_files(tmp_path: Path) -> None:
    etc = tmp_path / "etc-nginx"
    shutil.copytree("/etc/nginx", etc, symlinks=True)
    logs = tmp_path / "log"
    logs.mkdir()
    # the install of the file's header, into the copy
    shutil.copy(NGINX_DIR / "citadel-llm.conf", etc / "conf.d" / "citadel-llm.conf")
    shutil.copytree(NGINX_DIR / "citadel-llm", etc / "citadel-llm")
    for path in (etc / "nginx.conf", etc / "citadel-llm" / "site.conf"):
        text = path.read_text().replace("/etc/nginx/", f"{etc}/").replace("/var/log/nginx/", f"{logs}/")
        text = re.sub(r"^listen (\d+);", r"listen 127.0.0.1:\1;", text, flags=re.M)  # -t binds nothing; still
        path.write_text(re.sub(r"^\s*pid .*;$", "", text, flags=re.M))
    result = subprocess.run(["nginx", "-T", "-p", str(etc), "-c", str(etc / "nginx.conf"), "-e", str(logs / "error.log"),
                             "-g", f"pid {tmp_path / 'nginx.pid'};"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr
    # the shipped file and both site files were read (-T prints every file it read)
    for name in ("conf.d/citadel-llm.conf", "citadel-llm/replicas.conf", "citadel-llm/site.conf"):
        assert f"# configuration file {etc}/{name}:" in result.stdout
