"""Faults against the real parts: a store that goes away, a full disk, a killed QEMU, bad
credentials, a deleted VM. The agent's loop (:class:`Runner`) runs on the vault's injected
clock, so the retry schedule is checked minute by minute without waiting.

Each test checks the seed's promise for its case: recoverable errors are retried on the
1, 2, 4, 8, 10, 30 minute schedule with health *warning* and no recovery point lost or
half-made, and health returns to *normal* on success; non-recoverable ones make health
*critical* with no retry; a crashed QEMU leads to a resync whose next point is exact.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from siterecovery.agent.loop import Runner
from siterecovery.domain import Health
from siterecovery.domain import ReplicationState as S
from siterecovery.policies.schedule import Action
from siterecovery.policies.states import ErrorClass
from siterecovery.store.repository import ReplicaStore
from siterecovery.store.s3 import S3Backend
from siterecovery.vault import points, service
from siterecovery.vault.records import ReplicatedVmRecord

from .test_resync import MiB, VmRig, make_rig

# tests/ is on sys.path (rootdir of the test packages): one shared module, so one pool of
# servers per session whichever test file starts them first.
import servers  # isort: skip

pytestmark = pytest.mark.qemu

SCHEDULE_MIN = [1, 2, 4, 8, 10, 30]


def record(rig: VmRig) -> ReplicatedVmRecord:
    return service.get_protection(rig.db, vm="vm1")


def protected_rig(workdir: Path, store_url: str | None = None) -> VmRig:
    rig = make_rig(workdir, store_url)
    rig.write("d0", 0, random.Random(3).randbytes(MiB))
    rig.protect()
    return rig


def close(rig: VmRig) -> None:
    rig.stop()
    rig.db.close()


def assert_retrying(rig: VmRig, attempts: int, cause: str) -> None:
    """The VM is being retried: class, attempts, next retry on the schedule, warning."""
    r = record(rig)
    assert (r.state, r.error_class, r.attempts) == (S.PROTECTED, ErrorClass.RECOVERABLE, attempts)
    assert r.health == Health.WARNING
    assert r.last_error and r.last_error.startswith(cause), r.last_error
    delay = SCHEDULE_MIN[min(attempts, len(SCHEDULE_MIN)) - 1]
    assert r.next_retry_at == rig.clock.now + timedelta(minutes=delay)


def assert_critical(rig: VmRig, cause: str) -> None:
    """No retry, an operator is needed, and time passing changes nothing."""
    r = record(rig)
    assert (r.state, r.error_class, r.health) == (S.ERROR, ErrorClass.NON_RECOVERABLE,
                                                  Health.CRITICAL)  # fmt: skip
    assert r.next_retry_at is None and r.attempts == 1
    assert r.last_error and r.last_error.startswith(cause), r.last_error
    rig.clock.advance(days=1)
    runner = Runner(rig.protection)
    assert [d.action for _, d in runner.schedule()] == [Action.NONE]
    assert runner.run_due() == []
    assert record(rig).attempts == 1


def assert_consistent(rig: VmRig) -> None:
    """The store and the vault name the same points, and the newest is the disks' content."""
    in_store = sorted(p.point_id for p in rig.store.list_points("vm1"))
    in_vault = sorted(p.point_id for p in points.list_points(rig.db, vm="vm1"))
    assert in_store == in_vault
    assert rig.latest_disks() == rig.snapshot()


def fail_through_schedule(rig: VmRig, runner: Runner, tries: int, cause: str) -> None:
    """The first failing cycle, then ``tries - 1`` retries, each exactly when due."""
    rig.clock.advance(seconds=30)
    outcomes = runner.run_due()
    assert [(o.action, o.ok) for o in outcomes] == [(Action.CYCLE, False)]
    assert_retrying(rig, 1, cause)
    for attempt in range(2, tries + 1):
        due_at = record(rig).next_retry_at
        assert due_at is not None
        rig.clock.now = due_at - timedelta(seconds=1)
        assert runner.run_due() == []  # not a second early
        rig.clock.now = due_at
        outcomes = runner.run_due()
        assert [(o.action, o.ok) for o in outcomes] == [(Action.RETRY, False)]
        assert_retrying(rig, attempt, cause)


def recover(rig: VmRig, runner: Runner) -> None:
    due_at = record(rig).next_retry_at
    assert due_at is not None
    rig.clock.now = due_at
    outcomes = runner.run_due()
    assert [(o.action, o.ok) for o in outcomes] == [(Action.RETRY, True)], outcomes
    r = record(rig)
    assert (r.state, r.health, r.attempts, r.error_class, r.next_retry_at) == (
        S.PROTECTED, Health.NORMAL, 0, None, None,
    )  # fmt: skip
    assert_consistent(rig)


# -- store unreachable ----------------------------------------------------------------------


@pytest.fixture
def seaweed_url() -> Iterator[str]:
    server = servers.shared_seaweedfs()
    bucket = f"faults-{uuid.uuid4().hex[:8]}"
    server.create_bucket(bucket)
    with servers.environ(server.env()):
        yield server.url(bucket, "replica")


