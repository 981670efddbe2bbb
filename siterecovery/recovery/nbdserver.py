"""A read-only NBD server that serves a recovery point's disks straight from the replica store.

Instant recovery (DESIGN §5) starts the replica VM on a local qcow2 overlay whose backing is
this server: the guest's first reads fetch only the blocks it touches, every one verified
(chunk hash, segment MAC) by :class:`~siterecovery.store.reader.ChainReader`, and decoded
blocks stay in an LRU **read cache**. Writes never reach the server: they land in the overlay.

Protocol subset (the NBD protocol document, "fixed newstyle negotiation")::

    handshake   NBDMAGIC IHAVEOPT, flags FIXED_NEWSTYLE|NO_ZEROES
    options     EXPORT_NAME, ABORT, LIST, INFO, GO (INFO_EXPORT + INFO_BLOCK_SIZE),
                STRUCTURED_REPLY; anything else gets NBD_REP_ERR_UNSUP
    commands    READ, FLUSH (no-op), DISC; WRITE/TRIM/WRITE_ZEROES get EPERM
    replies     simple replies, or structured OFFSET_DATA / OFFSET_HOLE (all-zero blocks cost
                a 12-byte chunk) / ERROR chunks once STRUCTURED_REPLY was negotiated

One export per disk, named after the disk. A block that fails verification answers the read
with EIO (the guest sees an I/O error; nothing corrupt is ever returned) and is logged.

Run as its own process (``python -m siterecovery.recovery.nbdserver``) so it outlives the
command that started the failover: see :func:`main`. It listens on a unix socket that appears
(atomic rename) only once it accepts connections, and exits on SIGTERM, when its last client
disconnects (``--exit-when-idle``: QEMU drops the backing after hydration or when the VM
stops), or when no client came within ``--first-client-timeout`` seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

from siterecovery.errors import SiteRecoveryError
from siterecovery.store.reader import ChainReader

_NBDMAGIC, _IHAVEOPT, _REPLY_MAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x3E889045565A9
_FLAG_FIXED_NEWSTYLE, _FLAG_NO_ZEROES = 1, 2
_OPT_EXPORT_NAME, _OPT_ABORT, _OPT_LIST, _OPT_INFO, _OPT_GO, _OPT_STRUCTURED = 1, 2, 3, 6, 7, 8
_REP_ACK, _REP_SERVER, _REP_INFO = 1, 2, 3
_REP_ERR_UNSUP, _REP_ERR_INVALID, _REP_ERR_UNKNOWN = (1 << 31) | 1, (1 << 31) | 3, (1 << 31) | 6
_INFO_EXPORT, _INFO_BLOCK_SIZE = 0, 3
_TX_HAS_FLAGS, _TX_READ_ONLY, _TX_SEND_FLUSH, _TX_CAN_MULTI_CONN = 1, 2, 4, 1 << 8
_TX_FLAGS = _TX_HAS_FLAGS | _TX_READ_ONLY | _TX_SEND_FLUSH | _TX_CAN_MULTI_CONN
_CMD_READ, _CMD_DISC, _CMD_FLUSH = 0, 2, 3
_REQUEST_MAGIC, _SIMPLE_MAGIC, _STRUCTURED_MAGIC = 0x25609513, 0x67446698, 0x668E33EF
_CHUNK_NONE, _CHUNK_DATA, _CHUNK_HOLE, _CHUNK_ERROR = 0, 1, 2, (1 << 15) | 1
_CHUNK_DONE = 1
_REQUEST = struct.Struct(">IHHQQI")
_MAX_REQUEST = 32 << 20
_MAX_OPTION = 64 << 10


class BlockCache:
    """A thread-safe LRU of decoded blocks, bounded in bytes; zero blocks are stored as None."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self._items: OrderedDict[tuple[str, int], bytes | None] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[str, int]) -> tuple[bool, bytes | None]:
        """(found, block) for ``key``; a hit refreshes its place."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return True, self._items[key]
            self.misses += 1
            return False, None

    def put(self, key: tuple[str, int], block: bytes | None) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = block
            self._bytes += len(block) if block else 0
            while self._bytes > self.capacity and self._items:
                _, old = self._items.popitem(last=False)
                self._bytes -= len(old) if old else 0


class ExportedDisk:
    """One disk of a recovery point, readable at any byte range through the cache."""

    def __init__(self, name: str, reader: ChainReader, cache: BlockCache) -> None:
        self.name = name
        self.reader = reader
        self.cache = cache
        self.size = reader.size
        self.block_size = reader.block_size

    def block(self, index: int) -> bytes | None:
        """Block ``index`` (verified) or None when it is all zeros."""
        found, data = self.cache.get((self.name, index))
        if not found:
            data = self.reader.block(index)
            self.cache.put((self.name, index), data)
        return data

    def pieces(self, offset: int, length: int) -> list[tuple[int, bytes | int]]:
        """``[offset, offset+length)`` as (offset, data) pieces, or (offset, hole length)."""
        out: list[tuple[int, bytes | int]] = []
        end = offset + length
        while offset < end:
            index = offset // self.block_size
            start = index * self.block_size
            stop = min(end, start + self.block_size, self.size)
            data = self.block(index)
            if data is None:
                out.append((offset, stop - offset))
            else:
                out.append((offset, data[offset - start : stop - start]))
            offset = stop
        return out


class _Closed(Exception):
    """The peer went away."""


class NbdServer:
    """Serves ``exports`` (name -> disk) on a unix socket, one thread per connection."""

    def __init__(self, exports: Mapping[str, ExportedDisk], socket_path: Path) -> None:
        self.exports = dict(exports)
        self.socket_path = socket_path
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        self.clients = 0
        self.served = 0
        self.stopped = threading.Event()
        self.idle = threading.Event()

    def listen(self) -> None:
        """Bind, listen, then rename into place: the path exists only once it accepts."""
        tmp = self.socket_path.with_name(f".{self.socket_path.name}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(tmp))
        sock.listen(16)
        os.replace(tmp, self.socket_path)
        self._listener = sock

    def serve_forever(self) -> None:
        """Accept connections until :meth:`stop`."""
        assert self._listener is not None
        while not self.stopped.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                break
            with self._lock:
                self.clients += 1
                self.served += 1
                self.idle.clear()
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def stop(self) -> None:
        self.stopped.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        self.socket_path.unlink(missing_ok=True)

    def _handle(self, conn: socket.socket) -> None:
        try:
            with conn:
                _Connection(conn, self.exports).run()
        except (_Closed, OSError):
            pass
        finally:
            with self._lock:
                self.clients -= 1
                if self.clients == 0:
                    self.idle.set()


class _Connection:
    def __init__(self, sock: socket.socket, exports: Mapping[str, ExportedDisk]) -> None:
        self.sock = sock
        self.exports = exports
        self.structured = False
        self.no_zeroes = False

    # -- wire helpers ---------------------------------------------------------------------

    def recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            part = self.sock.recv(n - len(buf))
            if not part:
                raise _Closed
            buf += part
        return bytes(buf)

    def send(self, *parts: bytes) -> None:
        self.sock.sendall(b"".join(parts))

    def option_reply(self, option: int, kind: int, data: bytes = b"") -> None:
        self.send(struct.pack(">QIII", _REPLY_MAGIC, option, kind, len(data)), data)

    # -- handshake ------------------------------------------------------------------------

    def run(self) -> None:
        self.send(struct.pack(">QQH", _NBDMAGIC, _IHAVEOPT, _FLAG_FIXED_NEWSTYLE | _FLAG_NO_ZEROES))
        (client_flags,) = struct.unpack(">I", self.recv(4))
        self.no_zeroes = bool(client_flags & _FLAG_NO_ZEROES)
        export = self.negotiate()
        if export is not None:
            self.transmit(export)

    def negotiate(self) -> ExportedDisk | None:
        while True:
            magic, option, length = struct.unpack(">QII", self.recv(16))
            if magic != _IHAVEOPT or length > _MAX_OPTION:
                return None
            data = self.recv(length)
            if option == _OPT_EXPORT_NAME:
                return self.export_name(data)
            if option == _OPT_ABORT:
                self.option_reply(option, _REP_ACK)
                return None
            chosen = self.option(option, data)
            if chosen is not None:
                return chosen

    def export_name(self, data: bytes) -> ExportedDisk | None:
        export = self.exports.get(data.decode(errors="replace"))
        if export is None:
            return None  # the protocol's only answer to an unknown name here is to hang up
        tail = b"" if self.no_zeroes else bytes(124)
        self.send(struct.pack(">QH", export.size, _TX_FLAGS), tail)
        return export

    def option(self, option: int, data: bytes) -> ExportedDisk | None:
        if option == _OPT_LIST:
            for name in self.exports:
                raw = name.encode()
                self.option_reply(option, _REP_SERVER, struct.pack(">I", len(raw)) + raw)
            self.option_reply(option, _REP_ACK)
        elif option == _OPT_STRUCTURED:
            self.structured = True
            self.option_reply(option, _REP_ACK)
        elif option in (_OPT_INFO, _OPT_GO):
            return self.info_or_go(option, data)
        else:
            self.option_reply(option, _REP_ERR_UNSUP)
        return None

    def info_or_go(self, option: int, data: bytes) -> ExportedDisk | None:
        if len(data) < 6:
            self.option_reply(option, _REP_ERR_INVALID)
            return None
        (name_len,) = struct.unpack(">I", data[:4])
        name = data[4 : 4 + name_len].decode(errors="replace")
        export = self.exports.get(name) if name else next(iter(self.exports.values()), None)
        if export is None:
            self.option_reply(option, _REP_ERR_UNKNOWN, f"no export {name!r}".encode())
            return None
        info = struct.pack(">HQH", _INFO_EXPORT, export.size, _TX_FLAGS)
        self.option_reply(option, _REP_INFO, info)
        sizes = struct.pack(">HIII", _INFO_BLOCK_SIZE, 1, 4096, _MAX_REQUEST)
        self.option_reply(option, _REP_INFO, sizes)
        self.option_reply(option, _REP_ACK)
        return export if option == _OPT_GO else None

    # -- transmission ---------------------------------------------------------------------

    def transmit(self, export: ExportedDisk) -> None:
        while True:
            magic, _flags, command, cookie, offset, length = _REQUEST.unpack(
                self.recv(_REQUEST.size)
            )
            if magic != _REQUEST_MAGIC:
                return
            if command == _CMD_DISC:
                return
            if command == _CMD_READ:
                self.read(export, cookie, offset, length)
            elif command == _CMD_FLUSH:
                self.simple(cookie, 0)
            else:
                if command == 1:  # WRITE carries a payload that must be drained
                    self.recv(length)
                self.error(cookie, errno.EPERM, "the export is read-only")

    def read(self, export: ExportedDisk, cookie: int, offset: int, length: int) -> None:
        if length > _MAX_REQUEST or offset + length > export.size:
            self.error(cookie, errno.EINVAL, "read out of range")
            return
        try:
            pieces = export.pieces(offset, length)
        except SiteRecoveryError as exc:
            print(f"read {export.name} @{offset}+{length} failed: {exc}", file=sys.stderr)
            self.error(cookie, errno.EIO, "recovery point data failed verification")
            return
        if not self.structured:
            data = b"".join(p if isinstance(p, bytes) else bytes(p) for _, p in pieces)
            self.send(struct.pack(">IIQ", _SIMPLE_MAGIC, 0, cookie), data)
            return
        for at, piece in pieces:
            if isinstance(piece, bytes):
                self.chunk(cookie, _CHUNK_DATA, struct.pack(">Q", at) + piece)
            else:
                self.chunk(cookie, _CHUNK_HOLE, struct.pack(">QI", at, piece))
        self.chunk(cookie, _CHUNK_NONE, b"", done=True)

    def chunk(self, cookie: int, kind: int, payload: bytes, *, done: bool = False) -> None:
        head = struct.pack(
            ">IHHQI", _STRUCTURED_MAGIC, _CHUNK_DONE if done else 0, kind, cookie, len(payload)
        )
        self.send(head, payload)

    def simple(self, cookie: int, error: int) -> None:
        self.send(struct.pack(">IIQ", _SIMPLE_MAGIC, error, cookie))

    def error(self, cookie: int, error: int, message: str) -> None:
        if not self.structured:
            self.simple(cookie, error)
            return
        raw = message.encode()
        self.chunk(cookie, _CHUNK_ERROR, struct.pack(">IH", error, len(raw)) + raw, done=True)


# ---------------------------------------------------------------------------------------------
# The server process


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="siterecovery-nbd", description=__doc__)
    parser.add_argument("--store-url", required=True)
    parser.add_argument("--key-file", required=True, type=Path)
    parser.add_argument("--vm", required=True)
    parser.add_argument("--point", required=True)
    parser.add_argument("--socket", required=True, type=Path)
    parser.add_argument("--cache-mib", type=int, default=256)
    parser.add_argument("--exit-when-idle", action="store_true")
    parser.add_argument("--first-client-timeout", type=float, default=120.0)
    return parser.parse_args(list(argv))


def serve_point(args: argparse.Namespace) -> NbdServer:
    """Open the store and the point's disks and return a listening server (not yet serving)."""
    from siterecovery.store.keys import StoreKeys
    from siterecovery.store.repository import ReplicaStore

    store = ReplicaStore.open(args.store_url, StoreKeys.load(args.key_file))
    point = store.load_point(args.vm, args.point)
    cache = BlockCache(args.cache_mib << 20)
    exports = {d: ExportedDisk(d, store.open_disk(point, d), cache) for d in point.disks}
    server = NbdServer(exports, args.socket)
    server.listen()
    return server


