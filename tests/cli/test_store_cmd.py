"""``siterecovery store ...``: verify, gc, compact and prune through the Typer sub-app."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

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


# -- keys ----------------------------------------------------------------------------------

PHRASE = "correct horse battery staple"


@pytest.fixture
def cheap_scrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    from siterecovery.store import keywrap

    monkeypatch.setattr(keywrap, "DEFAULT_SCRYPT", keywrap.ScryptParams(n=1 << 10))
    for name in ("SITERECOVERY_PASSPHRASE", "SITERECOVERY_NEW_PASSPHRASE"):
        monkeypatch.delenv(name, raising=False)


def run_cli(
    settings: Settings, *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> tuple[int, str, BaseException | None]:
    from siterecovery.cli.store_cmd import store_app_factory

    app = store_app_factory(lambda: settings)
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200", **(env or {})},
                                input=stdin)  # fmt: skip
    return result.exit_code, result.stdout, result.exception


@pytest.mark.usefixtures("cheap_scrypt")
def test_key_show_passphrase_export_and_recover(settings: Settings, tmp_path: Path) -> None:
    from siterecovery.store import PassphraseRequired, WrongPassphrase, recover_keys

    keys = StoreKeys.load(settings.key_file)
    code, out, _ = run_cli(settings, "key", "show", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["fingerprint"] == keys.fingerprint and doc["mode"] == "0600"
    assert doc["wrapping"] == "none" and doc["store_copy"] is None
    assert keys.hash_key.hex() not in out

    # no passphrase anywhere: a clear error, nothing stored
    code, _, exc = run_cli(settings, "key", "passphrase")
    assert isinstance(exc, PassphraseRequired) and code != 0
    # the prompt asks twice; a mismatch is asked again
    code, out, exc = run_cli(settings, "key", "passphrase",
                             stdin=f"{PHRASE}\nother\n{PHRASE}\n{PHRASE}\n")  # fmt: skip
    assert code == 0, exc
    assert recover_keys(settings.store_url, PHRASE) == keys
    assert json.loads(run_cli(settings, "key", "show", "--json")[1])["store_copy"] == (
        f"keys/{keys.fingerprint}.json"
    )

    backup = tmp_path / "backup.key"
    assert run_cli(settings, "key", "export", "--to", str(backup))[0] == 0
    assert StoreKeys.load(backup) == keys
    code, _, exc = run_cli(settings, "key", "export", "--to", str(backup))
    assert isinstance(exc, InputError) and exc.exit_code == 2 and "already exists" in str(exc)
    phrase_file = tmp_path / "phrase"
    phrase_file.write_text(PHRASE + "\n")
    protected = tmp_path / "protected.key"
    code, _, _ = run_cli(settings, "key", "export", "--to", str(protected), "--protect",
                         "--passphrase-file", str(phrase_file))  # fmt: skip
    assert code == 0 and StoreKeys.load(protected, PHRASE) == keys

    recovered = tmp_path / "recovered.key"
    code, _, exc = run_cli(settings, "key", "recover", "--to", str(recovered),
                           env={"SITERECOVERY_PASSPHRASE": "a wrong passphrase"})  # fmt: skip
    assert isinstance(exc, WrongPassphrase) and exc.exit_code == 4 and not recovered.exists()
    code, out, _ = run_cli(settings, "key", "recover", "--to", str(recovered),
                           env={"SITERECOVERY_PASSPHRASE": PHRASE})  # fmt: skip
    assert code == 0 and "they open the store" in " ".join(out.split())
    assert StoreKeys.load(recovered) == keys
    ReplicaStore.open(settings.store_url, StoreKeys.load(recovered))


@pytest.mark.usefixtures("cheap_scrypt")
def test_protected_key_file_and_passphrase_change(tmp_path: Path) -> None:
    from siterecovery.store import WrongPassphrase, recover_keys

    keys = StoreKeys.generate()
    keys.save(tmp_path / "store.key", passphrase=PHRASE)
    settings = Settings.embedded(tmp_path)
    ReplicaStore.init(settings.store_url, keys, block_size=BLOCK, passphrase=PHRASE)
    unlock = {"SITERECOVERY_PASSPHRASE": PHRASE}
    assert run_cli(settings, "verify", env=unlock)[0] == 0
    code, _, exc = run_cli(settings, "verify", env={"SITERECOVERY_PASSPHRASE": "wrong one!"})
    assert isinstance(exc, WrongPassphrase) and exc.exit_code == 4 and code != 0

    new = {"SITERECOVERY_PASSPHRASE": PHRASE, "SITERECOVERY_NEW_PASSPHRASE": "a new passphrase"}
    code, out, exc = run_cli(settings, "key", "passphrase", env=new)
    assert code == 0, exc
    assert "re-wrapped" in out
    assert StoreKeys.load(settings.key_file, "a new passphrase") == keys
    assert recover_keys(settings.store_url, "a new passphrase") == keys
    with pytest.raises(WrongPassphrase):
        recover_keys(settings.store_url, PHRASE)
    doc = json.loads(run_cli(settings, "key", "show", "--json")[1])
    assert doc["wrapping"].startswith("scrypt-aes256gcm")


@pytest.mark.usefixtures("cheap_scrypt")
def test_vault_init_with_a_passphrase(tmp_path: Path) -> None:
    from siterecovery.cli.app import app
    from siterecovery.store import recover_keys

    workdir = tmp_path / "vault"
    runner = CliRunner()
    short = runner.invoke(app, ["--workdir", str(workdir), "vault", "init", "--passphrase"],
                          env={"SITERECOVERY_PASSPHRASE": "short"})  # fmt: skip
    assert isinstance(short.exception, InputError) and short.exception.exit_code == 2
    assert "too short" in str(short.exception) and not workdir.exists()
    result = runner.invoke(app, ["--workdir", str(workdir), "vault", "init", "--passphrase"],
                           env={"SITERECOVERY_PASSPHRASE": PHRASE})  # fmt: skip
    assert result.exit_code == 0, result.exception
    settings = Settings.load(workdir)
    keys = StoreKeys.load(settings.key_file)  # the vault's own key file stays plain
    assert recover_keys(settings.store_url, PHRASE) == keys


def _protected_vault(settings: Settings, vms: list[str]) -> Any:
    from siterecovery.domain import DiskSpec, ReplicationState
    from siterecovery.vault import service
    from siterecovery.vault.db import open_database
    from siterecovery.vault.models import SiteRole

    db = open_database(settings.vault_url)
    service.ensure_site(db, name="primary", role=SiteRole.PRIMARY)
    service.ensure_host(db, name="h1", site="primary")
    service.create_policy(db, name="gold", copy_frequency_s=30, retention_h=24)
    for vm in vms:
        service.upsert_vm(db, host="h1", name=vm, config={}, disks=[DiskSpec("vda", 4 * BLOCK)])
        service.protect(db, vm=vm, policy="gold")
        for state in (ReplicationState.INITIAL_REPLICATION, ReplicationState.PROTECTED):
            service.transition(db, vm=vm, to_state=state, reason="test")
    return db


def test_verify_repair_plan_and_mark_resync(settings: Settings) -> None:
    from siterecovery.domain import ReplicationState
    from siterecovery.vault import service

    store, _ = populate(settings, points=2)
    other = store.begin_base("orphan", "vda", BLOCK)  # a VM the vault does not know
    other.write(0, random.Random(5).randbytes(BLOCK))
    store.publish_point("orphan", {"vda": DiskChain(BLOCK, other.commit())},
                        consistency="crash", vm_config={})  # fmt: skip
    db = _protected_vault(settings, ["vm1", "vm9"])
    try:
        assert invoke(settings, "verify", "--mark-resync")[0] == 0  # clean: nothing marked
        assert service.get_protection(db, vm="vm1").state == ReplicationState.PROTECTED

        chunks = [i.key for i in store.backend.list("chunks/")]
        for key in chunks:  # damage every chunk: both vm1 and orphan are affected
            path = Path(settings.store_url.removeprefix("file://")) / key
            raw = bytearray(path.read_bytes())
            raw[-1] ^= 1
            path.write_bytes(bytes(raw))
        code, out, _ = invoke(settings, "verify", "--deep", "--repair-plan", "--mark-resync",
                              "--json")  # fmt: skip
        doc = json.loads(out)
        assert code == 1 and {a["key"] for a in doc["repair_plan"]} == set(chunks)
        assert all(a["in_place"] and a["kind"] == "chunk" for a in doc["repair_plan"])
        assert set(doc["resync"]["marked"]) == {"vm1"}
        assert set(doc["resync"]["skipped"]) == {"orphan"}
        vm1 = service.get_protection(db, vm="vm1")
        assert vm1.state == ReplicationState.RESYNC_REQUIRED
        assert "damaged replica data" in (vm1.resync_required_reason or "")
        assert service.get_protection(db, vm="vm9").state == ReplicationState.PROTECTED

        code, out, _ = invoke(settings, "verify", "--deep", "--repair-plan", "--mark-resync")
        assert code == 1 and "Repair plan" in out and "vm1: marked resync required" in out
    finally:
        db.close()
