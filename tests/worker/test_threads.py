"""host_cpus: the affinity mask, capped by the container's cgroup CPU quota."""

from __future__ import annotations

import pytest

from core import threads


@pytest.mark.parametrize(("quota", "expected"), [("max 100000", None), ("150000 100000", 2), ("50000 100000", 1)])
def test_host_cpus_follow_the_cgroup_quota(tmp_path, monkeypatch, quota: str, expected: int | None) -> None:
    (tmp_path / "cpu.max").write_text(quota + "\n")
    monkeypatch.setattr(threads, "CGROUP_CPU_QUOTA", tmp_path / "cpu.max")
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda _pid: set(range(8)))
    assert threads.host_cpus() == (expected or 8)
