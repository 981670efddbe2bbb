"""``siterecovery store ...``: verify, gc, compact and prune through the Typer sub-app."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from siterecovery.errors import InputError
from siterecovery.settings import Settings
from siterecovery.store import DiskChain, ReplicaStore, StoreKeys
from siterecovery.store.retention import MaintenanceRefused

BLOCK = 64 * 1024


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    keys = StoreKeys.generate()
    keys.save(tmp_path / "store.key")
    settings = Settings.embedded(tmp_path)
    ReplicaStore.init(settings.store_url, keys, block_size=BLOCK, workers=2)
    return settings


def invoke(settings: Settings, *args: str) -> tuple[int, str, BaseException | None]:
    from siterecovery.cli.store_cmd import store_app_factory

    app = store_app_factory(lambda: settings)
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.stdout, result.exception


def populate(settings: Settings, points: int = 5) -> tuple[ReplicaStore, DiskChain]:
    """``points`` points of vm1, five minutes apart and ending now, one segment each."""
    store = ReplicaStore.open(settings.store_url, StoreKeys.load(settings.key_file))
    rnd = random.Random(1)
    writer = store.begin_base("vm1", "vda", 4 * BLOCK)
    writer.write(0, rnd.randbytes(4 * BLOCK))
    chain = DiskChain(4 * BLOCK, writer.commit())
    start = datetime.now(UTC) - timedelta(minutes=5 * (points - 1))
    for i in range(points):
        if i:
            seg = store.begin_segment("vm1", "vda", 4 * BLOCK)
            seg.add(rnd.randrange(4) * BLOCK, rnd.randbytes(4096))
            chain = chain.extend(seg.commit())
        store.publish_point(
            "vm1",
            {"vda": chain},
            consistency="crash",
            vm_config={},
            created_at=start + timedelta(minutes=5 * i),
        )
    return store, chain


def test_verify_ok_and_damaged(settings: Settings) -> None:
    store, _ = populate(settings)
    code, out, _ = invoke(settings, "verify")
    assert code == 0 and "OK" in out and "5 recovery points" in out
    code, out, _ = invoke(settings, "verify", "--json")
    assert code == 0 and json.loads(out)["ok"] is True

    # remove one chunk of the base: every point is affected
    victim = next(iter(store.backend.list("chunks/"))).key
    store.backend.delete(victim)
    code, out, _ = invoke(settings, "verify")
    assert code == 1 and "DAMAGED" in out and victim in out and "vm1/" in out
    code, out, _ = invoke(settings, "verify", "--deep", "--json")
    doc = json.loads(out)
    assert code == 1 and doc["ok"] is False and doc["deep"] is True
    assert [d["key"] for d in doc["damaged_objects"]] == [victim]
    assert len(doc["affected_points"]) == 5


def test_gc_dry_run_then_delete(settings: Settings) -> None:
    store, _ = populate(settings)
    orphan = store.begin_segment("vm1", "vda", 4 * BLOCK)
    orphan.add(0, b"\x01" * 4096)
    ref = orphan.commit()
    assert ref is not None
    code, out, _ = invoke(settings, "gc", "--dry-run", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["dry_run"] and doc["deleted"] == 0 and doc["kept_young"] == 1

    code, out, _ = invoke(settings, "gc", "--dry-run", "--min-age", "0s", "--json")
    doc = json.loads(out)
    assert doc["candidates"] == [ref.key] and store.backend.stat(ref.key) is not None

    code, out, _ = invoke(settings, "gc", "--min-age", "0s")
    assert code == 0 and "Garbage collection" in out and "deleted" in out
    assert store.backend.stat(ref.key) is None
    assert invoke(settings, "verify", "--deep")[0] == 0


def test_gc_bad_min_age_and_damage(settings: Settings) -> None:
    store, _ = populate(settings, points=2)
    code, _, exc = invoke(settings, "gc", "--min-age", "soon")
    assert isinstance(exc, InputError) and code != 0
    point = store.list_points("vm1")[0]
    store.backend.put(point.key, b"{}")
    code, _, exc = invoke(settings, "gc", "--min-age", "0s")
    assert isinstance(exc, MaintenanceRefused)


def test_prune_and_compact(settings: Settings) -> None:
    store, _ = populate(settings, points=6)
    images = {p.point_id: b"".join(d for _, d in store.read_disk(p, "vda"))
              for p in store.list_points("vm1")}  # fmt: skip
    code, out, _ = invoke(settings, "compact", "vm1", "--max-chain", "2", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["bases_written"] and doc["longest_chain_after"] <= 2
    for p in store.list_points("vm1"):
        assert b"".join(d for _, d in store.read_disk(p, "vda")) == images[p.point_id]

    code, out, _ = invoke(settings, "prune", "vm1", "--retention", "12m", "--keep-all", "12m",
                          "--json")  # fmt: skip
    doc = json.loads(out)
    assert code == 0 and len(doc["deleted"]) == 3 and len(doc["kept"]) == 3
    assert [p.point_id for p in store.list_points("vm1")] == doc["kept"]
    code, out, _ = invoke(settings, "prune", "vm1", "--retention", "1h", "--dry-run")
    assert code == 0 and "3 recovery point(s) kept" in out
    code, _, exc = invoke(settings, "prune", "vm1", "--retention", "0h")
    assert isinstance(exc, InputError)
