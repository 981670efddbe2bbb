"""Start and stop QEMU processes: VMs (``qemu-system-x86_64``) and ``qemu-storage-daemon``.

Every process started here has a QMP monitor on a unix socket, writes its stdout/stderr to a
log file next to it, and is registered so that it is killed when the Python process exits, even
if a caller forgets :meth:`stop`. Nothing here interprets guest data; QMP beyond ``quit`` is the
job of the QMP client module.

Files of a VM named ``NAME`` in ``workdir``::

    NAME.qmp          QMP monitor socket (one client at a time), unless the spec names
                      another path for it (``qmp``): then only the socket is there
    NAME.serial.log   the guest's first serial port, truncated at each start
    NAME.log          QEMU's own stdout and stderr
    NAME.pid          QEMU's pidfile
    NAME.qga          the guest agent's socket (only with ``guest_agent``): a virtio-serial
                      port named ``org.qemu.guest_agent.0`` in the guest

A storage daemon uses ``qsd.qmp``, ``nbd.sock``, ``qsd.log`` and ``qsd.pid`` in its workdir.
Children run with umask 077 (:data:`siterecovery.fsutil.CHILD_UMASK`): what QEMU creates is
private. Starting never deletes a file that is not a socket (a stale socket is replaced).

Block nodes of a :class:`DriveSpec` named ``D``: protocol node ``D-file``, format node ``D``;
in a VM its device has id ``D-dev`` (virtio-blk with serial ``D`` unless the drive's
:class:`~siterecovery.domain.DiskConfig` says otherwise: see ``devices.py``).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import re
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from siterecovery.domain import MAX_CPUS, DiskConfig, validate_name
from siterecovery.errors import InputError, NotFoundError
from siterecovery.fsutil import CHILD_UMASK, open_private
from siterecovery.hypervisor.devices import controller_args, device_args, node_options
from siterecovery.hypervisor.errors import ProcessError

QEMU_BINARY = "qemu-system-x86_64"
QSD_BINARY = "qemu-storage-daemon"
ACCELS = ("tcg", "kvm")
NIC_KINDS = ("user",)
ACCEL_ENV = "SITERECOVERY_ACCEL"
#: QEMU node names are at most 31 characters; "-file" is appended for the protocol node.
_NODE_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,25}$")
_MACHINE_RE = re.compile(r"^[a-z][a-z0-9._-]{0,63}$")
_CPU_MODEL_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]{0,63})?$")
#: sun_path holds 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
_LOG_TAIL = 2000


@dataclass(frozen=True)
class DriveSpec:
    """One disk image opened with -blockdev: nodes ``<name>-file`` (file) and ``<name>`` (fmt).

    ``disk`` is how the guest sees it (device model, serial, discard, cache); None: a
    virtio-blk disk with QEMU's default options.
    """

    name: str
    path: Path
    fmt: str = "qcow2"
    read_only: bool = False
    disk: DiskConfig | None = None

    def validate(self) -> None:
        """Raise InputError/NotFoundError unless the name, format and image file are usable."""
        if not _NODE_NAME_RE.match(self.name):
            raise InputError(
                f"invalid drive name {self.name!r}",
                hint="use 1-26 letters, digits, '.', '_' or '-', starting with a letter",
            )
        if self.fmt not in ("qcow2", "raw"):
            raise InputError(f"unsupported disk format {self.fmt!r}", hint="use qcow2 or raw")
        if not self.path.is_file():
            raise NotFoundError(f"disk image {self.path} does not exist")

    def blockdev_args(self, flag: str = "-blockdev") -> list[str]:
        """The two -blockdev options (JSON, so any path is safe) for this drive."""
        ro: dict[str, Any] = {"read-only": True} if self.read_only else {}
        ro.update(node_options(self.disk))
        file_node = {
            "driver": "file",
            "node-name": f"{self.name}-file",
            "filename": str(self.path),
            **ro,
        }
        fmt_node = {"driver": self.fmt, "node-name": self.name, "file": f"{self.name}-file", **ro}
        return [flag, json.dumps(file_node), flag, json.dumps(fmt_node)]


@dataclass
class VmProcessSpec:
    """What to start: a VM with its disks, optionally booting a kernel directly.

    ``accel`` is "tcg" or "kvm" (use :func:`probe_accel`); ``cpu_model`` "" means "host"
    under KVM and QEMU's default under TCG; ``boot_order`` "" is QEMU's default. ``nics``
    lists NIC kinds; only "user" (user-mode networking on virtio-net) exists so far. With
    ``no_reboot`` a guest reboot makes QEMU exit, which is what a test harness wants to see.
    ``guest_agent`` adds a virtio-serial controller and the ``org.qemu.guest_agent.0`` port
    on ``NAME.qga``, where :class:`~siterecovery.hypervisor.guestagent.GuestAgent` talks to
    qemu-ga in the guest. ``qmp`` puts the QMP socket elsewhere than ``workdir/NAME.qmp`` (a
    path the operator named); every other file stays in ``workdir``.
    """

    name: str
    workdir: Path
    drives: list[DriveSpec]
    memory_mib: int = 256
    cpus: int = 1
    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    accel: str = "tcg"
    nics: list[str] = field(default_factory=list)
    extra_args: list[str] = field(default_factory=list)
    machine: str = "q35"
    no_reboot: bool = True
    guest_agent: bool = False
    qmp: Path | None = None
    cpu_model: str = ""
    boot_order: str = ""

    @property
    def qmp_path(self) -> Path:
        """The QMP monitor socket."""
        return self.qmp if self.qmp is not None else self.workdir / f"{self.name}.qmp"

    @property
    def qga_path(self) -> Path:
        """The host side of the guest agent's port (meaningful with ``guest_agent``)."""
        return self.workdir / f"{self.name}.qga"

    def validate(self) -> None:
        """Raise InputError/NotFoundError for anything QEMU would reject or misread."""
        validate_name("VM", self.name)
        _require_dir(self.workdir)
        for drive in self.drives:
            drive.validate()
        names = [d.name for d in self.drives]
        if len(set(names)) != len(names):
            raise InputError(f"duplicate drive names in {names}")
        if self.accel not in ACCELS:
            raise InputError(f"unknown accelerator {self.accel!r}", hint="use tcg or kvm")
        if not _MACHINE_RE.match(self.machine) or not _CPU_MODEL_RE.match(self.cpu_model):
            raise InputError(
                f"bad machine type {self.machine!r} or CPU model {self.cpu_model!r}",
                hint="see `qemu-system-x86_64 -machine help` and `-cpu help`",
            )
        if not 16 <= self.memory_mib <= 1 << 24 or not 1 <= self.cpus <= MAX_CPUS:
            raise InputError(f"bad VM size: {self.memory_mib} MiB, {self.cpus} CPUs")
        for nic in self.nics:
            if nic not in NIC_KINDS:
                raise InputError(f"unknown NIC kind {nic!r}", hint="use 'user'")
        self._validate_boot()
        _check_socket_path(self.qmp_path)
        if self.guest_agent:
            _check_socket_path(self.qga_path)

    def _validate_boot(self) -> None:
        if self.kernel is None and (self.initrd is not None or self.append):
            raise InputError("initrd and append need a kernel", hint="set kernel as well")
        for path in (self.kernel, self.initrd):
            if path is not None and not path.is_file():
                raise NotFoundError(f"boot file {path} does not exist")


