"""A client for qemu-guest-agent (QGA) over the VM's virtio-serial unix socket.

The host side of ``virtserialport name=org.qemu.guest_agent.0`` is a QEMU chardev socket
(``<workdir>/<name>.qga``, see :class:`~siterecovery.hypervisor.process.VmProcessSpec`). QEMU
accepts the connection whether or not an agent runs in the guest, so "connected" means
nothing: an agent is present only once it answers the **guest-sync-delimited** handshake.

Protocol (one JSON object per line, both ways):

- handshake: the client sends the byte ``0xFF`` (the agent drops any partial request it
  was parsing) and ``{"execute": "guest-sync-delimited", "arguments": {"id": N}}``; the agent
  answers ``0xFF`` followed by ``{"return": N}``. Everything before that ``0xFF`` is a stale
  reply of an earlier client and is discarded; replies whose id is not ``N`` too.
- commands: ``{"execute": NAME, "arguments": {...}}`` → ``{"return": ...}`` or
  ``{"error": {"class": ..., "desc": ...}}``.

Contract of :class:`GuestAgent`: every call has a timeout; no foreign exception leaves this
module (:class:`GuestAgentUnavailable` when nothing answers in time or the socket is gone,
:class:`GuestAgentError` when the agent refuses). :meth:`GuestAgent.quiesce` freezes the
guest's filesystems around a block of code and **always** thaws them afterwards, on every
path (see its docstring).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from siterecovery.errors import HypervisorError

#: The virtio-serial port name qemu-ga opens in the guest.
AGENT_PORT = "org.qemu.guest_agent.0"
SYNC_TIMEOUT = 3.0
FREEZE_TIMEOUT = 20.0
THAW_TIMEOUT = 10.0
#: How many times a failing thaw is tried again (each time on a fresh connection).
THAW_ATTEMPTS = 3
_ids = itertools.count(int(time.time()) % 1_000_000)


class GuestAgentUnavailable(HypervisorError):
    """No guest agent answered: the socket is missing or nobody runs qemu-ga in the guest."""

    recoverable = True
    hint = (
        "install and start qemu-guest-agent in the guest, and give the VM a virtio-serial "
        "port named org.qemu.guest_agent.0; until then recovery points are crash-consistent"
    )


class GuestAgentError(HypervisorError):
    """The guest agent refused a command or answered something unexpected."""

    recoverable = True
    hint = "read the guest agent's message above; check qemu-ga's log in the guest"


class GuestLeftFrozen(GuestAgentError):
    """The guest's filesystems could not be thawed: its applications are blocked."""

    recoverable = False
    hint = (
        'thaw it now: send {"execute": "guest-fsfreeze-thaw"} on its agent socket, or run '
        "`fsfreeze -u MOUNTPOINT` in the guest"
    )


@dataclass(frozen=True)
class ExecResult:
    """What :meth:`GuestAgent.run` returns: the exit code and decoded output of a command."""

    exitcode: int
    stdout: bytes
    stderr: bytes


