"""A small synchronous QMP session over a unix socket, on top of ``qemu.qmp``.

Contract:
- ``QmpSession.connect(path)`` negotiates capabilities or raises :class:`QmpError` saying which
  socket could not be reached.
- ``cmd(name, **args)`` returns the command's ``return`` value, or raises :class:`QmpError`
  carrying QEMU's error class and description; no foreign exception leaves this module.
- ``wait_event(name, match, timeout)`` returns the first event called ``name`` whose ``data``
  contains every key/value of ``match``; other events are kept for later waits, so waiting for
  one event never loses another.

Some hosts (Proxmox) allow one QMP client at a time, so callers connect, act, and close
(``with QmpSession.connect(path) as qmp: ...``) rather than holding the monitor.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from qemu.qmp import ExecuteError, QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from siterecovery.hypervisor.errors import QmpError


class QmpSession:
    """One open QMP connection. Use :meth:`connect`; close it (or use ``with``)."""

    def __init__(
        self, path: Path, monitor: QEMUMonitorProtocol, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.path = path
        self._monitor = monitor
        self._loop = loop
        self._pending: list[dict[str, Any]] = []

    @classmethod
    def connect(cls, path: Path | str, *, timeout: float = 10.0) -> QmpSession:
        """Connect to the QMP socket at ``path`` and negotiate capabilities."""
        path = Path(path)
        if not path.exists():
            raise QmpError(
                f"QMP socket {path} does not exist",
                hint="is the VM running, and was it started with -qmp unix:PATH,server=on?",
            )
        # Each session runs on an event loop of its own, closed with it: the qemu.qmp shim
        # would otherwise leave one open loop behind in every thread that ever connected.
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        monitor = QEMUMonitorProtocol(str(path))
        try:
            monitor.settimeout(timeout)
            monitor.connect()
        except (QMPError, OSError) as exc:
            _close(monitor, loop)
            raise QmpError(f"cannot connect to QMP socket {path}: {exc}") from exc
        return cls(path, monitor, loop)

    def cmd(self, name: str, /, **args: Any) -> Any:
        """Run one QMP command and return its result; raise :class:`QmpError` on failure."""
        try:
            return self._monitor.cmd(name, **args)
        except ExecuteError as exc:
            raise QmpError(f"QMP {name} failed: {exc}", hint=_hint_for(name)) from exc
        except (QMPError, OSError) as exc:
            gone = f"the monitor at {self.path} went away ({exc})"
            raise QmpError(f"QMP {name} failed: {gone}") from exc

    def try_cmd(self, name: str, /, **args: Any) -> Any | None:
        """Like :meth:`cmd` but return None when QEMU refuses; used only in cleanup paths."""
        try:
            return self.cmd(name, **args)
        except QmpError:
            return None

    def wait_event(
        self, name: str, match: Mapping[str, Any] | None = None, *, timeout: float = 30.0
    ) -> dict[str, Any]:
        """Wait for event ``name`` whose data matches ``match``; keep other events."""
        match = match or {}
        found = self._take_pending(name, match)
        deadline = time.monotonic() + timeout
        while found is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QmpError(f"timed out after {timeout:.0f}s waiting for QMP event {name}")
            try:
                event = self._monitor.pull_event(wait=remaining)
            except (QMPError, OSError) as exc:
                raise QmpError(f"QMP monitor at {self.path} went away: {exc}") from exc
            if event is None:
                continue
            if _matches(event, name, match):
                found = dict(event)
            else:
                self._pending.append(dict(event))
        return found

    def _take_pending(self, name: str, match: Mapping[str, Any]) -> dict[str, Any] | None:
        for i, event in enumerate(self._pending):
            if _matches(event, name, match):
                return self._pending.pop(i)
        return None

    def close(self) -> None:
        """Close the connection and its event loop; idempotent."""
        if not self._loop.is_closed():
            _close(self._monitor, self._loop)

    def __enter__(self) -> QmpSession:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _close(monitor: QEMUMonitorProtocol, loop: asyncio.AbstractEventLoop) -> None:
    """Disconnect ``monitor``, then close its loop (and forget it if it is the thread's)."""
    with contextlib.suppress(QMPError, OSError):
        monitor.close()
    # A transport closes its socket in a callback of the next loop iteration: run them.
    with contextlib.suppress(RuntimeError):
        for _ in range(3):
            loop.run_until_complete(asyncio.sleep(0))
    with contextlib.suppress(RuntimeError):  # no current loop in this thread
        if asyncio.get_event_loop_policy().get_event_loop() is loop:
            asyncio.set_event_loop(None)
    loop.close()


def _matches(event: Mapping[str, Any], name: str, match: Mapping[str, Any]) -> bool:
    data = event.get("data", {})
    return bool(event.get("event") == name and all(data.get(k) == v for k, v in match.items()))


def _hint_for(name: str) -> str:
    if name.startswith("block-dirty-bitmap"):
        return "the disk's change tracking state is not what siterecovery expects; resync the VM"
    return "see the QEMU error above; the VM may not support this operation"
