"""Failover against real guests under TCG: unplanned to an older point, change point, commit;
and the refusals (no network mapping, a point that fails verification, no room) that must
leave the source protected and untouched."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from siterecovery.agent.embedded import EmbeddedFailover
from siterecovery.domain import FailoverKind, ReplicationState
from siterecovery.errors import InputError
from siterecovery.hypervisor.guest import guest_cmdline
from siterecovery.hypervisor.process import QemuProcess
from siterecovery.recovery import instant, network
from siterecovery.recovery.errors import FailoverError
from siterecovery.recovery.failover import FailoverOptions
from siterecovery.recovery.replica import RecoveryHost, RecoveryMode
from siterecovery.vault import jobs, points, service
from siterecovery.vault.errors import InvalidTransition

from .conftest import Site

pytestmark = [pytest.mark.qemu]
S = ReplicationState


def _state(site: Site, vm: str) -> ReplicationState:
    return service.get_protection(site.db, vm=vm).state


def _assert_untouched(site: Site, vm: str, primary: QemuProcess) -> None:
    assert _state(site, vm) == S.PROTECTED
    assert primary.alive()
    assert not (site.root / "recovery" / vm / "failover").exists()
    job = jobs.list_jobs(site.db, vm=vm, limit=1)[0]
    assert job.state == "failed" and job.error


def test_refusals_change_nothing(site: Site, protected_vm: Callable[..., QemuProcess]) -> None:
    nics = [{"network": "prod", "mac": "52:54:00:aa:bb:01"}]
    primary = protected_vm("vm-err", paused=True, nics=nics)
    # no mapping for the VM's network
    with pytest.raises(FailoverError, match="no mapping: prod") as raised:
        site.failover.unplanned("vm-err")
    assert "network map" in raised.value.hint
    _assert_untouched(site, "vm-err", primary)
    network.create_network(site.db, name="recovery-lan", kind="user", subnet="10.9.0.0/24")
    network.create_network(site.db, name="drill-lan", kind="isolated", subnet="10.99.0.0/24")
    with pytest.raises(InputError, match="isolated"):
        network.map_network(site.db, source="prod", recovery="drill-lan", test="recovery-lan")
    network.map_network(site.db, source="prod", recovery="recovery-lan", test="drill-lan")
    # a recovery host without room
    small = EmbeddedFailover(site.db, site.store, site.root / "recovery", key_file=site.key_file,
                            host=RecoveryHost(memory_mib=64))  # fmt: skip
    with pytest.raises(FailoverError, match=r"no room for VM vm-err.*256 MiB"):
        small.unplanned("vm-err")
    _assert_untouched(site, "vm-err", primary)
    # an unknown point, then a point whose index object is damaged
    with pytest.raises(InputError, match="no recovery point 'nope'"):
        site.failover.unplanned("vm-err", point_id="nope")
    latest = points.latest_point(site.db, vm="vm-err")
    assert latest is not None
    point = site.store.load_point("vm-err", latest.point_id)
    index_key = point.disks["data"].base.key
    path = Path(site.store.url.removeprefix("file://")) / index_key
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    with pytest.raises(FailoverError, match="failed verification"):
        site.failover.unplanned("vm-err")
    _assert_untouched(site, "vm-err", primary)


@pytest.mark.slow
def test_unplanned_older_point_change_point_commit(
    site: Site, protected_vm: Callable[..., QemuProcess]
) -> None:
    primary = protected_vm("vm-u", append=guest_cmdline("writer", seed=7, interval_ms=100))
    primary.wait_serial(r"^SR-WROTE 3 ", 60)
    site.protection.replicate("vm-u")
    primary.wait_serial(r"^SR-WROTE 12 ", 60)
    site.protection.replicate("vm-u")
    older, newer = points.list_points(site.db, vm="vm-u")[-2:]
    primary.kill()  # the primary site is lost

    verify = guest_cmdline("verify", seed=7)
    first = site.failover.unplanned("vm-u", point_id=older.point_id, append=verify,
                                    options=FailoverOptions(hydrate=False))  # fmt: skip
    assert _state(site, "vm-u") == S.FAILED_OVER
    first.process.wait_serial(r"^SR-VERIFY-DONE (\d+)", 120)
    have_older = len(_have(first.process))
    assert first.job.state == "succeeded" and first.record.point_id == older.point_id

    site.failover.change_point("vm-u", newer.point_id)
    record = site.failover.replica("vm-u")
    assert record is not None and record.point_id == newer.point_id
    assert not instant.pid_alive(first.process.pid)
    with pytest.raises(InvalidTransition, match="cannot start a test failover"):
        site.failover.test("vm-u")  # no drill while failed over

    site.failover.commit("vm-u")
    assert _state(site, "vm-u") == S.COMMITTED
    with pytest.raises(InvalidTransition, match="'committed': cannot run a change recovery"):
        site.failover.change_point("vm-u", older.point_id)
    record = site.failover.replica("vm-u")
    assert record is not None and record.committed
    # the newer point's replica holds more records than the older one's
    serial = Path(record.serial)
    instant.wait_hydrated(Path(record.qmp), record.disks, 120)
    text = _wait_text(serial, r"SR-VERIFY-DONE")
    assert len(_have_text(text)) > have_older >= 3


def _have(process: QemuProcess) -> dict[int, str]:
    return _have_text(process.serial_text())


def _have_text(text: str) -> dict[int, str]:
    from siterecovery.hypervisor.guest import parse_console

    return parse_console(text).have


def _wait_text(path: Path, pattern: str, timeout: float = 120) -> str:
    import re
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if re.search(pattern, text):
            return text
        time.sleep(0.2)
    raise AssertionError(f"{path} never showed {pattern!r}")


def test_failover_many_runs_each_vm(site: Site) -> None:
    results = site.failover.failover_many(["nobody-1", "nobody-2"], FailoverKind.UNPLANNED,
                                          FailoverOptions(mode=RecoveryMode.FULL))  # fmt: skip
    assert set(results) == {"nobody-1", "nobody-2"}
    assert all(isinstance(r, Exception) for r in results.values())