#: Seconds without any client, after the first one, before an idle server exits: QEMU may
#: close and reopen its connection (a reconnect, a drive reopen), which must not kill it.
IDLE_GRACE_S = 3.0


def _watch(server: NbdServer, exit_when_idle: bool, first_client_timeout: float) -> None:
    """Stop the server when idle (for IDLE_GRACE_S) after serving, or when nobody came."""
    deadline = time.monotonic() + first_client_timeout
    idle_since: float | None = None
    while not server.stopped.is_set():
        now = time.monotonic()
        idle_since = (idle_since or now) if server.clients == 0 else None
        if server.served == 0 and now > deadline:
            print("no client connected in time: exiting", file=sys.stderr)
            server.stop()
        elif exit_when_idle and server.served and idle_since and now - idle_since > IDLE_GRACE_S:
            print("last client disconnected: exiting", file=sys.stderr)
            server.stop()
        time.sleep(0.2)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the server process; exit status 0 after a clean stop, 1 on errors."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    try:
        server = serve_point(args)
    except SiteRecoveryError as exc:
        print(f"error: {exc.describe()}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    watcher = threading.Thread(
        target=_watch, args=(server, args.exit_when_idle, args.first_client_timeout), daemon=True
    )
    watcher.start()
    print(f"serving {sorted(server.exports)} on {args.socket}", file=sys.stderr, flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