def qemu_argv(spec: VmProcessSpec) -> list[str]:
    """The full qemu-system-x86_64 command line for ``spec`` (not validated here)."""
    wd = spec.workdir
    argv = [QEMU_BINARY, *_BASE_OPTS, "-name", spec.name, "-pidfile", str(wd / f"{spec.name}.pid")]
    argv += _pairs(
        ("-machine", f"{spec.machine},accel={spec.accel}"),
        ("-m", str(spec.memory_mib)),
        ("-smp", str(spec.cpus)),
        ("-chardev", f"socket,id=qmp,path={_opt(spec.qmp_path)},server=on,wait=off"),
        ("-mon", "chardev=qmp,mode=control"),
        ("-chardev", f"file,id=serial0,path={_opt(wd / f'{spec.name}.serial.log')}"),
        ("-serial", "chardev:serial0"),
    )
    cpu = spec.cpu_model or ("host" if spec.accel == "kvm" else "")
    if cpu:
        argv += ["-cpu", cpu]
    if spec.boot_order:
        argv += ["-boot", f"order={spec.boot_order}"]
    if spec.no_reboot:
        argv.append("-no-reboot")
    if spec.kernel is not None:
        argv += ["-kernel", str(spec.kernel)]
    if spec.initrd is not None:
        argv += ["-initrd", str(spec.initrd)]
    if spec.append:
        argv += ["-append", spec.append]
    argv += controller_args([drive.disk for drive in spec.drives])
    for drive in spec.drives:
        argv += drive.blockdev_args() + device_args(drive.name, drive.disk)
    for n, _kind in enumerate(spec.nics):
        argv += ["-netdev", f"user,id=net{n}", "-device", f"virtio-net-pci,netdev=net{n}"]
    if spec.guest_agent:
        argv += _guest_agent_args(spec.qga_path)
    return argv + list(spec.extra_args)


