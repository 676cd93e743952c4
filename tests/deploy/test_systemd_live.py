"""The unit under a real systemd: `deploy/install.sh`, then the operator's commands (`systemctl
enable --now`, `status`, `show`, `stop`, `journalctl`) against the real service.

systemd 252 boots as PID 1 of a private pid+mount(+uts+ipc) namespace (/work/shared/SYSTEMD.md).
Everything it, install.sh or the service writes is the namespace's own: tmpfs on /run, /tmp,
/var/tmp, /var/lib, /var/cache, /var/log, /opt and /dev/shm, a copy of /etc, a file for
/dev/console; the machine's own boot units (sysctl, tmpfiles, timers...) and generators are
masked there, and its cgroups live under one folder of this test's, removed at the end. Killing
that systemd takes every process of the namespace with it: nothing outlives the module.
One boot and one service start (one engine load) serve every test, in order.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests.helpers import ROOT, demo_model_dir, free_port, wait_for

SYSTEMD = Path("/usr/lib/systemd/systemd")
UNIT = "citadel-llm@phi-3-mini.service"
# The system's own interpreter of the checkout's Python version: the checkout's venv python is a
# symlink under /root (pyenv), which the unit's user may not enter and ProtectHome=yes hides.
SYSTEM_PYTHON = Path(f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}")
WATCHDOG_S = 6  # the test's WatchdogSec=: a stopped engine is replaced in seconds, not a minute
BOOT_TIMEOUT_S = 60.0
START_TIMEOUT_S = 480.0  # an engine start on two busy cores (eager here: no torch.compile)
RELOAD_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 110.0  # TimeoutStopSec=90 and slack
GIB = 1 << 30


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root: boots systemd in a private pid+mount namespace"
    if not SYSTEMD.exists():
        return "systemd missing (`make test` installs Debian's systemd)"
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return "unshare/nsenter (util-linux) missing"
    if not SYSTEM_PYTHON.exists():
        return f"{SYSTEM_PYTHON} missing: the unit's venv needs a system python of the checkout's version"
    return None


pytestmark = [pytest.mark.systemd, pytest.mark.skipif(_missing() is not None, reason=_missing() or "")]

# PID 1 of the namespace. $1: the cgroup folder to root systemd at (created in each hierarchy
# it manages, so that the fixture can remove all of it afterwards); $2: the checkout, which
# stays visible at its own path when it lives under a folder the namespace mounts over (a CI
# clone in /tmp).
BOOT = r"""
set -euo pipefail
CG="$1" CHECKOUT="$2"
exec 9<"$CHECKOUT"
if [ -e /sys/fs/cgroup/cgroup.controllers ]; then hierarchies=/sys/fs/cgroup; else
  hierarchies="$(for h in systemd unified cpu cpuacct memory blkio devices pids; do echo /sys/fs/cgroup/$h; done)"; fi
for d in $hierarchies; do
  [ -e "$d/cgroup.procs" ] || continue
  mkdir -p "$d/$CG" && echo 0 > "$d/$CG/cgroup.procs"
done
mount --make-rprivate /
for d in /run /tmp /var/tmp /dev/shm /opt /var/lib /var/cache /var/log; do
  mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$d"
done
chmod 1777 /tmp /var/tmp /dev/shm  # PrivateDevices= passes /dev/shm through: vLLM's semaphores stay in here
if [ ! -e "$CHECKOUT/deploy/install.sh" ]; then  # hidden by one of the mounts above: bind it back
  mkdir -p "$CHECKOUT" && mount --no-canonicalize --bind /proc/self/fd/9 "$CHECKOUT"  # the fd, not its path
fi
exec 9<&-
# install.sh's useradd renames files inside /etc: a whole copy, not single-file binds
mkdir -p /run/citadel-llm-test/etc && cp -a /etc/. /run/citadel-llm-test/etc/
mount --bind /run/citadel-llm-test/etc /etc
# none of the machine's own boot (sysctl, modules, tmpfiles, timers, fstab...): only journald
for t in sysinit sockets timers paths basic local-fs remote-fs; do
  for w in /lib/systemd/system/$t.target.wants/* /etc/systemd/system/$t.target.wants/*; do
    [ -e "$w" ] || [ -L "$w" ] || continue
    u="$(basename "$w")"
    case "$u" in systemd-journald.service|systemd-journald.socket) continue ;; esac
    ln -sfn /dev/null "/etc/systemd/system/$u"
  done
done
mkdir -p /etc/systemd/system-generators
for g in /lib/systemd/system-generators/*; do ln -sfn /dev/null "/etc/systemd/system-generators/${g##*/}"; done
mkdir -p /run/lock /run/systemd/system
printf '[Unit]\nDescription=minimal target\nRequires=systemd-journald.socket systemd-journald.service\n' \
  > /run/systemd/system/minimal.target
