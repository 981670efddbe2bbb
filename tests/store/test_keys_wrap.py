"""Passphrase wrapping of the store keys: key files, the copy in the store, recovery."""

from __future__ import annotations

import json
import random
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from siterecovery.store import (
    DiskChain,
    KeyFileError,
    PassphraseRequired,
    ReplicaStore,
    ScryptParams,
    StoreInputError,
    StoreKeys,
    WrongKey,
    WrongPassphrase,
    inspect_key_file,
    open_backend,
    recover_keys,
)
from siterecovery.store.backend import Backend, ObjectInfo, register_scheme
from siterecovery.store.codec import Codec
from siterecovery.store.errors import IntegrityError, StoreUnavailable
from siterecovery.store.keycopy import copy_key
from siterecovery.store.keys import PASSPHRASE_ENV
from siterecovery.store.wrappers import BackendMetrics, RetryingBackend, RetryPolicy, wrap_backend

BLOCK = 64 * 1024
FAST = ScryptParams(n=1 << 10, r=8, p=1)  # the cheapest parameters a reader accepts
PHRASE = "correct horse battery staple"


@pytest.fixture(autouse=True)
def _no_env_passphrase(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)


def asking(answer: str, asked: list[str]) -> Callable[[], str]:
    """A passphrase callback that records that it was asked."""

    def ask() -> str:
        asked.append(answer)
        return answer

    return ask


def snapshot(backend: Backend) -> dict[str, bytes]:
    return {i.key: backend.get(i.key) for i in backend.list("")}


# -- key files -------------------------------------------------------------------------


def test_protected_key_file_round_trip_and_holds_no_secret(tmp_path: Path) -> None:
    keys = StoreKeys.generate()
    path = tmp_path / "store.key"
    keys.save(path, passphrase=PHRASE, scrypt=FAST)
    raw = path.read_text()
    assert keys.hash_key.hex() not in raw and keys.data_key is not None
    assert keys.data_key.hex() not in raw
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    info = inspect_key_file(path)
    assert info.protected and info.fingerprint == keys.fingerprint and info.has_data_key
    assert info.kdf == FAST
    assert StoreKeys.load(path, PHRASE) == keys
    assert keys.hash_key.hex() not in repr(keys) and keys.fingerprint in repr(keys)


def test_wrong_or_missing_passphrase_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = StoreKeys.generate()
    path = tmp_path / "store.key"
    keys.save(path, passphrase=PHRASE, scrypt=FAST)
    before = path.read_bytes()
    with pytest.raises(WrongPassphrase, match="does not unlock") as err:
        StoreKeys.load(path, "not the passphrase")
    assert isinstance(err.value, WrongKey) and "passphrase" in err.value.hint
    with pytest.raises(PassphraseRequired, match="protected by a passphrase"):
        StoreKeys.load(path)
    asked: list[str] = []
    assert StoreKeys.load(path, asking(PHRASE, asked)) == keys and asked == [PHRASE]
    monkeypatch.setenv(PASSPHRASE_ENV, PHRASE)
    assert StoreKeys.load(path) == keys
    assert path.read_bytes() == before


def test_plain_key_files_never_ask_for_a_passphrase(tmp_path: Path) -> None:
    keys = StoreKeys.generate(with_data_key=False)
    path = tmp_path / "store.key"
    keys.save(path)
    doc = json.loads(path.read_text())
    assert doc["version"] == 2 and doc["wrapping"] == "none"
    assert doc["fingerprint"] == keys.fingerprint
    asked: list[str] = []
    assert StoreKeys.load(path, asking(PHRASE, asked)) == keys and not asked
    # a version 1 file (no fingerprint) still loads
    v1 = tmp_path / "v1.key"
    del doc["fingerprint"]
    doc["version"] = 1
    v1.write_text(json.dumps(doc))
    assert StoreKeys.load(v1) == keys and inspect_key_file(v1).fingerprint is None