def _guest_agent_args(path: Path) -> list[str]:
    """virtio-serial with qemu-ga's well-known port, its host side a unix socket server."""
    return _pairs(
        ("-device", "virtio-serial-pci,id=sr-vser0"),
        ("-chardev", f"socket,id=sr-qga0,path={_opt(path)},server=on,wait=off"),
        ("-device", "virtserialport,bus=sr-vser0.0,chardev=sr-qga0,name=org.qemu.guest_agent.0"),
    )


_BASE_OPTS = ("-nodefaults", "-no-user-config", "-display", "none")


def _pairs(*options: tuple[str, str]) -> list[str]:
    """Flatten (option, value) pairs into argv words."""
    return [word for pair in options for word in pair]


def _opt(path: Path) -> str:
    """A path as a QemuOpts value: commas are doubled."""
    return str(path).replace(",", ",,")


def _require_dir(path: Path) -> None:
    if not path.is_dir():
        raise InputError(f"work directory {path} does not exist", hint="create it first")


def _check_socket_path(path: Path) -> None:
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise InputError(
            f"socket path {path} is longer than {_MAX_SOCKET_PATH} bytes",
            hint="use a shorter work directory",
        )


# ---------------------------------------------------------------------------------------------
# Process lifecycle shared by VMs and storage daemons


class ManagedProcess:
    """A child QEMU process with a QMP socket and a log file.

    ``stop`` asks politely (QMP ``quit``), then sends SIGTERM, then SIGKILL; ``kill`` sends
    SIGKILL at once (a simulated crash). Both are idempotent and always reap the child.
    """

    _live: ClassVar[set[ManagedProcess]] = set()
    _live_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self, popen: subprocess.Popen[bytes], *, label: str, qmp_path: Path, log_path: Path
    ) -> None:
        self._popen = popen
        self.label = label
        self.qmp_path = qmp_path
        self.log_path = log_path
        with self._live_lock:
            self._live.add(self)

    @property
    def pid(self) -> int:
        """The process id of the QEMU child."""
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has ended (negative: killed by that signal)."""
        return self._popen.poll()

    def alive(self) -> bool:
        """True while the process has not exited."""
        return self._popen.poll() is None

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit on its own; return its status or raise ProcessError."""
        try:
            code = self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise ProcessError(
                f"{self.label} (pid {self.pid}) still running after {timeout:g} s"
            ) from None
        self._forget()
        return code

    def stop(self, timeout: float = 10) -> None:
        """End the process: QMP quit, then SIGTERM, then SIGKILL, within about ``timeout``.

        QMP quit and SIGTERM are both clean shutdowns (images closed, persistent bitmaps
        stored); SIGTERM is sent at once when the monitor cannot be reached (QEMU serves one
        QMP client at a time, so another client may hold it).
        """
        if self.alive():
            try:
                qmp_execute(self.qmp_path, "quit", timeout=min(2.0, timeout / 3))
                asked = True
            except ProcessError:
                asked = False
            if not (asked and self._reaped_within(timeout * 2 / 3)):
                self._signal(signal.SIGTERM)
                if not self._reaped_within(timeout / 3):
                    self.kill()
        self._reap()

    def kill(self) -> None:
        """SIGKILL the process (a simulated host crash) and reap it."""
        self._signal(signal.SIGKILL)
        self._reap()

    def log_text(self) -> str:
        """QEMU's own stdout/stderr so far."""
        return _read_text(self.log_path)

    def _signal(self, sig: signal.Signals) -> None:
        if self._popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._popen.send_signal(sig)

    def _reaped_within(self, timeout: float) -> bool:
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def _reap(self) -> None:
        if not self._reaped_within(10):
            raise ProcessError(f"{self.label} (pid {self.pid}) did not exit after SIGKILL")
        self._forget()

    def detach(self) -> None:
        """Let the process outlive this Python process (a failed-over VM keeps running).

        It is no longer killed at exit; stop it later through its QMP socket or pidfile.
        """
        self._forget()

    def _forget(self) -> None:
        with self._live_lock:
            self._live.discard(self)

    def _fail_start(self, why: str) -> ProcessError:
        """Kill the half-started process and build the error that names its log."""
        self.kill()
        return ProcessError(
            f"{self.label} {why}; log {self.log_path}:\n{_tail(self.log_text())}",
        )

    def _await_qmp(self, timeout: float) -> None:
        """Block until the QMP socket sends its greeting; kill the process and raise if not."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise self._fail_start(f"exited with status {self.returncode} while starting")
            if _qmp_greets(self.qmp_path):
                return
            if time.monotonic() > deadline:
                raise self._fail_start(f"did not open its QMP socket within {timeout:g} s")
            time.sleep(0.05)

    @classmethod
    def _kill_all(cls) -> None:
        """atexit hook: no QEMU outlives the Python process that started it."""
        for proc in list(cls._live):
            with contextlib.suppress(Exception):
                proc.kill()


atexit.register(ManagedProcess._kill_all)


def live_processes() -> list[ManagedProcess]:
    """Processes started here that have not been stopped, killed or waited for yet."""
    with ManagedProcess._live_lock:
        return list(ManagedProcess._live)


def _spawn(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session, umask 077, output to ``log_path`` (ours, 0600)."""
    log = open_private(log_path)
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            close_fds=True,
            start_new_session=True,  # a Ctrl-C aimed at the CLI must not kill the VM
            umask=CHILD_UMASK,
        )
    except OSError as exc:
        raise ProcessError(
            f"cannot run {argv[0]}: {exc}", hint="install qemu-system-x86 and qemu-utils"
        ) from exc
    finally:
        os.close(log)


