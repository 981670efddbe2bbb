"""A synchronous pure-Python NBD client: newstyle handshake, structured replies, block status.

The replication data path reads a frozen point-in-time view of a VM disk that QEMU exports over
NBD (DESIGN.md §3): it walks ``base:allocation`` for the first full copy and
``qemu:dirty-bitmap:NAME`` for each delta cycle, then reads only the extents that matter.

Protocol subset (see the NBD protocol document, "fixed newstyle negotiation")::

    handshake   NBD_OPT_STRUCTURED_REPLY, NBD_OPT_SET_META_CONTEXT (exact names), NBD_OPT_GO
                asking for NBD_INFO_BLOCK_SIZE; NBD_INFO_EXPORT gives size and flags
    commands    NBD_CMD_READ, NBD_CMD_BLOCK_STATUS, NBD_CMD_DISC (the client never writes)
    replies     simple replies, and structured chunks OFFSET_DATA, OFFSET_HOLE (read as zeros),
                BLOCK_STATUS, ERROR, ERROR_OFFSET, NONE

Errors: connection and protocol failures raise :class:`NbdError` (the connection is then
unusable); an NBD error code from the server raises :class:`NbdServerError` with ``errno`` (the
connection stays usable); a call with out-of-range arguments raises :class:`InputError` before
anything is sent. Requests are pipelined: replies may arrive in any order and are matched to
requests by cookie. A read answered in one piece is received with one ``MSG_WAITALL`` recv
straight into the bytes returned (no copy); fragmented answers are assembled in a buffer.
"""

from __future__ import annotations

import os
import socket
import struct
from collections import deque
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from siterecovery.errors import InputError
from siterecovery.hypervisor.errors import NbdError, NbdServerError

__all__ = ["NBD_DIRTY", "NBD_STATE_HOLE", "NBD_STATE_ZERO", "BlockStatus", "NbdClient"]

# base:allocation flags, and the one flag of qemu:dirty-bitmap:NAME contexts.
NBD_STATE_HOLE = 1
NBD_STATE_ZERO = 2
NBD_DIRTY = 1

# Handshake: magics, handshake flags, options, option replies (errors have bit 31), infos.
_NBDMAGIC, _IHAVEOPT, _OPT_REPLY_MAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x3E889045565A9
_FLAG_FIXED_NEWSTYLE, _FLAG_NO_ZEROES = 1, 2
_OPT_GO, _OPT_STRUCTURED_REPLY, _OPT_SET_META_CONTEXT = 7, 8, 10
_REP_ACK, _REP_INFO, _REP_META_CONTEXT, _REP_ERR_BIT = 1, 3, 4, 1 << 31
_REP_ERR_UNKNOWN = _REP_ERR_BIT | 6
_REP_ERR_NAMES = (  # indexed by the error reply type without bit 31
    "error 0", "unsupported option", "forbidden by server policy", "invalid option",
    "unsupported on this platform", "TLS required", "unknown export", "server shutting down",
    "block size negotiation required", "request too big",
)
_INFO_EXPORT, _INFO_BLOCK_SIZE = 0, 3

# Transmission: requests, commands and their flags, replies and structured chunk types.
_REQUEST_MAGIC, _SIMPLE_REPLY_MAGIC, _STRUCTURED_REPLY_MAGIC = 0x25609513, 0x67446698, 0x668E33EF
_CMD_READ, _CMD_WRITE, _CMD_DISC, _CMD_FLUSH, _CMD_BLOCK_STATUS = 0, 1, 2, 3, 7
_CMD_FLAG_FUA, _TRANSMISSION_READ_ONLY, _TRANSMISSION_SEND_FLUSH = 1, 1 << 1, 1 << 2
_CMD_FLAG_DF, _TRANSMISSION_SEND_DF = 4, 1 << 7
_REPLY_FLAG_DONE = 1
_REPLY_NONE, _REPLY_OFFSET_DATA, _REPLY_OFFSET_HOLE, _REPLY_BLOCK_STATUS = 0, 1, 2, 5
_REPLY_ERROR_BIT = 1 << 15
_REPLY_ERROR_OFFSET = _REPLY_ERROR_BIT | 2

