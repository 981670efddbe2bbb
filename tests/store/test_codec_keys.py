"""Sealed objects, hashes, key files and the store config."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from siterecovery.store import (
    FormatError,
    IntegrityError,
    KeyFileError,
    ObjectNotFound,
    ReplicaStore,
    StoreInputError,
    StoreKeys,
    WrongKey,
    open_backend,
)
from siterecovery.store.codec import SUBBLOCK_SIZE, Codec
from siterecovery.store.keys import CONFIG_KEY
from siterecovery.store.memory import flip_byte

KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))
TEXT = b"the quick brown fox " * 500
RANDOM = os.urandom(20000)


def codec(encrypt: bool, hash_key: bytes = KEY_A, data_key: bytes = KEY_B) -> Codec:
    return Codec(hash_key, data_key, encrypt=encrypt)


@pytest.mark.parametrize("encrypt", [False, True])
@pytest.mark.parametrize("data", [b"", b"x", TEXT, RANDOM], ids=["empty", "one", "text", "rand"])
def test_seal_round_trip(encrypt: bool, data: bytes) -> None:
    c = codec(encrypt)
    blob = c.seal("chunks/aa/x", data)
    assert c.unseal("chunks/aa/x", blob) == data


def test_compression_only_when_it_helps() -> None:
    c = codec(False)
    assert len(c.seal("k", TEXT)) < len(TEXT) // 10
    assert len(c.seal("k", RANDOM)) <= len(RANDOM) + 64


def test_encrypted_objects_hide_the_plaintext() -> None:
    c = codec(True)
    secret = b"top secret payload " * 4
    blob = c.seal("k", secret, compress=False)
    assert secret[:16] not in blob
    assert c.seal("k", secret) != c.seal("k", secret)  # random nonce


@pytest.mark.parametrize("encrypt", [False, True])
def test_every_flipped_byte_is_detected(encrypt: bool) -> None:
    c = codec(encrypt)
    blob = c.seal("segments/v/d/1", TEXT[:3000])
    for i in range(len(blob)):
        with pytest.raises((IntegrityError, FormatError)) as err:
            c.unseal("segments/v/d/1", flip_byte(blob, i))
        if isinstance(err.value, IntegrityError):
            assert "segments/v/d/1 is corrupt" in str(err.value)


@pytest.mark.parametrize("encrypt", [False, True])
def test_truncation_is_detected(encrypt: bool) -> None:
    c = codec(encrypt)
    blob = c.seal("k", TEXT)
    for cut in (0, 3, 12, 13, 20, len(blob) // 2, len(blob) - 1):
        with pytest.raises(IntegrityError, match="k is corrupt"):
            c.unseal("k", blob[:cut])


@pytest.mark.parametrize("encrypt", [False, True])
def test_object_under_another_name_or_keys_is_refused(encrypt: bool) -> None:
    blob = codec(encrypt).seal("chunks/aa/one", TEXT)
    with pytest.raises(IntegrityError, match="chunks/aa/two"):
        codec(encrypt).unseal("chunks/aa/two", blob)
    with pytest.raises(IntegrityError):
        codec(encrypt, hash_key=KEY_B, data_key=KEY_A).unseal("chunks/aa/one", blob)


def test_encrypted_object_without_data_key() -> None:
    blob = codec(True).seal("k", TEXT)
    with pytest.raises(WrongKey):
        Codec(KEY_A, None, encrypt=False).unseal("k", blob)


def test_unknown_flags_are_a_format_error() -> None:
    blob = bytearray(codec(False).seal("k", TEXT))
    blob[4] |= 0x80
    with pytest.raises(FormatError, match="newer"):
        codec(False).unseal("k", bytes(blob))


def test_chunk_ids_are_keyed_content_hashes() -> None:
    a, b = codec(False), codec(False, hash_key=KEY_B)
    cid = a.chunk_id(TEXT)
    assert len(cid) == 64 and int(cid, 16) >= 0
    assert a.chunk_id(bytes(TEXT)) == cid
    assert a.chunk_id(TEXT + b"!") != cid
    assert b.chunk_id(TEXT) != cid


def test_subblock_sums() -> None:
    c = codec(False)
    data = os.urandom(SUBBLOCK_SIZE * 2 + 100)
    sums = c.subblock_sums(data)
    assert len(sums) == 3 * 16
    assert sums[16:32] == c.subblock_sums(data[SUBBLOCK_SIZE : 2 * SUBBLOCK_SIZE])
    assert sums[32:] == c.subblock_sums(data[-100:])


# -- key files ---------------------------------------------------------------------


def test_key_file_round_trip(tmp_path: Path) -> None:
    keys = StoreKeys.generate()
    path = tmp_path / "store.key"
    keys.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert StoreKeys.load(path) == keys
    assert keys.hash_key.hex() not in repr(keys)
    assert [p.name for p in tmp_path.iterdir()] == ["store.key"]


def test_key_file_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "store.key"
    first = StoreKeys.generate()
    first.save(path)
    with pytest.raises(KeyFileError, match="already exists"):
        StoreKeys.generate().save(path)
    assert StoreKeys.load(path) == first


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[]",
        '{"format": "other"}',
        '{"format": "siterecovery-store-keys", "version": 1, "wrapping": "scrypt"}',
        '{"format": "siterecovery-store-keys", "version": 1, "wrapping": "none", '
        '"hash_key": "abcd"}',
    ],
)
def test_bad_key_files(tmp_path: Path, content: str) -> None:
    path = tmp_path / "k"
    path.write_text(content)
    with pytest.raises(KeyFileError):
        StoreKeys.load(path)


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        StoreKeys.load(tmp_path / "absent")


# -- store config --------------------------------------------------------------------


def test_open_with_other_keys_is_wrong_key(store_url: str) -> None:
    ReplicaStore.init(store_url, StoreKeys.generate())
    with pytest.raises(WrongKey):
        ReplicaStore.open(store_url, StoreKeys.generate())


def test_encrypted_store_needs_its_data_key(store_url: str) -> None:
    keys = StoreKeys.generate()
    ReplicaStore.init(store_url, keys, encrypted=True)
    ReplicaStore.open(store_url, keys)
    with pytest.raises(WrongKey, match="data key"):
        ReplicaStore.open(store_url, StoreKeys(keys.hash_key, os.urandom(32)))
    with pytest.raises(WrongKey):
        ReplicaStore.open(store_url, StoreKeys(keys.hash_key, None))


def test_encrypted_init_without_data_key(store_url: str) -> None:
    with pytest.raises(StoreInputError, match="data key"):
        ReplicaStore.init(store_url, StoreKeys.generate(with_data_key=False), encrypted=True)
    assert list(open_backend(store_url).list()) == []


def test_init_refuses_an_existing_or_non_empty_location(store_url: str) -> None:
    keys = StoreKeys.generate()
    ReplicaStore.init(store_url, keys)
    with pytest.raises(StoreInputError, match="already exists"):
        ReplicaStore.init(store_url, keys)


def test_init_refuses_a_non_empty_location(store_url: str) -> None:
    open_backend(store_url).put("somebody/else", b"x")
    with pytest.raises(StoreInputError, match="not empty"):
        ReplicaStore.init(store_url, StoreKeys.generate())


@pytest.mark.parametrize("block_size", [0, 1000, 32 * 1024, 3 << 20, 128 << 20])
def test_invalid_block_sizes(store_url: str, block_size: int) -> None:
    with pytest.raises(StoreInputError, match="block size"):
        ReplicaStore.init(store_url, StoreKeys.generate(), block_size=block_size)


def test_open_missing_store(store_url: str) -> None:
    with pytest.raises(ObjectNotFound, match="no replica store"):
        ReplicaStore.open(store_url, StoreKeys.generate())


def test_newer_store_version_is_a_clear_format_error(store_url: str) -> None:
    keys = StoreKeys.generate()
    ReplicaStore.init(store_url, keys)
    backend = open_backend(store_url)
    doc = json.loads(backend.get(CONFIG_KEY))
    doc["version"] = 2
    backend.put(CONFIG_KEY, json.dumps(doc).encode())
    with pytest.raises(FormatError, match="version 2, newer") as err:
        ReplicaStore.open(store_url, keys)
    assert "upgrade" in err.value.describe()


def test_tampered_store_config(store_url: str) -> None:
    keys = StoreKeys.generate()
    ReplicaStore.init(store_url, keys)
    backend = open_backend(store_url)
    doc = json.loads(backend.get(CONFIG_KEY))
    doc["block_size"] = 1 << 16
    backend.put(CONFIG_KEY, json.dumps(doc).encode())
    with pytest.raises(IntegrityError, match="MAC"):
        ReplicaStore.open(store_url, keys)
    backend.put(CONFIG_KEY, b'{"format": "siterecovery-st')
    with pytest.raises(FormatError, match="not valid JSON"):
        ReplicaStore.open(store_url, keys)