@pytest.mark.parametrize(
    "change, error",
    [
        ({"kdf": {"n": 2048}}, WrongPassphrase),  # parameters are authenticated
        ({"fingerprint": "0" * 16}, WrongPassphrase),
        ({"kdf": {"n": 1000}}, KeyFileError),  # not a power of two
        ({"kdf": {"n": 1 << 30}}, KeyFileError),  # would need 1 TiB: refused, not tried
        ({"kdf": {"name": "pbkdf2"}}, KeyFileError),
        ({"wrapped": "zz"}, KeyFileError),
        ({"version": 3}, KeyFileError),
        ({"wrapping": "rot13"}, KeyFileError),
    ],
)
def test_tampered_protected_key_files_are_refused(
    tmp_path: Path, change: dict[str, object], error: type[Exception]
) -> None:
    path = tmp_path / "store.key"
    StoreKeys.generate().save(path, passphrase=PHRASE, scrypt=FAST)
    doc = json.loads(path.read_text())
    for name, value in change.items():
        doc[name] = {**doc[name], **value} if isinstance(value, dict) else value
    path.write_text(json.dumps(doc))
    with pytest.raises(error):
        StoreKeys.load(path, PHRASE)


def test_short_new_passphrases_are_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreInputError, match="too short"):
        StoreKeys.generate().save(tmp_path / "k", passphrase="short", scrypt=FAST)
    assert not (tmp_path / "k").exists()