class GuestAgent:
    """One connection to a guest agent; use :meth:`connect` (it performs the handshake)."""

    def __init__(self, path: Path, sock: socket.socket) -> None:
        self.path = path
        self._sock = sock
        self._buffer = b""

    @classmethod
    def connect(cls, path: Path | str, *, timeout: float = SYNC_TIMEOUT) -> GuestAgent:
        """Connect to the agent socket at ``path`` and synchronize within ``timeout`` s."""
        path = Path(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(str(path))
        except OSError as exc:
            sock.close()
            raise GuestAgentUnavailable(f"guest agent socket {path}: {exc}") from exc
        agent = cls(path, sock)
        try:
            agent.sync(timeout=timeout)
        except BaseException:
            agent.close()
            raise
        return agent

    # -- protocol ------------------------------------------------------------------------

    def sync(self, *, timeout: float = SYNC_TIMEOUT) -> None:
        """The guest-sync-delimited handshake; discards stale replies of earlier clients."""
        sync_id = next(_ids)
        request = {"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}
        self._send(b"\xff" + json.dumps(request).encode() + b"\n", timeout)
        deadline = time.monotonic() + timeout
        self._skip_to_delimiter(deadline)
        while True:
            reply = self._read_reply(deadline, "guest-sync-delimited")
            if reply.get("return") == sync_id:
                return

    def cmd(self, name: str, /, *, timeout: float = 10.0, **args: Any) -> Any:
        """Run one agent command and return its ``return`` value."""
        request: dict[str, Any] = {"execute": name}
        if args:
            request["arguments"] = args
        self._send(json.dumps(request).encode() + b"\n", timeout)
        reply = self._read_reply(time.monotonic() + timeout, name)
        if "error" in reply:
            error = reply["error"]
            raise GuestAgentError(
                f"guest agent refused {name}: {error.get('class')}: {error.get('desc')}"
            )
        if "return" not in reply:
            raise GuestAgentError(f"guest agent sent an unexpected reply to {name}: {reply}")
        return reply["return"]

    # -- commands ------------------------------------------------------------------------

    def ping(self, *, timeout: float = SYNC_TIMEOUT) -> None:
        """Raise unless the agent answers ``guest-ping``."""
        self.cmd("guest-ping", timeout=timeout)

    def fsfreeze_status(self, *, timeout: float = SYNC_TIMEOUT) -> str:
        """``"thawed"`` or ``"frozen"``."""
        return str(self.cmd("guest-fsfreeze-status", timeout=timeout))

    def fsfreeze_freeze(self, *, timeout: float = FREEZE_TIMEOUT) -> int:
        """Freeze every freezable filesystem of the guest; return how many were frozen."""
        return int(self.cmd("guest-fsfreeze-freeze", timeout=timeout))

    def fsfreeze_thaw(self, *, timeout: float = THAW_TIMEOUT) -> int:
        """Thaw the guest's filesystems; return how many were thawed (0 if none was frozen)."""
        return int(self.cmd("guest-fsfreeze-thaw", timeout=timeout))

    def exec(self, argv: list[str], *, capture: bool = True, timeout: float = 10.0) -> int:
        """Start ``argv`` in the guest (``guest-exec``); return its guest pid."""
        if not argv:
            raise GuestAgentError("guest-exec needs a command")
        result = self.cmd(
            "guest-exec", timeout=timeout, path=argv[0], arg=argv[1:], **{"capture-output": capture}
        )
        return int(result["pid"])

    def exec_status(self, pid: int, *, timeout: float = 10.0) -> dict[str, Any]:
        """``guest-exec-status`` of ``pid``: ``exited``, and once exited ``exitcode`` and
        base64 ``out-data`` / ``err-data``."""
        return dict(self.cmd("guest-exec-status", timeout=timeout, pid=pid))

    def run(self, argv: list[str], *, timeout: float = 60.0, poll_s: float = 0.2) -> ExecResult:
        """Run ``argv`` in the guest to its end (a drill's check command); raise on timeout."""
        pid = self.exec(argv)
        deadline = time.monotonic() + timeout
        while True:
            status = self.exec_status(pid)
            if status.get("exited"):
                return ExecResult(
                    int(status.get("exitcode", -1)),
                    base64.b64decode(status.get("out-data", "")),
                    base64.b64decode(status.get("err-data", "")),
                )
            if time.monotonic() > deadline:
                raise GuestAgentUnavailable(
                    f"{argv[0]} did not end in the guest within {timeout:g} s"
                )
            time.sleep(poll_s)

    # -- quiescing -----------------------------------------------------------------------

    def freeze(self, *, timeout: float = FREEZE_TIMEOUT) -> int:
        """Freeze the guest's filesystems within ``timeout``; return how many were frozen.

        On failure (the agent refused, or did not answer in time) a thaw is still sent, since
        the agent may complete the freeze later, and the error is raised.
        """
        try:
            return self.fsfreeze_freeze(timeout=timeout)
        except BaseException:
            self.thaw()
            raise

    def thaw(self) -> None:
        """Thaw the guest for sure: retried on fresh connections (:data:`THAW_ATTEMPTS`) until
        the agent reports *thawed*; :class:`GuestLeftFrozen` if it never does."""
        self._thaw_for_sure()

    @contextmanager
    def quiesce(self, *, freeze_timeout: float = FREEZE_TIMEOUT) -> Iterator[int]:
        """Freeze the guest's filesystems for the ``with`` body; yield how many are frozen.

        The freeze is bounded by ``freeze_timeout`` (see :meth:`freeze`). The thaw runs on
        **every** path out of the body, the body's errors included (see :meth:`thaw`).
        """
        count = self.freeze(timeout=freeze_timeout)
        try:
            yield count
        finally:
            self.thaw()

    def _thaw_for_sure(self) -> None:
        errors: list[str] = []
        for attempt in range(THAW_ATTEMPTS):
            try:
                agent = self if attempt == 0 else GuestAgent.connect(self.path)
                try:
                    agent.fsfreeze_thaw()
                    if agent.fsfreeze_status() == "thawed":
                        return
                    errors.append("the agent still reports frozen")
                finally:
                    if agent is not self:
                        agent.close()
            except HypervisorError as exc:
                errors.append(str(exc))
                if attempt == 0:
                    self.close()  # a timed-out reply may still arrive: never reuse this stream
        raise GuestLeftFrozen(f"could not thaw the guest through {self.path}: {'; '.join(errors)}")

    # -- plumbing ------------------------------------------------------------------------

    def _send(self, data: bytes, timeout: float) -> None:
        try:
            self._sock.settimeout(timeout)
            self._sock.sendall(data)
        except OSError as exc:
            raise GuestAgentUnavailable(f"guest agent socket {self.path}: {exc}") from exc

    def _fill(self, deadline: float, doing: str) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise GuestAgentUnavailable(f"the guest agent did not answer {doing} in time")
        try:
            self._sock.settimeout(remaining)
            chunk = self._sock.recv(65536)
        except TimeoutError as exc:
            raise GuestAgentUnavailable(f"the guest agent did not answer {doing} in time") from exc
        except OSError as exc:
            raise GuestAgentUnavailable(f"guest agent socket {self.path}: {exc}") from exc
        if not chunk:
            raise GuestAgentUnavailable(f"guest agent socket {self.path} closed during {doing}")
        self._buffer += chunk

    def _skip_to_delimiter(self, deadline: float) -> None:
        while b"\xff" not in self._buffer:
            self._buffer = b""
            self._fill(deadline, "guest-sync-delimited")
        self._buffer = self._buffer.split(b"\xff")[-1]

    def _read_reply(self, deadline: float, doing: str) -> dict[str, Any]:
        while True:
            line, sep, rest = self._buffer.partition(b"\n")
            if sep:
                self._buffer = rest
                if not line.strip():
                    continue
                try:
                    reply = json.loads(line)
                except ValueError as exc:
                    raise GuestAgentError(f"guest agent sent bad JSON: {line[:200]!r}") from exc
                if isinstance(reply, dict) and ("return" in reply or "error" in reply):
                    return reply
                continue  # events or noise
            self._fill(deadline, doing)

    def close(self) -> None:
        """Close the connection; idempotent."""
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> GuestAgent:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