# PID 1 writes to /dev/console until journald runs: a file of ours, not the machine's console
touch /run/citadel-llm-test/console && mount --bind /run/citadel-llm-test/console /dev/console
exec env container=other /usr/lib/systemd/systemd --system --unit=minimal.target --log-target=journal
"""

# Inside the namespace, as root: the unit's venv over the checkout's packages, install.sh, the
# demo model, the test's ports and a short watchdog.
SETUP = r"""
set -euo pipefail
SITE="$1" MODEL="$2" PORT="$3" METRICS_PORT="$4" WATCHDOG_S="$5"
mkdir -p /opt/citadel
{SYSTEM_PYTHON} -m venv --without-pip /opt/citadel/venv
VENV_SITE="$(/opt/citadel/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "import site; site.addsitedir('$SITE')" > "$VENV_SITE/citadel-checkout.pth"
printf '#!/opt/citadel/venv/bin/python\nimport sys\nfrom service.cli import main\nsys.exit(main())\n' \
  > /opt/citadel/venv/bin/citadel-llm
chmod 0755 /opt/citadel/venv/bin/citadel-llm
bash {ROOT}/deploy/install.sh --skip-venv
cp -r "$MODEL" /opt/models/demo
chown -R citadel:citadel /opt/models
cat >> /etc/citadel-llm/phi-3-mini.env <<EOF
PHI_3_MINI_PORT=$PORT
PHI_3_MINI_METRICS_PORT=$METRICS_PORT
PHI_3_MINI_DEMO_MODEL_DIR=/opt/models/demo
PHI_3_MINI_MAX_NUM_SEQS=16
PHI_3_MINI_MAX_NUM_BATCHED_TOKENS=512
PHI_3_MINI_ENFORCE_EAGER=true
EOF
mkdir -p /etc/systemd/system/{UNIT}.d
printf '[Service]\nWatchdogSec=%s\n' "$WATCHDOG_S" > /etc/systemd/system/{UNIT}.d/test.conf
case "{ROOT}" in /tmp/*|/var/tmp/*)  # PrivateTmp= would hide a checkout (and its venv) under /tmp
  printf '[Service]\nBindReadOnlyPaths={ROOT}\n' > /etc/systemd/system/{UNIT}.d/checkout.conf ;; esac
systemctl daemon-reload
# what the unit's user can read: the venv, the checkout, the config
runuser -u citadel -- /opt/citadel/venv/bin/citadel-llm config show \
  --config /opt/citadel/config/services/phi-3-mini.yaml > /dev/null
""".replace("{SYSTEM_PYTHON}", str(SYSTEM_PYTHON)).replace("{ROOT}", str(ROOT)).replace("{UNIT}", UNIT)


def _kill_with_parent() -> None:
    """unshare gets SIGKILL if pytest dies; its --kill-child then takes systemd and the namespace."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def _cgroup_trees(name: str) -> list[Path]:
    return [p for p in (Path("/sys/fs/cgroup") / name, *Path("/sys/fs/cgroup").glob(f"*/{name}")) if p.is_dir()]


def _remove_cgroups(name: str, timeout_s: float = 30.0) -> None:
    """rmdir every folder of the test's cgroup trees, deepest first, once their processes are gone."""
    deadline = time.monotonic() + timeout_s
    for tree in _cgroup_trees(name):
        for folder in sorted((p for p in tree.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True) + [tree]:
            while True:
                try:
                    folder.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:  # EBUSY: its processes are still exiting
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)


