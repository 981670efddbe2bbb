"""Bandwidth limits per policy (work / off-hours), the app-consistent schedule, and the
runner's memory budget: pure functions with tables, then a throttled cycle on a real QEMU."""

from __future__ import annotations

import random
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from siterecovery.agent.loop import MemoryBudget
from siterecovery.errors import InputError
from siterecovery.policies.schedule import MBPS, app_consistent_due, bandwidth_limit
from siterecovery.vault import points, service

from .test_resync import MiB, make_rig

WINDOW = "18:30-06:00"
DAY = datetime(2024, 5, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("hhmm", "work", "off", "expected"),
    [
        ("12:00", 8, 80, 8 * MBPS),
        ("18:29", 8, 80, 8 * MBPS),
        ("18:30", 8, 80, 80 * MBPS),
        ("03:00", 8, 80, 80 * MBPS),
        ("06:00", 8, 80, 8 * MBPS),
        ("12:00", None, 80, None),
        ("23:00", 8, None, None),
        ("23:00", None, None, None),
    ],
)
def test_bandwidth_limit_follows_the_off_hours_window(
    hhmm: str, work: int | None, off: int | None, expected: int | None
) -> None:
    hour, minute = map(int, hhmm.split(":"))
    assert bandwidth_limit(WINDOW, work, off, DAY.replace(hour=hour, minute=minute)) == expected


def test_bandwidth_limit_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="positive"):
        bandwidth_limit(WINDOW, 0, None, DAY.replace(hour=12))
    with pytest.raises(InputError):
        bandwidth_limit("noon", 1, None, DAY)


@pytest.mark.parametrize(
    ("every_h", "last_age_h", "due"),
    [(0, None, False), (0, 100, False), (4, None, True), (4, 3.99, False), (4, 4, True),
     (1, 1.5, True)],
)  # fmt: skip
def test_app_consistent_due(every_h: int, last_age_h: float | None, due: bool) -> None:
    now = DAY.replace(hour=12)
    last = None if last_age_h is None else now - timedelta(hours=last_age_h)
    assert app_consistent_due(every_h, last, now) is due


def test_memory_budget_bounds_concurrent_holders() -> None:
    budget = MemoryBudget(100)
    inside: list[int] = []
    lock = threading.Lock()
    peak = [0]

    def worker(n: int) -> None:
        with budget.hold(n):
            with lock:
                inside.append(n)
                peak[0] = max(peak[0], sum(inside))
            time.sleep(0.05)
            with lock:
                inside.remove(n)

    threads = [threading.Thread(target=worker, args=(n,)) for n in (60, 60, 30, 150, 10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    # 150 exceeds the budget: it ran alone; everything else stayed within 100.
    assert budget.used == 0
    assert budget.peak == 150
    assert peak[0] <= 150
    with pytest.raises(InputError):
        MemoryBudget(0)


@pytest.mark.qemu
def test_cycles_are_throttled_in_work_hours_only(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    try:
        service.create_policy(
            rig.db, name="slow", copy_frequency_s=30, retention_h=24, bandwidth_work_mbps=16
        )
        assert rig.vm is not None
        rig.protection.register_vm(host="h1", name="vm1", qmp_path=rig.vm.qmp_path, config={})
        rig.protection.enable_protection("vm1", "slow")
        rng = random.Random(2)
        rig.write("d0", 0, rng.randbytes(6 * MiB))  # incompressible: 6.3 MB to ship
        assert rig.clock.now.hour == 12  # work hours: 16 Mbit/s = 2 MB/s, 2 MB burst
        slow = rig.protection.replicate("vm1")
        assert slow.duration_s >= 1.9, slow.figures()
        figures = points.latest_point(rig.db, vm="vm1").figures  # type: ignore[union-attr]
        assert figures["bandwidth_limit_bps"] == 16 * MBPS
        assert rig.latest_disks() == rig.snapshot()

        rig.clock.now = rig.clock.now.replace(hour=20)  # off-hours, no off-hours limit
        rig.write("d0", 0, rng.randbytes(6 * MiB))
        fast = rig.protection.replicate("vm1")
        figures = points.latest_point(rig.db, vm="vm1").figures  # type: ignore[union-attr]
        assert figures["bandwidth_limit_bps"] is None
        assert fast.duration_s < slow.duration_s
        assert rig.latest_disks() == rig.snapshot()
    finally:
        rig.stop()
        rig.db.close()
