"""NbdClient against a real qemu-storage-daemon.

The test image (16 MiB qcow2, 64 KiB clusters) is built once per module:

1. ``qemu-io`` writes 0x11 at [0, 128 KiB) and 0x22 at [8 MiB, 8 MiB + 192 KiB);
2. ``qemu-img bitmap --add --granularity 65536`` adds persistent bitmap ``b0``; it is enabled,
   and ``qemu-io`` honours it, so every later write marks it dirty:
   0x33 at [0, 4 KiB), 0xab at [1 MiB, +64 KiB), 0xcd at [3000 KiB, +10 KiB) (unaligned: it
   dirties clusters 46 and 47), and a zero write (``write -z``) at [8 MiB + 64 KiB, +64 KiB);
3. bitmap ``b1`` is added last (clean), and both are disabled with ``qemu-img bitmap --disable``
   because QEMU 7.2 refuses to export an enabled bitmap on a read-only export.

The raw reference is ``qemu-img convert -O raw`` of that image. Daemons open the image
read-only, so no test can change it.
"""

from __future__ import annotations

import itertools
import random
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from siterecovery.errors import InputError
from siterecovery.hypervisor.errors import NbdError, NbdServerError
from siterecovery.hypervisor.nbd import (
    NBD_STATE_HOLE,
    NBD_STATE_ZERO,
    BlockStatus,
    NbdClient,
)

from .conftest import StorageDaemon, free_tcp_port

pytestmark = pytest.mark.qemu

KiB, MiB = 1 << 10, 1 << 20
SIZE = 16 * MiB
ALLOC = "base:allocation"
B0, B1 = "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"
# Ranges holding non-zero bytes in the end (the zero write cut the 0x22 range in two).
NONZERO = [(0, 128 * KiB), (1 * MiB, 64 * KiB), (3000 * KiB, 10 * KiB), (8 * MiB, 64 * KiB),
           (8 * MiB + 128 * KiB, 64 * KiB)]
ZERO_WRITTEN = (8 * MiB + 64 * KiB, 64 * KiB)
# What b0 must hold: the writes after step 2, rounded out to 64 KiB granularity.
EXPECTED_DIRTY = [(0, 64 * KiB), (1 * MiB, 64 * KiB), (46 * 64 * KiB, 128 * KiB),
                  (8 * MiB + 64 * KiB, 64 * KiB)]

Start = Callable[..., StorageDaemon]


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """The qcow2 described in the module docstring and its raw content."""
    work = tmp_path_factory.mktemp("nbdimg")
    qcow2, raw = work / "disk.qcow2", work / "disk.raw"
    _run("qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), str(SIZE))
    _run("qemu-io", "-c", "write -P 0x11 0 128k", "-c", "write -P 0x22 8M 192k", str(qcow2))
    _run("qemu-img", "bitmap", "--add", "--granularity", "65536", str(qcow2), "b0")
    _run("qemu-io", "-c", "write -P 0x33 0 4k", "-c", "write -P 0xab 1M 64k",
         "-c", "write -P 0xcd 3000k 10k", "-c", "write -z 8256k 64k", str(qcow2))
    _run("qemu-img", "bitmap", "--add", "--granularity", "65536", str(qcow2), "b1")
    _run("qemu-img", "bitmap", "--disable", str(qcow2), "b0")
    _run("qemu-img", "bitmap", "--disable", str(qcow2), "b1")
    _run("qemu-img", "convert", "-O", "raw", str(qcow2), str(raw))
    return qcow2, raw.read_bytes()


@pytest.fixture
def daemon(storage_daemon: Start, image: tuple[Path, bytes]) -> StorageDaemon:
    return storage_daemon(image[0], bitmaps=["b0", "b1"])


@pytest.fixture
def client(daemon: StorageDaemon) -> Iterator[NbdClient]:
    with NbdClient.connect_unix(str(daemon.sock), "disk0", [ALLOC, B0, B1]) as nbd:
        yield nbd


# -- handshake -------------------------------------------------------------------------------


def test_handshake_reports_size_and_contexts(client: NbdClient) -> None:
    assert client.size == SIZE
    assert set(client.contexts) == {ALLOC, B0, B1}
    assert len(set(client.contexts.values())) == 3
    assert client.max_block >= 1 * MiB


def test_connect_tcp_reads_same_bytes(storage_daemon: Start, image: tuple[Path, bytes]) -> None:
    port = free_tcp_port()
    storage_daemon(image[0], tcp_port=port)
    with NbdClient.connect_tcp("127.0.0.1", port, "disk0") as nbd:
        assert nbd.size == SIZE
        assert nbd.contexts == {}
        assert nbd.pread(1 * MiB - 10, 100) == image[1][1 * MiB - 10 : 1 * MiB + 90]


@pytest.mark.parametrize("contexts", [(), (ALLOC,)])
def test_wrong_export_name_is_refused(daemon: StorageDaemon, contexts: tuple[str, ...]) -> None:
    with pytest.raises(NbdError, match=r"refused .*'nosuch'.*unknown export") as info:
        NbdClient.connect_unix(str(daemon.sock), "nosuch", contexts)
    assert "export name" in info.value.hint


def test_unknown_meta_context_is_named(daemon: StorageDaemon) -> None:
    with pytest.raises(NbdError, match="qemu:dirty-bitmap:nope") as info:
        NbdClient.connect_unix(str(daemon.sock), "disk0", [ALLOC, "qemu:dirty-bitmap:nope"])
    assert ALLOC not in str(info.value)


def test_missing_socket_is_nbd_error(tmp_path: Path) -> None:
    with pytest.raises(NbdError, match="cannot connect"):
        NbdClient.connect_unix(str(tmp_path / "absent.sock"))


def _one_shot_server(path: Path, payload: bytes, *, hold: bool = False) -> threading.Thread:
    """A unix server that sends ``payload`` to its first client and hangs up.

    With ``hold`` it keeps the connection open, silent, until the client hangs up.
    """
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)

    def serve() -> None:
        with listener, listener.accept()[0] as conn:
            conn.sendall(payload)
            conn.settimeout(10)
            while hold and conn.recv(4096):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(
    ("payload", "message"),
    [(b"NBDMAGIC\x49\x48", "closed the connection"), (b"HTTP/1.1 400 Bad\r\n\r\n", "not an NBD")],
)
def test_short_or_foreign_handshake(tmp_path: Path, payload: bytes, message: str) -> None:
    path = tmp_path / "fake.sock"
    thread = _one_shot_server(path, payload)
    with pytest.raises(NbdError, match=message):
        NbdClient.connect_unix(str(path), timeout=5)
    thread.join(5)