@dataclass
class Namespace:
    pid: int  # systemd, PID 1 inside; this is its pid as the machine sees it
    cgroup_name: str
    port: int = 0
    metrics_port: int = 0

    def run(self, *argv: str, timeout_s: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["nsenter", "-t", str(self.pid), "-m", "-p", "--", *argv],
                                capture_output=True, text=True, timeout=timeout_s)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)}: exit {result.returncode}\n{result.stdout}{result.stderr}")
        return result

    def is_active(self) -> str:
        return self.run("systemctl", "is-active", UNIT, check=False).stdout.strip()

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self) -> list[str]:
        return self.run("journalctl", "-u", UNIT, "-o", "cat", "--no-pager").stdout.splitlines()

    def diagnosis(self) -> str:
        status = self.run("systemctl", "status", "--no-pager", "-l", UNIT, check=False).stdout
        return f"{status}\n--- journal (last 40 lines)\n" + "\n".join(self.journal()[-40:])

    def cgroup(self) -> Path:
        """The unit's cgroup folder as the machine sees it (the name=systemd or v2 hierarchy)."""
        path = self.show(UNIT, "ControlGroup")["ControlGroup"].lstrip("/")
        assert path, "the unit has no cgroup"
        for base in ("/sys/fs/cgroup/systemd", "/sys/fs/cgroup"):
            if (Path(base) / path / "cgroup.procs").exists():
                return Path(base) / path
        raise AssertionError(f"cgroup {path} not found")

    def processes(self) -> dict[int, str]:
        """pid (the machine's) -> command line, of every process in the unit's cgroup."""
        found = {}
        for pid in map(int, (self.cgroup() / "cgroup.procs").read_text().split()):
            try:
                found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                continue
        return found

    def role_pid(self, role: str) -> int | None:
        return next((pid for pid, cmd in self.processes().items() if cmd == f"citadel-llm {role}"), None)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def ns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Namespace]:
    cgroup_name = f"citadel-llm-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    log_path = tmp_path_factory.mktemp("systemd") / "boot.log"
    with open(log_path, "wb") as log:
        unshare = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount", "--uts", "--ipc", "--mount-proc", "--kill-child",
             "bash", "-c", BOOT, "boot", cgroup_name, str(ROOT)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_kill_with_parent,  # noqa: PLW1509
        )
    sd_pid = 0
    try:
        def systemd_started() -> bool:
            nonlocal sd_pid
            assert unshare.poll() is None, log_path.read_text()
            children = psutil.Process(unshare.pid).children()
            sd_pid = children[0].pid if children else 0
            return bool(sd_pid) and Path(f"/proc/{sd_pid}/exe").resolve() == SYSTEMD

        wait_for(systemd_started, BOOT_TIMEOUT_S, "systemd to start")
        wait_for(lambda: Path(f"/proc/{sd_pid}/root/run/systemd/private").exists(), BOOT_TIMEOUT_S,
                 "systemd's control socket")
        space = Namespace(sd_pid, cgroup_name, free_port(), free_port())
        state = space.run("systemctl", "is-system-running", "--wait", timeout_s=BOOT_TIMEOUT_S, check=False)
        assert state.stdout.strip() == "running", (
            state.stdout + state.stderr + space.run("systemctl", "--failed", "--no-pager", check=False).stdout)
        site = sysconfig.get_paths()["purelib"]  # the checkout's venv, with its editable install
        space.run("bash", "-c", SETUP, "setup", site, str(demo_model_dir()), str(space.port), str(space.metrics_port),
                  str(WATCHDOG_S), timeout_s=120)
        yield space
    finally:
        try:
            if sd_pid:
                os.kill(sd_pid, signal.SIGKILL)  # every process of the namespace goes with it
            unshare.kill()
            unshare.wait(30)
        finally:
            _remove_cgroups(cgroup_name)


def http(url: str, body: dict | None = None, headers: dict[str, str] | None = None,
         timeout_s: float = 30.0) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read())
        except ValueError:
            return exc.code, {}
    except OSError:  # not listening (yet, or any more), reset, timed out
        return 0, {}


def complete(ns: Namespace, max_tokens: int = 4) -> tuple[int, dict]:
    return http(ns.base_url + "/v1/completions", {"prompt": "hello", "max_tokens": max_tokens})


def wait_serving(ns: Namespace, timeout_s: float) -> None:
    wait_for(lambda: complete(ns)[0] == 200, timeout_s, "a completion to succeed")


@dataclass
class Start:
    seconds_to_active: float
    samples: list[tuple[str, int]] = field(default_factory=list)  # (is-active, /health status)


