"""Reading the service's cgroup from fake folders laid out as v2 and as v1 hosts."""

from __future__ import annotations

from pathlib import Path

from orchestrator.cgroup import CgroupReader

PID = 4242


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def proc_with(tmp: Path, cgroup_file: str) -> Path:
    write(tmp / "proc" / str(PID) / "cgroup", cgroup_file)
    return tmp / "proc"


def test_v2_reads_memory_pressure_and_throttling_of_the_services_own_cgroup(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "cgroup.controllers", "cpuset cpu io memory pids\n")
    unit = root / "system.slice" / "citadel-llm@phi-3-mini.service"
    write(unit / "memory.current", str(1536 << 20))
    write(unit / "memory.max", str(4 << 30))
    write(unit / "memory.high", "max\n")
    write(unit / "memory.pressure", "some avg10=12.50 avg60=3.00 avg300=1.00 total=99\n"
                                    "full avg10=4.25 avg60=1.00 avg300=0.50 total=42\n")
    write(unit / "cpu.pressure", "some avg10=30.00 avg60=20.00 avg300=10.00 total=1\n")
    write(unit / "cpu.stat", "usage_usec 100\nnr_periods 10\nnr_throttled 3\nthrottled_usec 2500000\n")
    write(unit / "memory.stat", f"anon {1024 << 20}\nfile {512 << 20}\ninactive_file {384 << 20}\nactive_file {128 << 20}\n")
    write(root / "memory.current", str(9 << 30))  # the root's figures must not be taken
    proc = proc_with(tmp_path, "0::/system.slice/citadel-llm@phi-3-mini.service\n")
    s = CgroupReader(PID, root=root, proc=proc).sample()
    assert s.version == 2 and s.path == str(unit)
    assert (s.memory_current_mb, s.memory_max_mb, s.memory_high_mb) == (1536.0, 4096.0, None)
    assert s.memory_working_set_mb == 1536.0 - 384.0  # less the inactive page cache (model files read at load)
    assert (s.memory_pressure_some_avg10, s.memory_pressure_full_avg10, s.cpu_pressure_some_avg10) == (12.5, 4.25, 30.0)
    assert (s.cpu_throttled_periods, s.cpu_throttled_s) == (3, 2.5)


def test_v2_unlimited_memory_reads_as_no_limit(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "cgroup.controllers", "memory\n")
    write(root / "memory.current", str(100 << 20))
    write(root / "memory.max", "max\n")
    s = CgroupReader(PID, root=root, proc=proc_with(tmp_path, "0::/\n")).sample()
    assert (s.memory_current_mb, s.memory_max_mb) == (100.0, None)


def test_v1_falls_back_to_the_memory_and_cpu_controllers_and_system_pressure(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    mem = root / "memory" / "citadel"
    write(mem / "memory.usage_in_bytes", str(2048 << 20))
    write(mem / "memory.limit_in_bytes", str(3 << 30))
    write(mem / "memory.soft_limit_in_bytes", "9223372036854771712\n")
    write(mem / "memory.stat", f"cache {600 << 20}\ninactive_file 0\ntotal_inactive_file {500 << 20}\n")
    write(root / "cpu,cpuacct" / "citadel" / "cpu.stat", "nr_periods 5\nnr_throttled 2\nthrottled_time 1500000000\n")
    write(tmp_path / "proc" / "pressure" / "memory", "some avg10=1.00 avg60=0 avg300=0 total=0\n"
                                                     "full avg10=0.50 avg60=0 avg300=0 total=0\n")
    write(tmp_path / "proc" / "pressure" / "cpu", "some avg10=7.00 avg60=0 avg300=0 total=0\n")
    proc = proc_with(tmp_path, "9:name=systemd:/\n4:memory:/citadel\n2:cpu,cpuacct:/citadel\n0::/\n")
    s = CgroupReader(PID, root=root, proc=proc).sample()
    assert s.version == 1 and s.path == str(mem)
    assert (s.memory_current_mb, s.memory_max_mb, s.memory_high_mb) == (2048.0, 3072.0, None)
    assert s.memory_working_set_mb == 2048.0 - 500.0  # v1: the hierarchical total_inactive_file
    assert (s.memory_pressure_some_avg10, s.memory_pressure_full_avg10, s.cpu_pressure_some_avg10) == (1.0, 0.5, 7.0)
    assert (s.cpu_throttled_periods, s.cpu_throttled_s) == (2, 1.5)


def test_v1_unlimited_and_a_cgroup_not_visible_here_read_the_mount_root(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "memory" / "memory.usage_in_bytes", str(512 << 20))
    write(root / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")
    proc = proc_with(tmp_path, "4:memory:/process_api/elsewhere\n")  # a container's own namespace
    s = CgroupReader(PID, root=root, proc=proc).sample()
    assert s.version == 1 and s.path == str(root / "memory")
    assert (s.memory_current_mb, s.memory_max_mb) == (512.0, None)


def test_no_cgroup_at_all(tmp_path: Path) -> None:
    s = CgroupReader(PID, root=tmp_path / "none", proc=tmp_path).sample()
    assert s.version == 0 and s.memory_current_mb is None


def test_this_machine() -> None:
    s = CgroupReader().sample()
    assert s.version in (1, 2) and s.memory_current_mb is not None and s.memory_current_mb > 0


def test_v2_unit_reads_the_slice_that_holds_the_limit(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "cgroup.controllers", "memory\n")
    slice_ = root / "citadel-llm.slice"
    write(slice_ / "memory.max", str(4 << 30))
    write(slice_ / "memory.current", str(1800 << 20))
    unit = slice_ / "citadel-llm@phi-3-mini.service"
    write(unit / "memory.max", "max\n")
    write(unit / "memory.current", str(30 << 20))
    proc = proc_with(tmp_path, "0::/citadel-llm.slice/citadel-llm@phi-3-mini.service\n")
    s = CgroupReader(PID, root=root, proc=proc).sample()
    assert s.path == str(slice_) and (s.memory_current_mb, s.memory_max_mb) == (1800.0, 4096.0)