def test_silent_server_times_out(tmp_path: Path) -> None:
    path = tmp_path / "silent.sock"
    thread = _one_shot_server(path, b"NBDMAGIC", hold=True)
    started = time.monotonic()
    with pytest.raises(NbdError, match="timed out"):
        NbdClient.connect_unix(str(path), timeout=0.3)
    assert time.monotonic() - started < 1.5
    thread.join(5)


# -- block status ----------------------------------------------------------------------------


def _covers(extents: list[tuple[int, int, bool]], start: int, length: int, zero: bool) -> bool:
    return any(off <= start and start + length <= off + ln and z == zero
               for off, ln, z in extents)


def test_allocated_extents_tile_disk_and_match_content(
    client: NbdClient, image: tuple[Path, bytes]
) -> None:
    raw = image[1]
    extents = client.allocated_extents()
    assert extents[0][0] == 0
    assert all(a[0] + a[1] == b[0] and a[2] != b[2] for a, b in itertools.pairwise(extents))
    assert extents[-1][0] + extents[-1][1] == SIZE
    for offset, length in NONZERO:
        assert _covers(extents, offset, length, zero=False), (offset, length)
    assert _covers(extents, *ZERO_WRITTEN, zero=True)
    assert _covers(extents, 4 * MiB, 4 * MiB, zero=True)
    for offset, length, is_zero in extents:
        if is_zero:
            assert raw[offset : offset + length] == bytes(length), offset


def test_block_status_flags_for_data_hole_and_zero_cluster(client: NbdClient) -> None:
    data = client.block_status(8 * MiB, 64 * KiB, ALLOC)
    assert data == [BlockStatus(8 * MiB, 64 * KiB, 0)]
    zeroed = client.block_status(*ZERO_WRITTEN, ALLOC)
    assert len(zeroed) == 1 and zeroed[0].flags & NBD_STATE_ZERO
    hole = client.block_status(12 * MiB, 1 * MiB, ALLOC)
    assert hole == [BlockStatus(12 * MiB, 1 * MiB, NBD_STATE_HOLE | NBD_STATE_ZERO)]


def test_block_status_is_ordered_and_clipped(client: NbdClient) -> None:
    extents = client.block_status(100 * KiB, 4 * MiB, ALLOC)
    assert extents[0].offset == 100 * KiB
    assert all(a.offset + a.length == b.offset for a, b in itertools.pairwise(extents))
    assert extents[-1].offset + extents[-1].length <= 100 * KiB + 4 * MiB


def test_iter_block_status_merges_across_chunks(client: NbdClient) -> None:
    whole = list(client.iter_block_status(ALLOC))
    small = list(client.iter_block_status(ALLOC, chunk=64 * KiB))
    assert small == whole
    assert all(a.flags != b.flags for a, b in itertools.pairwise(whole))
    window = list(client.iter_block_status(ALLOC, 100 * KiB, 1 * MiB, chunk=256 * KiB))
    assert window[0].offset == 100 * KiB
    assert window[-1].offset + window[-1].length == 100 * KiB + 1 * MiB
    assert sum(extent.length for extent in window) == 1 * MiB


