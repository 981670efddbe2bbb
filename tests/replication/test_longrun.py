"""Long run: a guest writes linked records at a steady rate while the agent's loop replicates
it on its real schedule (30 s copy frequency) for ``$SITERECOVERY_LONGRUN_S`` seconds
(default 600). Then every recovery point is restored and checked for consistency (see
``test_consistency.py``), the achieved RPO (the gap between consecutive points, and the age of
the newest at the end) stays within twice the copy frequency, and the agent's resident memory
stays flat."""

from __future__ import annotations

import itertools
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from siterecovery.agent.embedded import EmbeddedAgent
from siterecovery.agent.loop import Runner
from siterecovery.hypervisor.guest import parse_console
from siterecovery.store.keys import StoreKeys
from siterecovery.store.repository import ReplicaStore
from siterecovery.vault import service
from siterecovery.vault.db import open_database
from siterecovery.vault.models import SiteRole

from . import test_consistency as linked
from .test_consistency import GuestRig, start_linked_guest

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

COPY_FREQUENCY_S = 30
MiB = 1 << 20


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.timeout(0)
def test_long_run_points_rpo_and_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    duration = float(os.environ.get("SITERECOVERY_LONGRUN_S", "600"))
    # Enough record slots for the run (the guest writes about 2 linked records a second).
    monkeypatch.setattr(linked, "DISK_SIZE", (int(duration * 4) + 64) * 64 * 1024)
    vm = start_linked_guest(tmp_path, count=None, interval_ms=400)
    db = open_database(f"sqlite:///{tmp_path / 'vault.db'}")
    try:
        service.ensure_site(db, name="primary", role=SiteRole.PRIMARY)
        service.ensure_host(db, name="h1", site="primary")
        service.create_policy(db, name="p", copy_frequency_s=COPY_FREQUENCY_S, retention_h=24)
        store = ReplicaStore.init(f"file://{tmp_path / 'store'}", StoreKeys.generate())
        protection = EmbeddedAgent(db, store, tmp_path / "run")
        protection.register_vm(host="h1", name="g1", qmp_path=vm.qmp_path, config={})
        protection.enable_protection("g1", "p")
        runner = Runner(protection)
        rss: list[int] = []
        started = time.monotonic()
        while time.monotonic() - started < duration:
            for outcome in runner.run_due():
                assert outcome.ok, outcome
                rss.append(_rss())
            time.sleep(1)
        ended = datetime.now(UTC)
        rig = GuestRig(tmp_path, vm, store)
        assert vm.alive() and not parse_console(rig.console()).errors

        points = store.list_points("g1")
        assert len(points) >= duration / COPY_FREQUENCY_S - 1
        times = [p.created_at for p in points]
        gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
        gaps.append((ended - times[-1]).total_seconds())  # the RPO when the run ends
        assert max(gaps) <= 2 * COPY_FREQUENCY_S, gaps
        counts = [rig.check_point(p) for p in points]
        assert counts == sorted(counts) and counts[-1][0] > counts[0][0]
        third = max(1, len(rss) // 3)
        growth = max(rss[-third:]) - max(rss[:third])
        assert growth < 32 * MiB, [r >> 20 for r in rss]
    finally:
        vm.stop()
        db.close()