def check_socket_slot(path: Path) -> bool:
    """True if a socket is at ``path``, False if nothing is; InputError for anything else
    (a file there is never deleted to make room for a socket)."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(mode):
        raise InputError(
            f"{path} exists and is not a socket: it cannot be the QMP socket",
            hint="move that file away, or give the VM another QMP socket path",
        )
    return True


def _claim_socket(path: Path) -> None:
    """Remove a stale socket file; refuse if a live process still listens on it, or if the
    path holds anything but a socket (see :func:`check_socket_slot`)."""
    if not check_socket_slot(path):
        return
    if _qmp_greets(path):
        raise ProcessError(
            f"{path} is in use by a running process",
            hint="stop that process or use another name or work directory",
        )
    path.unlink()


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def _tail(text: str) -> str:
    return text[-_LOG_TAIL:] if text else "(empty)"


# ---------------------------------------------------------------------------------------------
# VMs


class QemuProcess(ManagedProcess):
    """A running VM started from a :class:`VmProcessSpec`."""

    def __init__(self, popen: subprocess.Popen[bytes], spec: VmProcessSpec) -> None:
        wd = spec.workdir
        super().__init__(
            popen,
            label=f"VM {spec.name}",
            qmp_path=spec.qmp_path,
            log_path=wd / f"{spec.name}.log",
        )
        self.spec = spec
        self.serial_path = wd / f"{spec.name}.serial.log"

    @classmethod
    def start(cls, spec: VmProcessSpec, *, timeout: float = 30) -> QemuProcess:
        """Start the VM and return once its QMP socket answers.

        Raises InputError/NotFoundError for a bad spec (nothing started), ProcessError when
        QEMU exits or stays silent (the process is killed; the message holds its log tail).
        """
        spec.validate()
        _claim_socket(spec.qmp_path)
        popen = _spawn(qemu_argv(spec), spec.workdir / f"{spec.name}.log")
        proc = cls(popen, spec)
        proc._await_qmp(timeout)
        return proc

    def serial_text(self) -> str:
        """The guest's serial console output so far, with CRLF turned into LF."""
        return _read_text(self.serial_path).replace("\r\n", "\n")

    def wait_serial(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        """Poll the serial console until ``pattern`` (searched, MULTILINE for str) matches.

        Raises ProcessError with the console tail on timeout or when the VM exits first.
        """
        regex = re.compile(pattern, re.MULTILINE) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            exited = not self.alive()
            text = self.serial_text()
            match = regex.search(text)
            if match:
                return match
            if exited:
                why = f"exited with status {self.returncode}"
            elif time.monotonic() > deadline:
                why = f"did not print it within {timeout:g} s"
            else:
                time.sleep(0.1)
                continue
            raise ProcessError(
                f"{self.label} console never matched {regex.pattern!r}: {why}; "
                f"console {self.serial_path} ends with:\n{_tail(text)}",
            )


# ---------------------------------------------------------------------------------------------
# qemu-storage-daemon


class StorageDaemon(ManagedProcess):
    """qemu-storage-daemon over offline images, with a QMP monitor and an (empty) NBD server."""

    def __init__(
        self, popen: subprocess.Popen[bytes], workdir: Path, drives: list[DriveSpec]
    ) -> None:
        super().__init__(
            popen,
            label="qemu-storage-daemon",
            qmp_path=workdir / "qsd.qmp",
            log_path=workdir / "qsd.log",
        )
        self.workdir = workdir
        self.drives = list(drives)
        self.nbd_path = workdir / "nbd.sock"

    @classmethod
    def start(cls, workdir: Path, drives: list[DriveSpec], *, timeout: float = 10) -> StorageDaemon:
        """Start the daemon; no NBD export exists until one is added over QMP."""
        _require_dir(workdir)
        for drive in drives:
            drive.validate()
        _check_socket_path(workdir / "qsd.qmp")
        _check_socket_path(workdir / "nbd.sock")
        _claim_socket(workdir / "qsd.qmp")
        with contextlib.suppress(FileNotFoundError):
            (workdir / "nbd.sock").unlink()
        popen = _spawn(qsd_argv(workdir, drives), workdir / "qsd.log")
        proc = cls(popen, workdir, drives)
        proc._await_qmp(timeout)
        return proc


def qsd_argv(workdir: Path, drives: list[DriveSpec]) -> list[str]:
    """The qemu-storage-daemon command line; the monitor comes last so that, once QMP answers,
    every block node and the NBD server already exist."""
    argv = [QSD_BINARY]
    for drive in drives:
        argv += drive.blockdev_args("--blockdev")
    return argv + _pairs(
        ("--nbd-server", f"addr.type=unix,addr.path={_opt(workdir / 'nbd.sock')}"),
        ("--pidfile", str(workdir / "qsd.pid")),
        ("--chardev", f"socket,id=qmp,path={_opt(workdir / 'qsd.qmp')},server=on,wait=off"),
        ("--monitor", "chardev=qmp"),
    )


# ---------------------------------------------------------------------------------------------
# Minimal QMP: enough to see that a monitor is up and to say quit


def _qmp_greets(path: Path) -> bool:
    """True if a QMP server at ``path`` accepts a connection and sends its greeting."""
    try:
        with _connect(path, timeout=1.0) as sock:
            return b'"QMP"' in _read_message(sock.makefile("rb"))
    except (OSError, ProcessError):
        return False


def qmp_execute(
    path: Path, command: str, arguments: dict[str, Any] | None = None, *, timeout: float = 5.0
) -> Any:
    """Run one QMP command on a fresh connection and return its ``return`` value.

    A deliberately tiny client (greeting, capabilities, one command) for process control;
    for ``quit`` a connection closed before the answer counts as success. Raises ProcessError
    when the monitor cannot be reached or answers with an error.
    """
    try:
        with _connect(path, timeout) as sock:
            stream = sock.makefile("rb")
            _read_message(stream)
            _exchange(sock, stream, {"execute": "qmp_capabilities"})
            request: dict[str, Any] = {"execute": command}
            if arguments:
                request["arguments"] = arguments
            try:
                return _exchange(sock, stream, request)
            except _QmpClosed:
                if command == "quit":
                    return {}  # QEMU may close the monitor before its answer is sent
                raise
    except OSError as exc:
        raise ProcessError(f"QMP {command} on {path} failed: {exc}") from exc


def _connect(path: Path, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        raise
    return sock


def _exchange(sock: socket.socket, stream: Any, request: dict[str, Any]) -> Any:
    sock.sendall(json.dumps(request).encode() + b"\n")
    while True:
        reply = json.loads(_read_message(stream))
        if "return" in reply:
            return reply["return"]
        if "error" in reply:
            raise ProcessError(f"QMP {request['execute']} failed: {reply['error']}")
        # anything else is an asynchronous event: skip it


class _QmpClosed(ProcessError):
    """The monitor closed the connection."""


def _read_message(stream: Any) -> bytes:
    line: bytes = stream.readline()
    if not line:
        raise _QmpClosed("QMP connection closed")
    return line


# ---------------------------------------------------------------------------------------------
# Accelerator probe

#: A 64 KiB firmware for the pc machine that goes from real mode through protected mode into
#: long mode (identity-mapped 2 MiB page at 0) and then writes 0x2a to an isa-debug-exit device
#: at port 0xf4, so QEMU exits with status (0x2a << 1) | 1 = 85. Where KVM "works" but real
#: guests hang, they hang at the switch to protected mode; this catches that. Assembled from:
#:   cli; xor ax,ax; mov ds,ax; lgdtl cs:gdt_desc; cr0 |= PE; ljmpl 0x08:start32
#:   start32: ds=es=ss=0x10; PML4[0]@0x1000 -> PDPT@0x2000 -> PD@0x3000, PD[0] = 0x83;
#:            cr4 |= PAE; cr3 = 0x1000; EFER |= LME; cr0 |= PG; ljmp 0x18:start64
#:   start64: mov al,0x2a; out 0xf4,al; hlt
#:   gdt: null, code32 0x00CF9A000000FFFF, data 0x00CF92000000FFFF, code64 0x00AF9A000000FFFF
#:   reset vector (offset 0xFFF0): ljmp 0xF000:0
_PROBE_CODE = bytes.fromhex(
    "fa31c08ed82e660f0116c0000f20c06683c8010f22c066ea1e000f00080066b810008ed88ec08ed0c705"
    "0010000003200000c7050410000000000000c7050020000003300000c7050420000000000000c7050030"
    "000083000000c70504300000000000000f20e083c8200f22e0b8001000000f22d8b9800000c00f320d00"
    "0100000f300f20c00d000000800f22c0ea95000f001800b02ae6f4f4ebfd8db400000000000000000000"
    "ffff0000009acf00ffff00000092cf00ffff0000009aaf001f00a0000f00"
)
_PROBE_RESET = bytes.fromhex("ea000000f0")
_PROBE_OK = (0x2A << 1) | 1


def probe_firmware() -> bytes:
    """The 64 KiB probe firmware image (see ``_PROBE_CODE``)."""
    image = _PROBE_CODE.ljust(0xFFF0, b"\0") + _PROBE_RESET
    return image.ljust(0x10000, b"\0")


def accel_works(accel: str, timeout: float = 5.0) -> bool:
    """Run the probe firmware under ``accel``; True only if it reached long mode in time."""
    if accel not in ACCELS:
        raise InputError(f"unknown accelerator {accel!r}", hint="use tcg or kvm")
    with tempfile.TemporaryDirectory(prefix="sr-probe-") as tmp:
        bios = Path(tmp) / "probe.bin"
        bios.write_bytes(probe_firmware())
        argv = [QEMU_BINARY, *_BASE_OPTS, "-m", "16", "-bios", str(bios)]
        argv += _pairs(
            ("-machine", f"pc,accel={accel}"),
            ("-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"),
        )
        try:
            done = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return False  # subprocess.run kills and reaps the child on timeout
        except OSError:
            return False
        return done.returncode == _PROBE_OK


@functools.cache
def _probed_accel() -> str:
    kvm = Path("/dev/kvm")
    if kvm.exists() and os.access(kvm, os.R_OK | os.W_OK) and accel_works("kvm"):
        return "kvm"
    return "tcg"


def probe_accel() -> str:
    """The accelerator to use here: $SITERECOVERY_ACCEL if set, else "kvm" when /dev/kvm is
    usable and the probe firmware reaches long mode under it within 5 s, else "tcg".

    The probe runs at most once per Python process.
    """
    forced = os.environ.get(ACCEL_ENV, "").strip()
    if forced:
        if forced not in ACCELS:
            raise InputError(f"{ACCEL_ENV}={forced!r} is not an accelerator", hint="use tcg or kvm")
        return forced
    return _probed_accel()