def test_dirty_extents_are_exactly_the_writes_after_the_bitmap(client: NbdClient) -> None:
    assert client.dirty_extents(B0) == EXPECTED_DIRTY
    assert client.dirty_extents(B1) == []


def test_block_status_needs_a_negotiated_context(daemon: StorageDaemon) -> None:
    with NbdClient.connect_unix(str(daemon.sock), "disk0", [ALLOC]) as nbd:
        with pytest.raises(InputError, match="not negotiated"):
            nbd.block_status(0, 4096, B0)
        assert nbd.block_status(0, 4096, ALLOC) == [BlockStatus(0, 4096, 0)]


# -- reads -----------------------------------------------------------------------------------


@pytest.mark.parametrize("sparse_reads", [False, True])
def test_pread_equals_image_content(
    daemon: StorageDaemon, image: tuple[Path, bytes], sparse_reads: bool
) -> None:
    raw = image[1]
    with NbdClient.connect_unix(str(daemon.sock), "disk0", sparse_reads=sparse_reads) as nbd:
        assert nbd.pread(0, SIZE) == raw
        # Spans data, hole, data, hole: exercises OFFSET_HOLE chunks when sparse.
        assert nbd.pread(100 * KiB, 1200 * KiB) == raw[100 * KiB : 1300 * KiB]
        assert nbd.pread(SIZE - 1, 1) == b"\0"
        assert nbd.pread(5, 0) == b""


def test_pread_many_equals_single_preads(client: NbdClient, image: tuple[Path, bytes]) -> None:
    raw = image[1]
    rng = random.Random(7)
    ranges = [(rng.randrange(SIZE - 300 * KiB), rng.randrange(1, 300 * KiB)) for _ in range(60)]
    got = list(client.pread_many(ranges, max_request=40 * KiB + 7, in_flight=5))
    expected_offsets = [off + i for off, ln in ranges for i in range(0, ln, 40 * KiB + 7)]
    assert [offset for offset, _ in got] == expected_offsets
    assert b"".join(data for _, data in got) == b"".join(raw[o : o + n] for o, n in ranges)
    assert b"".join(data for _, data in got) == b"".join(client.pread(o, n) for o, n in ranges)


def test_pread_many_closed_early_leaves_connection_usable(
    client: NbdClient, image: tuple[Path, bytes]
) -> None:
    stream = client.pread_many([(0, 4 * MiB)], max_request=256 * KiB, in_flight=8)
    assert next(stream) == (0, image[1][: 256 * KiB])
    stream.close()
    assert client.pread(1 * MiB, 64 * KiB) == image[1][1 * MiB : 1 * MiB + 64 * KiB]


def test_pread_many_rejects_bad_range_after_good_ones(client: NbdClient) -> None:
    stream = client.pread_many([(0, 4096), (SIZE - 10, 20)])
    assert next(stream)[0] == 0
    with pytest.raises(InputError, match="outside the NBD export"):
        next(stream)
    assert client.pread(0, 4) == b"\x33" * 4


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("offset", "length"), [(SIZE - 100, 101), (SIZE, 1), (-1, 10)])
def test_read_outside_disk_is_input_error_before_sending(
    client: NbdClient, offset: int, length: int
) -> None:
    with pytest.raises(InputError, match="outside the NBD export"):
        client.pread(offset, length)
    with pytest.raises(InputError):
        client.block_status(offset, length, ALLOC)
    assert client.pread(SIZE - 100, 100) == bytes(100)


def test_server_read_error_is_nbd_server_error(
    storage_daemon: Start, image: tuple[Path, bytes]
) -> None:
    """blkdebug under the qcow2 node fails every data-cluster read with EIO."""
    inject = {"event": "read_aio", "errno": 5, "once": False}
    qsd = storage_daemon(image[0], blockdevs=[
        {"driver": "file", "node-name": "file0", "filename": str(image[0]), "read-only": True},
        {"driver": "blkdebug", "node-name": "dbg", "image": "file0", "inject-error": [inject],
         "read-only": True},
        {"driver": "qcow2", "node-name": "disk0", "file": "dbg", "read-only": True},
    ])
    with NbdClient.connect_unix(str(qsd.sock), "disk0") as nbd:
        with pytest.raises(NbdServerError) as info:
            nbd.pread(0, 64 * KiB)
        assert info.value.errno == 5
        assert "read at offset 0" in str(info.value)
        assert nbd.pread(4 * MiB, 64 * KiB) == bytes(64 * KiB)  # a hole: no file read


def test_server_killed_mid_session_is_nbd_error(client: NbdClient, daemon: StorageDaemon) -> None:
    assert client.pread(0, 4) == b"\x33" * 4
    daemon.kill()
    with pytest.raises(NbdError, match=r"closed|failed") as info:
        list(client.pread_many([(0, SIZE)], max_request=1 * MiB))
    assert not isinstance(info.value, NbdServerError)
    assert info.value.recoverable
    with pytest.raises(NbdError, match="connection is closed"):
        client.pread(0, 4)
