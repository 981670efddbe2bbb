"""Retention: golden tables of points and survivors, invariants on random timelines, prune."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from siterecovery.domain import Consistency
from siterecovery.store import DiskChain, ReplicaStore, StoreInputError, StoreKeys
from siterecovery.store.leases import list_leases
from siterecovery.store.memory import MemoryBackend
from siterecovery.store.retention import (
    MaintenanceRefused,
    PointInfo,
    RetentionPolicy,
    prune,
    select_expired,
)

from .conftest import BACKEND_MAKERS, BLOCK

NOW = datetime(2024, 5, 2, 12, 30, tzinfo=UTC)
A, C = Consistency.APP, Consistency.CRASH


@pytest.fixture(params=["file", "memory"])
def store(
    request: pytest.FixtureRequest, tmp_path: Path, keys: StoreKeys
) -> Iterator[ReplicaStore]:
    """Overrides the conftest fixture: only the fast local backends here (the object-store
    backends run in the garbage collection tests)."""
    with BACKEND_MAKERS[request.param](tmp_path) as url:
        yield ReplicaStore.init(url, keys, block_size=BLOCK, workers=2)


def at(text: str) -> datetime:
    return datetime.strptime(text, "%m-%d %H:%M").replace(year=2024, tzinfo=UTC)


def timeline(rows: list[tuple[str, str, Consistency]]) -> list[PointInfo]:
    return [PointInfo(name, at(when), kind) for name, when, kind in rows]


# name, created (month-day hour:minute), consistency; policy 24 h, keep all 1 h, now 05-02 12:30
GOLDEN = [
    ("p01", "05-01 11:00", C),  # older than 24 h: expired
    ("p02", "05-01 12:40", A),  # hour 12: the app point survives ...
    ("p03", "05-01 12:50", C),  # ... over a newer crash point
    ("p04", "05-01 13:10", C),  # hour 13, no app point: the newest survives ...
    ("p05", "05-01 13:40", C),  # ... this one
    ("p06", "05-02 10:05", A),  # hour 10: the newest app point survives
    ("p07", "05-02 10:35", A),
    ("p08", "05-02 10:55", C),
    ("p09", "05-02 11:20", C),  # thinning window, but hour 11 has a newer point (p10)
    ("p10", "05-02 11:45", C),  # keep-all window
    ("p11", "05-02 12:10", C),
    ("p12", "05-02 12:29", C),  # newest
]
GOLDEN_EXPIRED = ["p01", "p03", "p04", "p06", "p08", "p09"]


def test_golden_timeline() -> None:
    policy = RetentionPolicy(retention_hours=24, keep_all_hours=1)
    assert select_expired(timeline(GOLDEN), policy, NOW) == GOLDEN_EXPIRED


def test_input_order_does_not_matter() -> None:
    points = timeline(GOLDEN)
    random.Random(3).shuffle(points)
    assert select_expired(points, RetentionPolicy(24, 1), NOW) == GOLDEN_EXPIRED


@pytest.mark.parametrize(
    ("rows", "policy", "expired"),
    [
        # the newest point survives even when older than the retention
        ([("old", "04-20 10:00", C), ("newest", "04-21 10:00", C)], (24, 1), ["old"]),
        # exactly keep_all old: thinned; exactly retention old: expired
        (
            [("r", "05-01 12:30", A), ("k", "05-02 11:30", C), ("k2", "05-02 11:40", C),
             ("n", "05-02 12:20", C)],
            (24, 1),
            ["r", "k"],
        ),
        # keep_all 0: only one per hour (and the newest) survive
        ([("a", "05-02 12:01", C), ("b", "05-02 12:02", C), ("c", "05-02 12:03", C)], (24, 0),
         ["a", "b"]),
        # an app point of the keep-all window is its hour's survivor: the older crash goes
        ([("c", "05-02 11:10", C), ("a", "05-02 11:50", A), ("n", "05-02 12:20", C)], (24, 1),
         ["c"]),
        # points dated in the future are kept
        ([("f", "05-02 14:00", C), ("g", "05-02 15:00", C)], (1, 0), []),
        ([], (24, 1), []),
    ],
)  # fmt: skip
def test_table(
    rows: list[tuple[str, str, Consistency]], policy: tuple[float, float], expired: list[str]
) -> None:
    assert select_expired(timeline(rows), RetentionPolicy(*policy), NOW) == expired


def test_random_timelines_keep_the_invariants() -> None:
    rnd = random.Random(11)
    policy = RetentionPolicy(retention_hours=6, keep_all_hours=1.5)
    for _ in range(200):
        points = [
            PointInfo(f"p{i:03d}", NOW - timedelta(minutes=rnd.randint(-10, 9 * 60)),
                      rnd.choice([A, C]))
            for i in range(rnd.randint(1, 40))
        ]  # fmt: skip
        expired = set(select_expired(points, policy, NOW))
        kept = [p for p in points if p.point_id not in expired]
        newest = max(points, key=lambda p: (p.created_at, p.point_id))
        assert newest in kept
        for p in points:
            age = NOW - p.created_at
            if age < timedelta(hours=1.5):
                assert p in kept
            if age >= timedelta(hours=6) and p is not newest:
                assert p not in kept
        for p in kept:  # an hour keeps a crash point only when it has no app point
            if p.consistency == C and NOW - p.created_at >= timedelta(hours=1.5):
                hour = p.created_at.replace(minute=0, second=0, microsecond=0)
                same = [q for q in points if q.created_at.replace(minute=0) >= hour
                        and q.created_at - hour < timedelta(hours=1)
                        and NOW - q.created_at < timedelta(hours=6)]  # fmt: skip
                assert p is newest or all(q.consistency == C for q in same)
        # stable: pruning the survivors again at the same instant removes nothing
        assert select_expired(kept, policy, NOW) == []


BAD_POLICIES = [(0, 0), (-1, 0), (5, 6), (5, -1), (float("nan"), 0), (24, float("inf"))]


@pytest.mark.parametrize(("retention", "keep_all"), BAD_POLICIES)
def test_invalid_policy_is_refused(retention: float, keep_all: float) -> None:
    with pytest.raises(StoreInputError):
        RetentionPolicy(retention, keep_all)


def test_naive_now_is_refused() -> None:
    with pytest.raises(StoreInputError, match="timezone"):
        select_expired(timeline(GOLDEN), RetentionPolicy(24), datetime(2024, 5, 2, 12))


# -- prune against a store -----------------------------------------------------------------


def _store_with_golden(store: ReplicaStore) -> dict[str, str]:
    """Publish the golden timeline (one tiny disk); map golden name -> point id."""
    writer = store.begin_base("vm1", "vda", store.block_size * 2)
    writer.write(0, b"x" * store.block_size)
    chain = DiskChain(store.block_size * 2, writer.commit())
    ids = {}
    for name, when, kind in GOLDEN:
        point = store.publish_point(
            "vm1", {"vda": chain}, consistency=kind, vm_config={}, created_at=at(when)
        )
        ids[name] = point.point_id
    return ids


def test_prune_deletes_expired_manifests_only(store: ReplicaStore) -> None:
    ids = _store_with_golden(store)
    data_before = [i.key for p in ("chunks/", "indexes/") for i in store.backend.list(p)]
    report = prune(store, "vm1", RetentionPolicy(24, 1), NOW)
    want = sorted(ids[n] for n in GOLDEN_EXPIRED)
    assert sorted(report.deleted) == want == sorted(report.expired)
    left = [p.point_id for p in store.list_points("vm1")]
    assert left == sorted(ids[n] for n, _, _ in GOLDEN if n not in GOLDEN_EXPIRED)
    assert report.kept == left
    assert [i.key for p in ("chunks/", "indexes/") for i in store.backend.list(p)] == data_before
    retired = [lease for lease in list_leases(store.backend) if lease.purpose == "retired"]
    assert [lease.key for lease in retired] == [report.retired_lease]
    assert retired[0].roots and retired[0].expires == NOW + timedelta(hours=1)
    assert not [lease for lease in list_leases(store.backend) if lease.purpose == "prune"]
    # idempotent
    assert prune(store, "vm1", RetentionPolicy(24, 1), NOW).deleted == []


def test_prune_dry_run_changes_nothing(mem_store: ReplicaStore) -> None:
    _store_with_golden(mem_store)
    assert isinstance(mem_store.backend, MemoryBackend)
    before = {i.key for i in mem_store.backend.list()}
    report = prune(mem_store, "vm1", RetentionPolicy(24, 1), NOW, dry_run=True)
    assert len(report.expired) == len(GOLDEN_EXPIRED) and report.deleted == []
    assert {i.key for i in mem_store.backend.list()} == before


def test_prune_refuses_with_a_damaged_manifest(mem_store: ReplicaStore) -> None:
    ids = _store_with_golden(mem_store)
    backend = mem_store.backend
    assert isinstance(backend, MemoryBackend)
    key = f"points/vm1/{ids['p05']}.json"
    backend.put(key, backend.raw(key)[:-20])
    before = {i.key for i in backend.list()}
    with pytest.raises(MaintenanceRefused, match="damaged"):
        prune(mem_store, "vm1", RetentionPolicy(24, 1), NOW)
    assert {i.key for i in backend.list()} == before