def test_store_stopped_mid_cycle_is_retried_on_schedule(
    tmp_path: Path, seaweed_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = servers.shared_seaweedfs()
    rig = protected_rig(tmp_path, seaweed_url)
    try:
        runner = Runner(rig.protection)
        rig.write("d1", 2 * MiB, b"\x42" * 70000)
        # SeaweedFS dies after the cycle stored its segments, before the point is published.
        publish = ReplicaStore.publish_point

        def die_then_publish(self: ReplicaStore, *args: object, **kwargs: object) -> object:
            server.kill()
            return publish(self, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(ReplicaStore, "publish_point", die_then_publish)
        fail_through_schedule(rig, runner, 6, "network error")
        monkeypatch.undo()
        server.start()
        rig.write("d0", 5 * MiB, b"\x43" * 512)
        recover(rig, runner)
        assert len(points.list_points(rig.db, vm="vm1")) == 2
    finally:
        server.start()
        close(rig)


def test_auth_failure_against_the_store_is_critical(tmp_path: Path, seaweed_url: str) -> None:
    server = servers.shared_seaweedfs()
    rig = protected_rig(tmp_path, seaweed_url)
    try:
        # The agent's credentials are revoked: the same store, a client with a wrong secret.
        good = rig.store.backend
        assert isinstance(good, S3Backend)
        bad = S3Backend(good.bucket, good.prefix, client=server.client(secret="wrong-secret"))
        rig.protection.store = ReplicaStore(bad, rig.keys, rig.store.config)
        rig.write("d0", 0, b"\x01" * 4096)
        rig.clock.advance(seconds=30)
        (outcome,) = Runner(rig.protection).run_due()
        assert not outcome.ok and "authentication failed" in outcome.summary
        assert_critical(rig, "authentication failed")
        assert len(rig.store.list_points("vm1")) == 1
    finally:
        close(rig)


# -- target disk full -----------------------------------------------------------------------


@pytest.fixture
def small_mount(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_store_disk_is_recoverable_and_reported(tmp_path: Path, small_mount: Path) -> None:
    rig = protected_rig(tmp_path, f"file://{small_mount / 'store'}")
    try:
        runner = Runner(rig.protection)
        rig.write("d0", 4 * MiB, random.Random(4).randbytes(6 * MiB))  # does not fit
        fail_through_schedule(rig, runner, 3, "low disk space")
        assert "no space left" in (record(rig).last_error or "")
        leftovers = [p for p in (small_mount / "store").rglob(".tmp-*")]
        assert leftovers == []
        subprocess.run(["mount", "-o", "remount,size=64m", str(small_mount)], check=True)
        recover(rig, runner)
    finally:
        close(rig)


# -- QEMU killed ----------------------------------------------------------------------------


@pytest.mark.parametrize("stored_bitmap", [False, True], ids=["new-bitmap", "stored-bitmap"])
def test_killed_qemu_goes_to_resync_and_the_next_point_is_exact(
    tmp_path: Path, stored_bitmap: bool
) -> None:
    rig = protected_rig(tmp_path)
    try:
        runner = Runner(rig.protection)
        if stored_bitmap:  # a clean restart first: the bitmap is in the image when QEMU dies
            rig.stop()
            rig.start()
        rig.write("d1", MiB, b"\x55" * 200_000)
        rig.kill()
        fail_through_schedule(rig, runner, 2, "VM not reachable")
        rig.start()  # the host is back; QEMU reopens the images after the crash
        rig.clock.now = record(rig).next_retry_at  # type: ignore[assignment]
        (outcome,) = runner.run_due()
        # A bitmap made since QEMU opened the image is lost with it; one it loaded comes back
        # inconsistent. Either way the change log cannot be trusted.
        assert not outcome.ok and outcome.summary.startswith("change tracking lost")
        assert ("inconsistent" if stored_bitmap else "missing") in outcome.summary
        r = record(rig)
        assert (r.state, r.health) == (S.RESYNC_REQUIRED, Health.WARNING)
        # Not before the policy's off-hours window (18:30-06:00 UTC); then it runs.
        rig.clock.now = rig.clock.now.replace(hour=18, minute=29)
        assert runner.run_due() == []
        rig.clock.now = rig.clock.now.replace(minute=30)
        (outcome,) = runner.run_due()
        assert (outcome.action, outcome.ok) == (Action.RESYNC, True), outcome
        assert (record(rig).state, record(rig).health) == (S.PROTECTED, Health.NORMAL)
        assert_consistent(rig)
        # Delta replication resumes with a fresh change log, and is exact.
        rig.write("d0", 7 * MiB, b"\x66" * 4096)
        rig.clock.advance(seconds=30)
        (outcome,) = runner.run_due()
        assert (outcome.action, outcome.ok) == (Action.CYCLE, True), outcome
        assert_consistent(rig)
    finally:
        close(rig)


# -- VM deleted -----------------------------------------------------------------------------


def test_deleted_vm_is_critical_vm_not_found(tmp_path: Path) -> None:
    rig = protected_rig(tmp_path)
    try:
        rig.stop()
        shutil.rmtree(rig.vmdir)
        rig.clock.advance(seconds=30)
        (outcome,) = Runner(rig.protection).run_due()
        assert not outcome.ok and outcome.summary.startswith("VM not found")
        assert_critical(rig, "VM not found")
    finally:
        close(rig)