_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_TAIL = struct.Struct(">IQ")  # error, cookie (after the 4-byte magic)
_STRUCT_TAIL = struct.Struct(">HHQI")  # flags, type, cookie, length (after the magic)
_OPT_REPLY = struct.Struct(">QIII")

# Caps on what a peer may make us allocate outside read payloads.
_MAX_OPTION_REPLY = 1 << 20
_MAX_STATUS_PAYLOAD = 64 << 20
_DEFAULT_MAX_BLOCK = 32 << 20  # what the protocol lets a client assume without BLOCK_SIZE info
_MAX_STATUS_REQUEST = 0xFFFFFFFF
_SOCKET_BUFFER = 4 << 20


@dataclass(frozen=True)
class BlockStatus:
    """One block-status extent: ``[offset, offset + length)`` has ``flags`` (raw per context)."""

    offset: int
    length: int
    flags: int


@dataclass(eq=False)
class _Request:
    """One in-flight command; filled in by reply chunks until ``done``."""

    cookie: int
    command: int
    offset: int
    length: int
    data: bytes | bytearray | None = None  # whole payload, or a buffer assembling chunks
    covered: int = 0  # payload bytes answered so far (data and holes)
    extents: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    error: NbdServerError | None = None
    done: bool = False


def _server_error(errno: int, what: str, message: str = "") -> NbdServerError:
    detail = f": {message}" if message else ""
    return NbdServerError(
        f"NBD server failed {what}: {os.strerror(errno)} (errno {errno}){detail}", errno=errno
    )