def test_rewrapping_replaces_the_key_file_atomically(tmp_path: Path) -> None:
    keys = StoreKeys.generate()
    path = tmp_path / "store.key"
    keys.save(path, passphrase=PHRASE, scrypt=FAST)
    keys.save(path, passphrase="another long passphrase", scrypt=FAST, replace=True)
    assert StoreKeys.load(path, "another long passphrase") == keys
    with pytest.raises(WrongPassphrase):
        StoreKeys.load(path, PHRASE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.key"]


# -- the copy in the store ---------------------------------------------------------------


def _populate(store: ReplicaStore) -> tuple[bytes, str]:
    image = random.Random(7).randbytes(3 * BLOCK)
    writer = store.begin_base("vm1", "vda", len(image))
    writer.write(0, image)
    point = store.publish_point(
        "vm1", {"vda": DiskChain(len(image), writer.commit())}, consistency="crash", vm_config={}
    )
    return image, point.point_id


def test_keys_recovered_from_the_store_open_it(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/replica"
    keys = StoreKeys.generate()
    store = ReplicaStore.init(
        url, keys, block_size=BLOCK, encrypted=True, passphrase=PHRASE, scrypt=FAST, workers=2
    )
    image, point_id = _populate(store)
    copy = store.backend.get(copy_key(keys.fingerprint))
    assert keys.hash_key.hex().encode() not in copy and b"wrapped" in copy

    recovered = recover_keys(url, PHRASE)
    path = tmp_path / "recovered.key"
    recovered.save(path)
    reopened = ReplicaStore.open(url, StoreKeys.load(path))
    point = reopened.load_point("vm1", point_id)
    assert b"".join(d for _, d in reopened.read_disk(point, "vda")) == image
    assert reopened.verify(deep=True).ok  # keys/ is not mistaken for damage


def test_wrong_passphrase_recovers_nothing_and_reads_no_data(memory_url: str) -> None:
    keys = StoreKeys.generate()
    store = ReplicaStore.init(memory_url, keys, block_size=BLOCK, passphrase=PHRASE, scrypt=FAST)
    _populate(store)
    before = snapshot(store.backend)
    metrics = BackendMetrics()
    with pytest.raises(WrongPassphrase, match="unlocks no key copy"):
        recover_keys(memory_url, "a wrong passphrase", wrap=lambda b: wrap_backend(
            b, retry=None, metrics=metrics))  # fmt: skip
    got = metrics.snapshot()
    assert got["put"].calls == 0 and got["delete"].calls == 0
    assert got["get"].calls == 2  # the store config and the one key copy, no data
    assert snapshot(store.backend) == before


def test_changing_the_passphrase_replaces_the_copy(memory_url: str) -> None:
    keys = StoreKeys.generate()
    store = ReplicaStore.init(memory_url, keys, block_size=BLOCK, passphrase=PHRASE, scrypt=FAST)
    store.put_key_copy("the new passphrase", scrypt=FAST)
    assert [i.key for i in store.backend.list("keys/")] == [copy_key(keys.fingerprint)]
    assert recover_keys(memory_url, "the new passphrase") == keys
    with pytest.raises(WrongPassphrase):
        recover_keys(memory_url, PHRASE)


def test_recovery_without_a_copy_or_a_store(memory_url: str, tmp_path: Path) -> None:
    ReplicaStore.init(memory_url, StoreKeys.generate(), block_size=BLOCK)
    with pytest.raises(KeyFileError, match="no passphrase-protected copy"):
        recover_keys(memory_url, PHRASE)
    with pytest.raises(Exception, match="no replica store"):
        recover_keys(f"file://{tmp_path}/nothing", PHRASE)


def test_a_copy_of_other_keys_is_not_taken_for_ours(memory_url: str) -> None:
    store = ReplicaStore.init(memory_url, StoreKeys.generate(), block_size=BLOCK)
    other = StoreKeys.generate()
    store.backend.put(copy_key(other.fingerprint), json.dumps(
        other.to_document(PHRASE, scrypt=FAST)).encode())  # fmt: skip
    with pytest.raises(WrongPassphrase):
        recover_keys(memory_url, PHRASE)


# -- encryption at rest ----------------------------------------------------------------


def test_encrypted_objects_are_unreadable_without_the_data_key(memory_url: str) -> None:
    keys = StoreKeys.generate()
    store = ReplicaStore.init(memory_url, keys, block_size=BLOCK, encrypted=True)
    image, _ = _populate(store)
    chunk = next(iter(store.backend.list("chunks/"))).key
    blob = store.backend.get(chunk)
    for i in range(0, len(image), BLOCK):
        assert image[i : i + 64] not in blob
    with pytest.raises(WrongKey, match="data key"):
        ReplicaStore.open(memory_url, StoreKeys(keys.hash_key, None))
    with pytest.raises(WrongKey, match="data key"):
        ReplicaStore.open(memory_url, StoreKeys(keys.hash_key, StoreKeys.generate().data_key))
    with pytest.raises(WrongKey):
        Codec(keys.hash_key, None, encrypt=False).unseal(chunk, blob)
    with pytest.raises(IntegrityError):
        Codec(keys.hash_key, StoreKeys.generate().data_key, encrypt=False).unseal(chunk, blob)
    assert Codec(keys.hash_key, keys.data_key, encrypt=False).unseal(chunk, blob) in {
        image[i : i + BLOCK] for i in range(0, len(image), BLOCK)
    }


# -- the backend wrap ------------------------------------------------------------------


class _Flaky:
    """A backend whose first ``failures`` gets fail as unavailable."""

    def __init__(self, inner: Backend, failures: int) -> None:
        self.inner, self.failures = inner, failures

    @property
    def url(self) -> str:
        return self.inner.url

    def put(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        self.inner.put(key, data, create_only=create_only)

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("connection reset")
        return self.inner.get(key, offset, length)

    def stat(self, key: str) -> ObjectInfo | None:
        return self.inner.stat(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)


def test_open_through_a_retry_wrap(memory_url: str) -> None:
    keys = StoreKeys.generate()
    ReplicaStore.init(memory_url, keys, block_size=BLOCK)
    name = memory_url.removeprefix("memory://")
    register_scheme("flaky", lambda url: _Flaky(open_backend(f"memory://{name}"), 2))
    policy = RetryPolicy(attempts=3, base_delay=0)
    store = ReplicaStore.open("flaky://x", keys, wrap=lambda b: wrap_backend(b, retry=policy))
    assert isinstance(store.backend, RetryingBackend) and store.block_size == BLOCK
    with pytest.raises(StoreUnavailable):
        ReplicaStore.open("flaky://x", keys)  # unwrapped: the first failure is final