@pytest.fixture(scope="module")
def started(ns: Namespace) -> Start:
    """`systemctl enable --now`, watched from the side every half second until it returns."""
    began = time.monotonic()
    enable = subprocess.Popen(["nsenter", "-t", str(ns.pid), "-m", "-p", "--", "systemctl", "enable", "--now", UNIT],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    start = Start(0.0)
    try:
        while enable.poll() is None and time.monotonic() - began < START_TIMEOUT_S:
            start.samples.append((ns.is_active(), http(ns.base_url + "/health", timeout_s=2)[0]))
            time.sleep(0.5)
        start.seconds_to_active = time.monotonic() - began
    finally:
        if enable.poll() is None:
            enable.kill()
        output, _ = enable.communicate(timeout=10)
    assert enable.returncode == 0, f"enable --now: exit {enable.returncode}\n{output}\n{ns.diagnosis()}"
    start.samples.append((ns.is_active(), http(ns.base_url + "/health", timeout_s=2)[0]))
    loaded = next((json.loads(line) for line in ns.journal() if '"event": "engine ready"' in line), {})
    print(f"\n{UNIT}: active {start.seconds_to_active:.1f} s after `systemctl enable --now` "
          f"(engine load {loaded.get('load_seconds')} s of it)")
    return start


def test_unit_is_active_only_once_the_model_has_loaded(ns: Namespace, started: Start) -> None:
    states = [state for state, _ in started.samples]
    assert "activating" in states and states[-1] == "active", states
    assert states.index("activating") < states.index("active")
    # activating while the engine loads (the gateway answers, /health is not 200 yet)…
    assert any(state == "activating" and health != 200 for state, health in started.samples), started.samples
    # …active only with the engine loaded and serving
    assert all(health == 200 for state, health in started.samples if state == "active"), started.samples
    assert ns.run("systemctl", "is-enabled", UNIT).stdout.strip() == "enabled"
    status, body = http(ns.base_url + "/health")
    assert status == 200 and body["status"] == "healthy", body
    status, body = complete(ns)
    assert status == 200 and body["choices"][0]["text"] is not None, body


def _cpu_seconds(ns: Namespace, shown: str) -> float:
    """CPUUsageNSec. systemd 252 reads it from the cpuacct hierarchy, which it creates only when
    "cpu" and "cpuacct" share one (as systemd mounts them); on a host that mounts them apart it
    stays [not set], and the kernel's own figure for the same cgroup is cgroup2's cpu.stat."""
    if shown.isdigit():
        return int(shown) / 1e9
    split = Path("/sys/fs/cgroup/cpuacct").resolve() != Path("/sys/fs/cgroup/cpu").resolve()
    assert split and shown == "[not set]", f"CPUUsageNSec={shown} with cpu and cpuacct mounted together"
    path = ns.show(UNIT, "ControlGroup")["ControlGroup"].lstrip("/")
    stat = dict(line.split() for line in (Path("/sys/fs/cgroup/unified") / path / "cpu.stat").read_text().splitlines())
    return int(stat["usage_usec"]) / 1e6


def test_show_accounts_for_the_whole_service(ns: Namespace, started: Start) -> None:
    shown = ns.show(UNIT, "MemoryCurrent", "CPUUsageNSec", "ExecMainStartTimestampMonotonic", "MainPID")
    caps = ns.show("citadel-llm.slice", "MemoryMax", "CPUQuotaPerSecUSec")
    assert caps == {"MemoryMax": str(4 * GIB), "CPUQuotaPerSecUSec": "2s"}, caps  # memory_gb 4, cpu_cores 2
    memory = int(shown["MemoryCurrent"])
    # the engine included (the gateway alone is ~100 MB), under the slice's cap
    assert 500 << 20 < memory < 4 * GIB, shown
    up_s = time.monotonic() - int(shown["ExecMainStartTimestampMonotonic"]) / 1e6
    cpu_s = _cpu_seconds(ns, shown["CPUUsageNSec"])
    assert 0 < cpu_s <= 2 * up_s * 1.05, (cpu_s, up_s)  # CPUQuota=200%: within two cores
    print(f"\nMemoryCurrent={memory / (1 << 20):.0f} MiB CPUUsageNSec={shown['CPUUsageNSec']} "
          f"(cgroup CPU {cpu_s:.1f} s over {up_s:.1f} s up)")
    # every process of the service is in the unit's cgroup: serve and its three roles, vLLM's EngineCore
    commands = set(ns.processes().values())
    assert {"citadel-llm serve", "citadel-llm engine", "citadel-llm gateway", "citadel-llm orchestrator"} <= commands
    assert any("EngineCore" in cmd for cmd in commands), commands
    # the engine is the one the kernel picks in an out-of-memory kill (serve raises its score)
    engine = ns.role_pid("engine")
    assert int(Path(f"/proc/{engine}/oom_score_adj").read_text()) == 500
    status = ns.run("systemctl", "status", "--no-pager", UNIT).stdout
    assert "active (running)" in status and 'Status: "serving"' in status, status
    assert "citadel-llm engine" in status, status


def test_journal_holds_the_request_lines(ns: Namespace, started: Start) -> None:
    request_id = f"systemd-live-{uuid.uuid4().hex}"
    status, _ = http(ns.base_url + "/v1/completions", {"prompt": "hi", "max_tokens": 2},
                     headers={"X-Request-Id": request_id})
    assert status == 200

    def logged() -> dict | None:
        for line in ns.journal():
            if request_id in line and line.startswith("{"):
                record = json.loads(line)
                if record.get("event") == "request":
                    return record
        return None

    wait_for(lambda: logged() is not None, 10, "the request line in the journal")
    record = logged()
    assert record is not None and record["request_id"] == request_id, record
    assert record["status"] == 200 and record["role"] == "gateway" and record["route"] == "/v1/completions", record


def _stays_active_until_serving(ns: Namespace, main_pid: str) -> float:
    """Poll until a completion succeeds; the unit must stay active with the same serve throughout."""
    began = time.monotonic()
    while time.monotonic() - began < RELOAD_TIMEOUT_S:
        assert ns.is_active() == "active", ns.diagnosis()
        if complete(ns)[0] == 200:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"not serving again after {RELOAD_TIMEOUT_S} s\n{ns.diagnosis()}")
    shown = ns.show(UNIT, "MainPID", "NRestarts")
    assert shown == {"MainPID": main_pid, "NRestarts": "0"}, shown  # serve restarted the engine, not systemd
    return time.monotonic() - began