def _connect(address: str | tuple[str, int], timeout: float | None) -> socket.socket:
    """A connected unix (``address`` is a path) or TCP socket, set up for the data path."""
    sock: socket.socket | None = None
    try:
        if isinstance(address, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(address)
        else:
            sock = socket.create_connection(address, timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _prepare_socket(sock, timeout)
        return sock
    except OSError as exc:
        if sock is not None:
            sock.close()
        where = address if isinstance(address, str) else f"{address[0]}:{address[1]}"
        raise NbdError(
            f"cannot connect to the NBD server at {where}: {exc}",
            hint="check that the NBD server is running and its socket path or address is right",
        ) from exc


def _prepare_socket(sock: socket.socket, timeout: float | None) -> None:
    """Make ``sock`` blocking with kernel send/receive timeouts.

    ``MSG_WAITALL`` only waits on a blocking socket, and Python's own timeouts make the socket
    non-blocking, so the timeout is set with SO_RCVTIMEO / SO_SNDTIMEO instead.
    """
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
    if timeout is not None:
        seconds = max(timeout, 0.001)  # zero would mean "wait forever" to the kernel
        timeval = struct.pack("@ll", int(seconds), int(seconds % 1 * 1_000_000))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


class NbdClient:
    """A connection to one NBD export; use :meth:`connect_unix` or :meth:`connect_tcp`.

    Attributes after connecting: ``size`` (export size in bytes), ``contexts`` (negotiated meta
    context name -> id), ``flags`` (transmission flags), ``min_block``, ``preferred_block`` and
    ``max_block`` (block size constraints; defaults 1, 4096 and 32 MiB when the server sends
    none). One client is not safe for use by several threads at once.
    """

    def __init__(
        self, sock: socket.socket, export: str, meta_contexts: Sequence[str], *,
        sparse_reads: bool = False,
    ) -> None:
        """Run the handshake on an already connected socket; prefer the ``connect_*`` methods.

        ``sparse_reads`` False (the default) sends reads with NBD_CMD_FLAG_DF when the server
        allows it, so the server answers with one data chunk: QEMU then skips its per-read
        block-status walk, and answers a failed read with an error reply (NbdServerError, the
        connection stays usable). True lets the server answer with hole chunks, which saves
        bandwidth on sparse ranges, but QEMU 7.2 drops the connection when such a read fails
        (NbdError).
        """
        self._sock = sock
        self._sparse_reads = sparse_reads
        self._closed = False
        self._next_cookie = 1
        self._inflight: dict[int, _Request] = {}
        self.size = 0
        self.flags = 0
        self.min_block = 1
        self.preferred_block = 4096
        self.max_block = _DEFAULT_MAX_BLOCK
        self.contexts: dict[str, int] = {}
        self._structured = False
        try:
            self._handshake(export, list(meta_contexts))
        except BaseException:
            self._abandon()
            raise

    @classmethod
    def connect_unix(
        cls, path: str, export: str = "", meta_contexts: Sequence[str] = (), *,
        timeout: float | None = 60.0, sparse_reads: bool = False,
    ) -> NbdClient:
        """Connect to a unix-socket NBD server and negotiate ``export`` and ``meta_contexts``.

        ``timeout`` bounds every socket operation (seconds; None waits forever);
        ``sparse_reads`` is described in :class:`NbdClient`.
        """
        sock = _connect(path, timeout)
        return cls(sock, export, meta_contexts, sparse_reads=sparse_reads)

    @classmethod
    def connect_tcp(
        cls, host: str, port: int, export: str = "", meta_contexts: Sequence[str] = (), *,
        timeout: float | None = 60.0, sparse_reads: bool = False,
    ) -> NbdClient:
        """Connect to a TCP NBD server and negotiate ``export`` and ``meta_contexts``."""
        sock = _connect((host, port), timeout)
        return cls(sock, export, meta_contexts, sparse_reads=sparse_reads)

    # -- handshake -------------------------------------------------------------------------

    def _handshake(self, export: str, meta_contexts: list[str]) -> None:
        magic, opt_magic, server_flags = struct.unpack(">QQH", self._recv_exact(18))
        if magic != _NBDMAGIC:
            raise self._protocol_error(f"not an NBD server (magic {magic:#x})")
        if opt_magic != _IHAVEOPT:
            raise self._protocol_error("server does not speak the newstyle handshake")
        if not server_flags & _FLAG_FIXED_NEWSTYLE:
            raise self._protocol_error("server does not support fixed newstyle negotiation")
        client_flags = _FLAG_FIXED_NEWSTYLE | (server_flags & _FLAG_NO_ZEROES)
        self._send(struct.pack(">I", client_flags))
        self._structured = self._negotiate_structured_reply()
        if meta_contexts:
            if not self._structured:
                raise NbdError(
                    "NBD server does not support structured replies, so no meta context "
                    f"({', '.join(meta_contexts)}) can be used",
                    hint="use a server with block status support (QEMU 2.12 or newer)",
                )
            self._negotiate_meta_contexts(export, meta_contexts)
        self._negotiate_go(export)

    def _send_option(self, option: int, data: bytes = b"") -> None:
        self._send(struct.pack(">QII", _IHAVEOPT, option, len(data)) + data)

    def _recv_option_reply(self, option: int) -> tuple[int, bytes]:
        magic, opt, reply, length = _OPT_REPLY.unpack(self._recv_exact(_OPT_REPLY.size))
        if magic != _OPT_REPLY_MAGIC or opt != option:
            raise self._protocol_error(f"bad option reply (magic {magic:#x}, option {opt})")
        if length > _MAX_OPTION_REPLY:
            raise self._protocol_error(f"option reply of {length} bytes is too long")
        return reply, self._recv_exact(length)

    def _option_refused(self, what: str, reply: int, data: bytes, export: str) -> NbdError:
        code = reply & ~_REP_ERR_BIT
        reason = _REP_ERR_NAMES[code] if code < len(_REP_ERR_NAMES) else f"error {code}"
        text = f" ({data.decode('utf-8', 'replace')})" if data else ""
        hint = "check the export name; the export may have been deleted"
        return NbdError(
            f"NBD server refused {what} for export {export!r}: {reason}{text}",
            hint=hint if reply == _REP_ERR_UNKNOWN else None,
        )

    def _negotiate_structured_reply(self) -> bool:
        self._send_option(_OPT_STRUCTURED_REPLY)
        reply, _ = self._recv_option_reply(_OPT_STRUCTURED_REPLY)
        if reply == _REP_ACK:
            return True
        if reply & _REP_ERR_BIT:
            return False
        raise self._protocol_error(f"unexpected reply {reply} to NBD_OPT_STRUCTURED_REPLY")

    def _negotiate_meta_contexts(self, export: str, wanted: list[str]) -> None:
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">I", len(wanted))
        for query in wanted:
            encoded = query.encode()
            data += struct.pack(">I", len(encoded)) + encoded
        self._send_option(_OPT_SET_META_CONTEXT, data)
        while True:
            reply, payload = self._recv_option_reply(_OPT_SET_META_CONTEXT)
            if reply == _REP_ACK:
                break
            if reply & _REP_ERR_BIT:
                raise self._option_refused("meta contexts", reply, payload, export)
            if reply != _REP_META_CONTEXT or len(payload) < 4:
                raise self._protocol_error(f"unexpected reply {reply} to SET_META_CONTEXT")
            (context_id,) = struct.unpack_from(">I", payload)
            self.contexts[payload[4:].decode("utf-8", "replace")] = context_id
        missing = [query for query in wanted if query not in self.contexts]
        if missing:
            raise NbdError(
                f"NBD export {export!r} does not offer meta context(s) {', '.join(missing)}",
                hint="for qemu:dirty-bitmap:NAME, check that the bitmap exists and is exported",
            )

    def _negotiate_go(self, export: str) -> None:
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, _INFO_BLOCK_SIZE)
        self._send_option(_OPT_GO, data)
        got_export = False
        while True:
            reply, payload = self._recv_option_reply(_OPT_GO)
            if reply == _REP_ACK:
                break
            if reply & _REP_ERR_BIT:
                raise self._option_refused("the export", reply, payload, export)
            if reply == _REP_INFO:
                got_export |= self._read_info(payload)
        if not got_export:
            raise self._protocol_error("server did not send NBD_INFO_EXPORT")

    def _read_info(self, payload: bytes) -> bool:
        """Apply one NBD_REP_INFO; True when it was NBD_INFO_EXPORT."""
        if len(payload) < 2:
            raise self._protocol_error("short NBD_REP_INFO")
        (info,) = struct.unpack_from(">H", payload)
        if info == _INFO_EXPORT and len(payload) == 12:
            self.size, self.flags = struct.unpack_from(">QH", payload, 2)
            return True
        if info == _INFO_BLOCK_SIZE and len(payload) == 14:
            minimum, preferred, maximum = struct.unpack_from(">III", payload, 2)
            # Zeros would make request splitting loop forever: keep the protocol's defaults.
            self.min_block = minimum or self.min_block
            self.preferred_block = preferred or self.preferred_block
            self.max_block = maximum or self.max_block
        return False

    # -- block status ----------------------------------------------------------------------

    def block_status(self, offset: int, length: int, context: str) -> list[BlockStatus]:
        """Send one NBD_CMD_BLOCK_STATUS for ``[offset, offset + length)`` in ``context``.

        Returns the server's extents for that context in order, starting at ``offset``,
        clipped to the range asked for (and to the end of the disk); they may cover less than
        asked. Lengths above 4 GiB - 1 are shortened to fit one request.
        """
        context_id = self._context_id(context)
        self._check_range(offset, length)
        if length == 0:
            return []
        length = min(length, _MAX_STATUS_REQUEST - _MAX_STATUS_REQUEST % max(self.min_block, 1))
        request = self._send_request(_CMD_BLOCK_STATUS, offset, length)
        self._wait(request)
        if context_id not in request.extents:
            raise self._protocol_error(f"block status reply has no extents for {context}")
        return self._clip_extents(request.extents[context_id], offset, offset + length)

    @staticmethod
    def _clip_extents(raw: list[tuple[int, int]], offset: int, end: int) -> list[BlockStatus]:
        result = []
        for length, flags in raw:
            if offset >= end:
                break
            length = min(length, end - offset)
            result.append(BlockStatus(offset, length, flags))
            offset += length
        return result

    def iter_block_status(
        self, context: str, offset: int = 0, length: int | None = None, *, chunk: int = 1 << 30
    ) -> Iterator[BlockStatus]:
        """Yield extents that tile ``[offset, offset + length)`` exactly (default: to the end).

        Sends one request per ``chunk`` bytes (or less, when the server answers short); adjacent
        extents with equal flags are merged, so consecutive yielded extents differ in flags.
        """
        if length is None:
            length = max(self.size - offset, 0)
        self._check_range(offset, length)
        if chunk <= 0:
            raise InputError(f"block status chunk must be positive, not {chunk}")
        pending: BlockStatus | None = None
        position, end = offset, offset + length
        while position < end:
            extents = self.block_status(position, min(chunk, end - position), context)
            if not extents:
                raise self._protocol_error("block status reply covers no bytes")
            for extent in extents:
                if pending is not None and pending.flags == extent.flags:
                    pending = BlockStatus(pending.offset, pending.length + extent.length,
                                          pending.flags)
                    continue
                if pending is not None:
                    yield pending
                pending = extent
            position = extents[-1].offset + extents[-1].length
        if pending is not None:
            yield pending

    def dirty_extents(self, bitmap_context: str) -> list[tuple[int, int]]:
        """``(offset, length)`` of every dirty range of the whole disk, merged, in order.

        ``bitmap_context`` is a negotiated ``qemu:dirty-bitmap:NAME`` context; ranges are in
        the bitmap's granularity (clipped to the disk's end).
        """
        result: list[tuple[int, int]] = []
        for extent in self.iter_block_status(bitmap_context):
            if not extent.flags & NBD_DIRTY:
                continue
            if result and result[-1][0] + result[-1][1] == extent.offset:
                result[-1] = (result[-1][0], result[-1][1] + extent.length)
            else:
                result.append((extent.offset, extent.length))
        return result

    def allocated_extents(self) -> list[tuple[int, int, bool]]:
        """``(offset, length, is_zero)`` ranges from ``base:allocation`` that tile the whole disk.

        Nothing is left out: ``is_zero`` is True where the server promises the range reads as
        zeros (NBD_STATE_ZERO, whether hole or allocated), and False everywhere else, including
        holes without the ZERO flag (their content is unspecified, so they must be read).
        Adjacent ranges with the same ``is_zero`` are merged. Needs the ``base:allocation``
        context negotiated at connect.
        """
        result: list[tuple[int, int, bool]] = []
        for extent in self.iter_block_status("base:allocation"):
            is_zero = bool(extent.flags & NBD_STATE_ZERO)
            if result and result[-1][2] == is_zero:
                result[-1] = (result[-1][0], result[-1][1] + extent.length, is_zero)
            else:
                result.append((extent.offset, extent.length, is_zero))
        return result

    # -- reads -----------------------------------------------------------------------------

    def pread(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset``; holes read as zeros.

        A range outside the disk raises InputError before anything is sent; reads larger than
        the server's maximum block are split into pipelined requests.
        """
        self._check_range(offset, length)
        if length == 0:
            return b""
        if length <= self.max_block:
            request = self._send_read(offset, length)
            return self._finish_read(request)
        return b"".join(data for _, data in self.pread_many([(offset, length)]))

    def pwrite(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        """Write ``data`` at ``offset``; with ``fua`` the server makes it durable before replying.

        Writes larger than the server's maximum block are split. Raises InputError for a
        read-only export or a range outside the disk, NbdServerError when the server refuses.
        """
        self._check_range(offset, len(data))
        if self.flags & _TRANSMISSION_READ_ONLY:
            raise InputError("the NBD export is read-only", hint="export it with writable=true")
        view = memoryview(data)
        requests = []
        for start in range(0, len(data), self.max_block):
            piece = view[start : start + self.max_block]
            flags = _CMD_FLAG_FUA if fua else 0
            requests.append(self._send_request(_CMD_WRITE, offset + start, len(piece), flags))
            self._send(bytes(piece))
        for request in requests:
            self._wait(request)

    def flush(self) -> None:
        """Ask the server to make every completed write durable (NBD_CMD_FLUSH)."""
        if not self.flags & _TRANSMISSION_SEND_FLUSH:
            return
        self._wait(self._send_request(_CMD_FLUSH, 0, 0))

    def pread_many(
        self, ranges: Iterable[tuple[int, int]], *, max_request: int = 8 << 20, in_flight: int = 8
    ) -> Generator[tuple[int, bytes], None, None]:
        """Read many ``(offset, length)`` ranges with up to ``in_flight`` requests outstanding.

        Each range is split into requests of at most ``max_request`` bytes (and at most the
        server's maximum block); yields ``(offset, data)`` per request, in request order. Ranges
        are checked as they are consumed: a bad one raises InputError after the earlier ones were
        yielded. Closing the generator early (``close()``, or dropping it) waits for and discards
        the outstanding replies, so the connection stays usable.
        """
        if max_request <= 0 or in_flight <= 0:
            raise InputError(
                f"max_request ({max_request}) and in_flight ({in_flight}) must be positive"
            )
        pieces = self._split(ranges, min(max_request, self.max_block))
        queue: deque[_Request] = deque()
        bad_range: list[InputError] = []  # raised once the requests before it were yielded
        try:
            self._fill(queue, pieces, in_flight, bad_range)
            while queue:
                head = queue.popleft()
                data = self._finish_read(head)
                self._fill(queue, pieces, in_flight, bad_range)
                yield head.offset, data
            if bad_range:
                raise bad_range[0]
        finally:
            self._drain(queue)

    def _split(self, ranges: Iterable[tuple[int, int]], size: int) -> Iterator[tuple[int, int]]:
        for offset, length in ranges:
            self._check_range(offset, length)
            end = offset + length
            while offset < end:
                step = min(size, end - offset)
                yield offset, step
                offset += step

    def _fill(
        self, queue: deque[_Request], pieces: Iterator[tuple[int, int]], limit: int,
        bad_range: list[InputError],
    ) -> None:
        while len(queue) < limit and not bad_range:
            try:
                piece = next(pieces, None)
            except InputError as exc:
                bad_range.append(exc)
                return
            if piece is None:
                return
            queue.append(self._send_read(*piece))

    def _drain(self, queue: deque[_Request]) -> None:
        """Consume the replies of abandoned requests so later requests see a clean stream."""
        for request in queue:
            if self._closed:
                return
            try:
                self._wait(request)
            except NbdServerError:
                continue

    def _send_read(self, offset: int, length: int) -> _Request:
        whole = not self._sparse_reads and self.flags & _TRANSMISSION_SEND_DF
        return self._send_request(_CMD_READ, offset, length, _CMD_FLAG_DF if whole else 0)

    def _finish_read(self, request: _Request) -> bytes:
        self._wait(request)
        if request.covered != request.length:
            raise self._protocol_error(
                f"read reply covers {request.covered} of {request.length} bytes"
            )
        data = request.data
        return data if isinstance(data, bytes) else bytes(data or b"")

    # -- transmission ----------------------------------------------------------------------

    def _context_id(self, context: str) -> int:
        if context not in self.contexts:
            raise InputError(
                f"meta context {context!r} was not negotiated on this NBD connection",
                hint="pass it in meta_contexts when connecting",
            )
        return self.contexts[context]

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InputError(
                f"range offset={offset} length={length} is outside the NBD export "
                f"of {self.size} bytes",
                hint="keep offset and length within the disk size",
            )

    def _send_request(
        self, command: int, offset: int, length: int, flags: int = 0
    ) -> _Request:
        self._check_open()
        cookie = self._next_cookie
        self._next_cookie += 1
        request = _Request(cookie, command, offset, length)
        self._send(_REQUEST.pack(_REQUEST_MAGIC, flags, command, cookie, offset, length))
        self._inflight[cookie] = request
        return request

    def _wait(self, request: _Request) -> None:
        """Receive replies (for any request) until ``request`` is done; raise its server error."""
        while not request.done:
            self._recv_reply()
        if request.error is not None:
            raise request.error

    def _recv_reply(self) -> None:
        header = self._recv_exact(16)
        (magic,) = struct.unpack_from(">I", header)
        if magic == _SIMPLE_REPLY_MAGIC:
            error, cookie = _SIMPLE_TAIL.unpack_from(header, 4)
            self._on_simple_reply(self._request_for(cookie), error)
        elif magic == _STRUCTURED_REPLY_MAGIC and self._structured:
            flags, kind, cookie, length = _STRUCT_TAIL.unpack(header[4:] + self._recv_exact(4))
            request = self._request_for(cookie)
            self._on_chunk(request, kind, length)
            if flags & _REPLY_FLAG_DONE:
                self._complete(request)
        else:
            raise self._protocol_error(f"bad reply magic {magic:#x}")

    def _request_for(self, cookie: int) -> _Request:
        request = self._inflight.get(cookie)
        if request is None:
            raise self._protocol_error(f"reply for unknown request cookie {cookie}")
        return request

    def _complete(self, request: _Request) -> None:
        request.done = True
        del self._inflight[request.cookie]

    def _on_simple_reply(self, request: _Request, error: int) -> None:
        if error:
            request.error = _server_error(error, self._describe(request))
        elif request.command == _CMD_READ:
            request.data = self._recv_exact(request.length)
            request.covered = request.length
        elif request.command == _CMD_BLOCK_STATUS:
            raise self._protocol_error("simple reply to block status")
        self._complete(request)

    def _on_chunk(self, request: _Request, kind: int, length: int) -> None:
        is_read = request.command == _CMD_READ
        if kind == _REPLY_OFFSET_DATA and is_read and length > 8:
            self._on_data(request, length - 8)
        elif kind == _REPLY_OFFSET_HOLE and is_read and length == 12:
            offset, size = struct.unpack(">QI", self._recv_exact(12))
            self._check_chunk_range(request, offset, size)
            self._assembly_buffer(request)  # zero-filled: the hole needs no further work
        elif kind == _REPLY_BLOCK_STATUS and request.command == _CMD_BLOCK_STATUS:
            self._on_block_status(request, length)
        elif kind & _REPLY_ERROR_BIT:
            self._on_error(request, kind, length)
        elif kind != _REPLY_NONE or length:
            raise self._protocol_error(f"unexpected reply chunk type {kind} of {length} bytes")

    def _on_data(self, request: _Request, size: int) -> None:
        (offset,) = struct.unpack(">Q", self._recv_exact(8))
        start = self._check_chunk_range(request, offset, size)
        if size == request.length and request.data is None:
            request.data = self._recv_exact(size)  # the common case: no copy at all
        else:
            buffer = memoryview(self._assembly_buffer(request))
            self._recv_into(buffer[start : start + size])

    def _assembly_buffer(self, request: _Request) -> bytearray:
        if not isinstance(request.data, bytearray):
            request.data = bytearray(request.length)
        return request.data

    def _check_chunk_range(self, request: _Request, offset: int, size: int) -> int:
        """Check a data or hole chunk lies inside the request, and count it as answered."""
        start = offset - request.offset
        if start < 0 or start + size > request.length or request.covered + size > request.length:
            raise self._protocol_error(f"reply chunk at {offset}+{size} is outside the request")
        request.covered += size
        return start

    def _on_block_status(self, request: _Request, length: int) -> None:
        if length < 12 or length % 8 != 4 or length > _MAX_STATUS_PAYLOAD:
            raise self._protocol_error(f"bad block status chunk length {length}")
        payload = self._recv_exact(length)
        (context_id,) = struct.unpack_from(">I", payload)
        pairs = struct.iter_unpack(">II", memoryview(payload)[4:])
        request.extents[context_id] = [(size, flags) for size, flags in pairs]

    def _on_error(self, request: _Request, kind: int, length: int) -> None:
        if length < 6 or length > _MAX_OPTION_REPLY:
            raise self._protocol_error(f"bad error chunk length {length}")
        payload = self._recv_exact(length)
        error, message_length = struct.unpack_from(">IH", payload)
        message = payload[6 : 6 + message_length].decode("utf-8", "replace")
        if kind == _REPLY_ERROR_OFFSET and len(payload) >= 6 + message_length + 8:
            (offset,) = struct.unpack_from(">Q", payload, 6 + message_length)
            message = f"{message} (at offset {offset})"
        if request.error is None:
            request.error = _server_error(error or 5, self._describe(request), message)

    @staticmethod
    def _describe(request: _Request) -> str:
        names = {_CMD_READ: "read", _CMD_WRITE: "write", _CMD_FLUSH: "flush"}
        name = names.get(request.command, "block status")
        return f"{name} at offset {request.offset} length {request.length}"

    # -- socket ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise NbdError("the NBD connection is closed", hint="connect again")

    def _send(self, data: bytes) -> None:
        self._check_open()
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise self._io_error("sending to", exc) from exc

    def _recv_exact(self, size: int) -> bytes:
        """Receive exactly ``size`` bytes; one recv call in the usual case."""
        self._check_open()
        try:
            data = self._sock.recv(size, socket.MSG_WAITALL)
        except OSError as exc:
            raise self._io_error("receiving from", exc) from exc
        if len(data) == size:
            return data
        buffer = bytearray(size)  # a signal or timeout cut the wait short: finish in place
        buffer[: len(data)] = data
        self._recv_into(memoryview(buffer)[len(data) :])
        return bytes(buffer)

    def _recv_into(self, view: memoryview) -> None:
        self._check_open()
        position, size = 0, len(view)
        while position < size:
            try:
                received = self._sock.recv_into(view[position:], 0, socket.MSG_WAITALL)
            except OSError as exc:
                raise self._io_error("receiving from", exc) from exc
            if received == 0:
                self._abandon()
                raise NbdError(
                    f"NBD server closed the connection ({size - position} of {size} bytes "
                    "still expected)"
                )
            position += received

    def _io_error(self, doing: str, exc: OSError) -> NbdError:
        self._abandon()
        if isinstance(exc, BlockingIOError | TimeoutError):
            return NbdError(f"{doing} the NBD server timed out")
        return NbdError(f"{doing} the NBD server failed: {exc}")

    def _protocol_error(self, message: str) -> NbdError:
        self._abandon()
        return NbdError(
            f"NBD protocol error: {message}", hint="the server is not a compatible NBD server"
        )

    def _abandon(self) -> None:
        """Drop the socket without a goodbye: the stream is no longer in a known state."""
        self._closed = True
        self._inflight.clear()
        self._sock.close()

    def close(self) -> None:
        """Send NBD_CMD_DISC and close the socket; safe to call more than once."""
        if self._closed:
            return
        try:
            self._sock.sendall(_REQUEST.pack(_REQUEST_MAGIC, 0, _CMD_DISC, 0, 0, 0))
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # the server is gone already; there is nothing left to tell it
        self._abandon()

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