def test_engine_killed_is_restarted_inside_the_unit(ns: Namespace, started: Start) -> None:
    wait_serving(ns, 30)
    main_pid = ns.show(UNIT, "MainPID")["MainPID"]
    engine = ns.role_pid("engine")
    assert engine is not None
    os.kill(engine, signal.SIGKILL)
    took = _stays_active_until_serving(ns, main_pid)
    new_engine = ns.role_pid("engine")
    assert new_engine not in (None, engine)
    print(f"\nkill -9 of the engine: serving again after {took:.1f} s")


def _watchdog_timeouts(ns: Namespace) -> int:
    return sum('"child watchdog timeout' in line and '"role": "engine"' in line for line in ns.journal())


def test_stopped_engine_is_restarted_by_the_watchdog(ns: Namespace, started: Start) -> None:
    wait_serving(ns, 30)
    main_pid = ns.show(UNIT, "MainPID")["MainPID"]
    engine = ns.role_pid("engine")
    assert engine is not None
    timeouts_before = _watchdog_timeouts(ns)
    os.kill(engine, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        wait_for(lambda: ns.role_pid("engine") not in (None, engine), WATCHDOG_S + 20, "a new engine")
    finally:
        if Path(f"/proc/{engine}").exists():
            os.kill(engine, signal.SIGCONT)
    replaced_s = time.monotonic() - stopped_at
    assert _watchdog_timeouts(ns) == timeouts_before + 1  # killed by serve's watchdog, then restarted
    took = _stays_active_until_serving(ns, main_pid)
    print(f"\nSIGSTOP of the engine: replaced after {replaced_s:.1f} s (WatchdogSec={WATCHDOG_S}), "
          f"serving again after {replaced_s + took:.1f} s")


def test_stop_drains_the_request_in_flight(ns: Namespace, started: Start) -> None:
    wait_serving(ns, 30)
    result: dict = {}
    in_flight = threading.Thread(target=lambda: result.update(zip(("status", "body"), http(
        ns.base_url + "/v1/completions", {"prompt": "drain me", "max_tokens": 400, "ignore_eos": True}, timeout_s=60))))
    in_flight.start()
    time.sleep(0.5)
    began = time.monotonic()
    ns.run("systemctl", "stop", UNIT, timeout_s=STOP_TIMEOUT_S)
    took = time.monotonic() - began
    in_flight.join(60)
    assert result.get("status") == 200, result
    assert result["body"]["usage"]["completion_tokens"] == 400  # finished, not cut
    assert ns.is_active() == "inactive"  # not "failed"
    shown = ns.show(UNIT, "Result", "ExecMainStatus", "ControlGroup")
    assert shown == {"Result": "success", "ExecMainStatus": "0", "ControlGroup": ""}, shown  # nothing left
    print(f"\nsystemctl stop with a request in flight: {took:.1f} s")
