"""The tiny demo guest: the host's Debian kernel with a busybox initramfs built in Python.

The guest exists so tests and ``siterecovery demo`` can run the whole DR loop on a real VM that
boots in seconds under TCG and writes data the host can check byte for byte.

Initramfs layout (newc cpio, gzip)::

    /init                     the shell script below (INIT_SCRIPT)
    /bin/busybox              static busybox copied from the host
    /bin/<applet> -> busybox  one symlink per applet of that busybox
    /lib/modules/<name>.ko    the virtio modules, decompressed, loaded in VIRTIO_MODULES order
    /dev/console              character device 5:1, so the kernel can give /init a console
    /proc /sys /tmp           empty mount points

Kernel command line (see :func:`guest_cmdline`): ``sr.mode=`` selects what ``/init`` does:

``idle``
    boot and wait (the default).
``writer``
    write **records** to the data disk (``sr.disk``, default ``vdb``): record ``i`` is 64 KiB at
    offset ``i * 64 KiB``, exactly :func:`expected_record` ``(sr.seed, i)``; after each record
    is flushed to the virtual disk the console shows ``SR-WROTE <i> <sha256>``. Each cycle also
    writes a 512-byte marker line ``SRMARK <seed> <i>`` to the system disk (``sr.marker``,
    default ``vda``; ``none`` to skip) at offset ``1 MiB + (i % 64) * 512``, so both disks
    change every cycle. ``sr.count=N`` stops after N records (then ``SR-WRITER-DONE <N>`` and
    idle), ``sr.interval_ms`` (default 200) is the pause between records, ``sr.start`` (default
    0) the first record index.
``verify``
    read record slots from 0 until the first slot without a valid header (or ``sr.count``),
    print ``SR-HAVE <i> <sha256>`` for each, then ``SR-VERIFY-DONE <n>`` and power off
    (``sr.stay=1``: keep running, as a recovered VM does until its failover is committed).

``linked``
    write **linked records** across two data disks: record ``i`` (exactly
    :func:`expected_record` ``(sr.seed, i)``) at slot ``i`` of ``sr.disk`` (default ``vdb``),
    flushed, then its **partner** (the same 64 KiB) at slot ``i`` of ``sr.partner`` (default
    ``vdc``), flushed; then ``SR-LINKED <i>``. At every instant the partner disk holds records
    ``0..k-1`` and the first disk ``0..k-1`` or ``0..k``: a copy of both disks taken at one
    instant never shows a partner without its record. ``sr.count``, ``sr.interval_ms`` and
    ``sr.start`` as for ``writer``; ``SR-WRITER-DONE <N>`` at the end.

Every mode prints ``SR-BOOTED`` once the modules are loaded and the disks it needs are present;
failures print ``SR-ERROR <text>``.

**Agent variant** (``build_guest(..., agent=True)``): the initramfs also holds
``/usr/sbin/qemu-ga`` with the shared libraries ``ldd`` lists (at the same paths), and the
modules of :data:`AGENT_MODULES` (``virtio_console`` for the agent's port; ``ext4`` and its
dependencies so that ``guest-fsfreeze-freeze`` has a real filesystem to freeze). Before the
mode runs, ``/init`` mounts ``/dev/<sr.fs>`` (ext2/3/4, made by the host, e.g. with
:func:`make_ext4_disk`) on ``/mnt`` when ``sr.fs`` is given, links the ``org.qemu.guest_agent.0``
port to ``/dev/virtio-ports/`` and starts ``qemu-ga`` (log ``/tmp/qga.log``); it prints
``SR-AGENT-STARTED`` (or ``SR-ERROR``) and ``SR-FS-MOUNTED <dev>``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import re
import stat
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from siterecovery.errors import InputError, NotFoundError
from siterecovery.fsutil import CHILD_UMASK, private_dir, write_private
from siterecovery.hypervisor.errors import ProcessError

RECORD_SIZE = 64 * 1024
HEADER_SIZE = 64
#: Offset on the system disk of marker slot 0; there are MARKER_SLOTS slots of 512 bytes.
MARKER_OFFSET = 1024 * 1024
MARKER_SLOTS = 64
VIRTIO_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
)
#: Loaded after VIRTIO_MODULES by the agent variant, in this order (dependencies first).
AGENT_MODULES = ("virtio_console", "crc16", "crc32c_generic", "mbcache", "jbd2", "ext4")
QEMU_GA = Path("/usr/sbin/qemu-ga")
MODES = ("idle", "writer", "verify", "linked")
#: Bumped whenever the initramfs layout changes in a way the input hash cannot see.
_LAYOUT_VERSION = "2"
_PARAM_KEY_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_PARAM_VALUE_RE = re.compile(r"^[A-Za-z0-9._:/-]{1,128}$")

INIT_SCRIPT = r"""#!/bin/sh
# siterecovery demo guest init; contract in siterecovery/hypervisor/guest.py
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo 1 > /proc/sys/kernel/printk

fail() { echo "SR-ERROR $*"; poweroff -f; sleep 3600; }
idle() { while true; do sleep 3600; done; }

SR_mode=idle SR_seed=1 SR_interval_ms=200 SR_count= SR_start=0 SR_disk=vdb SR_marker=vda
SR_partner=vdc SR_fs= SR_stay=
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    sr.*=*)
      key=${arg%%=*}; key=${key#sr.}
      case "$key" in *[!a-z0-9_]*) continue ;; esac
      eval "SR_$key=\${arg#*=}"
      ;;
  esac
done

for m in @MODULES@; do
  insmod "/lib/modules/$m.ko" || fail "insmod $m"
done

start_agent() {  # qemu-ga on the org.qemu.guest_agent.0 port, if this initramfs has it
  [ -x /usr/sbin/qemu-ga ] || return 0
  n=0
  port=
  while [ -z "$port" ]; do
    for p in /sys/class/virtio-ports/*; do
      [ "$(cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=${p##*/}
    done
    [ -n "$port" ] && [ -c "/dev/$port" ] && break
    port=
    n=$((n + 1)); [ $n -gt 100 ] && { echo "SR-ERROR no guest agent port"; return 0; }
    usleep 50000
  done
  mkdir -p /dev/virtio-ports /var/run /tmp/qga
  ln -sf "/dev/$port" /dev/virtio-ports/org.qemu.guest_agent.0
  LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu \
    /usr/sbin/qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 \
    -t /tmp/qga -l /tmp/qga.log &
  echo SR-AGENT-STARTED
}

mount_fs() {  # the filesystem qemu-ga freezes
  [ -n "$SR_fs" ] || return 0
  wait_disk "$SR_fs"
  mkdir -p /mnt
  mount -t ext4 "/dev/$SR_fs" /mnt || fail "mount /dev/$SR_fs"
  echo "SR-FS-MOUNTED $SR_fs"
}

wait_disk() {
  n=0
  while [ ! -b "/dev/$1" ]; do
    n=$((n + 1)); [ $n -gt 200 ] && fail "no disk /dev/$1"
    usleep 50000
  done
}

record() {  # record $1 into /tmp/rec: 64-byte header line, then "seed-i" lines
  { printf '%-63s\n' "SRREC $SR_seed $1"; yes "$SR_seed-$1" | head -c 65472; } > /tmp/rec
}

writer() {
  wait_disk "$SR_disk"
  [ "$SR_marker" = none ] || wait_disk "$SR_marker"
  echo SR-BOOTED
  i=$SR_start
  while [ -z "$SR_count" ] || [ $i -lt $((SR_start + SR_count)) ]; do
    if [ "$SR_marker" != none ]; then
      printf '%-511s\n' "SRMARK $SR_seed $i" > /tmp/mark
      dd if=/tmp/mark of="/dev/$SR_marker" bs=512 seek=$((2048 + i % 64)) count=1 \
        conv=notrunc,fsync 2>/dev/null || fail "marker $i"
    fi
    record $i
    dd if=/tmp/rec of="/dev/$SR_disk" bs=65536 seek=$i count=1 conv=notrunc,fsync \
      2>/dev/null || fail "write $i"
    echo "SR-WROTE $i $(sha256sum /tmp/rec | cut -d' ' -f1)"
    i=$((i + 1))
    usleep $((SR_interval_ms * 1000))
  done
  echo "SR-WRITER-DONE $((i - SR_start))"
  idle
}

verify() {
  wait_disk "$SR_disk"
  echo SR-BOOTED
  i=0
  while [ -z "$SR_count" ] || [ $i -lt "$SR_count" ]; do
    dd if="/dev/$SR_disk" of=/tmp/rec bs=65536 skip=$i count=1 2>/dev/null || break
    set -- $(head -c 63 /tmp/rec | tr -c 'A-Z0-9 ' ' ')
    [ "$1" = SRREC ] && [ "$3" = "$i" ] && [ $# -eq 3 ] || break
    [ "$(wc -c < /tmp/rec)" -eq 65536 ] || break
    echo "SR-HAVE $i $(sha256sum /tmp/rec | cut -d' ' -f1)"
    i=$((i + 1))
  done
  echo "SR-VERIFY-DONE $i"
  sync
  [ "$SR_stay" = 1 ] && idle
  poweroff -f
  idle
}

linked() {
  wait_disk "$SR_disk"
  wait_disk "$SR_partner"
  echo SR-BOOTED
  i=$SR_start
  while [ -z "$SR_count" ] || [ $i -lt $((SR_start + SR_count)) ]; do
    record $i
    dd if=/tmp/rec of="/dev/$SR_disk" bs=65536 seek=$i count=1 conv=notrunc,fsync \
      2>/dev/null || fail "write $i"
    dd if=/tmp/rec of="/dev/$SR_partner" bs=65536 seek=$i count=1 conv=notrunc,fsync \
      2>/dev/null || fail "partner $i"
    echo "SR-LINKED $i"
    i=$((i + 1))
    [ "$SR_interval_ms" -gt 0 ] && usleep $((SR_interval_ms * 1000))
  done
  echo "SR-WRITER-DONE $((i - SR_start))"
  idle
}

mount_fs
start_agent

case "$SR_mode" in
  linked) linked ;;
  writer) writer ;;
  verify) verify ;;
  idle) echo SR-BOOTED; idle ;;
  *) fail "unknown mode $SR_mode" ;;
esac
"""


@dataclass(frozen=True)
class GuestImage:
    """A bootable demo guest: pass ``kernel`` and ``initrd`` to QEMU's -kernel / -initrd."""

    kernel: Path
    initrd: Path


@dataclass
class ConsoleLog:
    """What the guest reported on its console (see the module docstring for the lines)."""

    booted: bool = False
    wrote: dict[int, str] = field(default_factory=dict)
    linked: set[int] = field(default_factory=set)
    have: dict[int, str] = field(default_factory=dict)
    verify_done: int | None = None
    writer_done: int | None = None
    errors: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Host-side view of the guest's data


def expected_record(seed: int, i: int) -> bytes:
    """The exact 64 KiB the writer guest stores at record slot ``i`` for ``seed``."""
    if seed < 0 or i < 0:
        raise InputError(f"seed and record index must be non-negative, got {seed}, {i}")
    header = f"SRREC {seed} {i}".ljust(HEADER_SIZE - 1).encode() + b"\n"
    line = f"{seed}-{i}\n".encode()
    body_size = RECORD_SIZE - HEADER_SIZE
    body = (line * (body_size // len(line) + 1))[:body_size]
    return header + body


def expected_marker(seed: int, i: int) -> bytes:
    """The 512-byte marker the writer stores on the system disk for record ``i``."""
    return f"SRMARK {seed} {i}".ljust(511).encode() + b"\n"


def marker_offset(i: int) -> int:
    """Byte offset on the system disk of record ``i``'s marker."""
    return MARKER_OFFSET + (i % MARKER_SLOTS) * 512


_CONSOLE_RE = re.compile(
    r"^(?P<tag>SR-BOOTED|SR-WROTE|SR-HAVE|SR-VERIFY-DONE|SR-WRITER-DONE|SR-ERROR|SR-LINKED)"
    r"(?: (?P<rest>.*?))?\s*$",
    re.MULTILINE,
)


def parse_console(text: str) -> ConsoleLog:
    """Collect the ``SR-*`` lines of a console log; other lines (kernel messages) are ignored."""
    log = ConsoleLog()
    for m in _CONSOLE_RE.finditer(text.replace("\r", "")):
        tag, rest = m["tag"], m["rest"] or ""
        if tag == "SR-BOOTED":
            log.booted = True
        elif tag in ("SR-WROTE", "SR-HAVE"):
            parts = rest.split()
            if len(parts) == 2 and parts[0].isdigit() and re.fullmatch(r"[0-9a-f]{64}", parts[1]):
                target = log.wrote if tag == "SR-WROTE" else log.have
                target[int(parts[0])] = parts[1]
        elif tag == "SR-LINKED" and rest.isdigit():
            log.linked.add(int(rest))
        elif tag == "SR-VERIFY-DONE" and rest.isdigit():
            log.verify_done = int(rest)
        elif tag == "SR-WRITER-DONE" and rest.isdigit():
            log.writer_done = int(rest)
        elif tag == "SR-ERROR":
            log.errors.append(rest)
    return log


def guest_cmdline(mode: str, /, **params: str | int) -> str:
    """The kernel command line for ``mode`` with ``sr.<key>=<value>`` for each parameter.

    Keys are lower-case identifiers; values are short tokens without spaces or quotes (the guest
    splits /proc/cmdline on whitespace). Raises InputError otherwise.
    """
    if mode not in MODES:
        raise InputError(f"unknown guest mode {mode!r}", hint=f"use one of {', '.join(MODES)}")
    parts = ["console=ttyS0", "quiet", "panic=-1", f"sr.mode={mode}"]
    for key, value in params.items():
        text = str(value)
        if not _PARAM_KEY_RE.match(key) or key == "mode":
            raise InputError(f"invalid guest parameter name {key!r}")
        if isinstance(value, bool) or not _PARAM_VALUE_RE.match(text):
            raise InputError(
                f"invalid value {text!r} for guest parameter {key!r}",
                hint="use letters, digits and . _ : / - only",
            )
        parts.append(f"sr.{key}={text}")
    return " ".join(parts)


def make_disk(path: Path, size: int, fmt: str = "qcow2", *, overwrite: bool = False) -> None:
    """Create an empty disk image of ``size`` bytes with ``qemu-img create``.

    Refuses to replace an existing file unless ``overwrite`` is set (a disk is data).
    """
    if fmt not in ("qcow2", "raw"):
        raise InputError(f"unsupported disk format {fmt!r}", hint="use qcow2 or raw")
    if size <= 0 or size % 512:
        raise InputError(f"disk size must be a positive multiple of 512 bytes, got {size}")
    if path.exists() and not overwrite:
        raise InputError(f"{path} already exists", hint="remove it or pick another path")
    if not path.parent.is_dir():
        raise InputError(f"directory {path.parent} does not exist")
    _run(["qemu-img", "create", "-q", "-f", fmt, str(path), str(size)])


def _run(argv: list[str]) -> str:
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=120, check=False, umask=CHILD_UMASK
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ProcessError(f"{argv[0]} failed: {exc}") from exc
    if done.returncode != 0:
        raise ProcessError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout


# ---------------------------------------------------------------------------------------------
# Building the initramfs


def build_guest(
    cache_dir: Path,
    *,
    boot_dir: Path = Path("/boot"),
    modules_root: Path = Path("/lib/modules"),
    busybox: Path = Path("/bin/busybox"),
    agent: bool = False,
    qemu_ga: Path = QEMU_GA,
) -> GuestImage:
    """Return the demo guest, building its initramfs into ``cache_dir`` when needed.

    The initramfs file is named by a hash of everything that goes into it (kernel version,
    module and busybox bytes, init script, and for the ``agent`` variant qemu-ga and its
    libraries), so it is rebuilt exactly when an input changes; it is written to a temporary
    file, fsynced and renamed, so a reader never sees a partial file. Raises NotFoundError when
    no usable kernel, module, busybox (or, with ``agent``, qemu-ga) is installed.
    """
    kernel, version = find_kernel(boot_dir, modules_root)
    names = VIRTIO_MODULES + (AGENT_MODULES if agent else ())
    modules = _load_modules(modules_root / version, names)
    if not busybox.is_file():
        raise NotFoundError(f"no busybox at {busybox}", hint="install busybox-static")
    bb = busybox.read_bytes()
    applets = _applets(busybox)
    extra = _agent_files(qemu_ga) if agent else {}
    init = INIT_SCRIPT.replace("@MODULES@", " ".join(modules))
    digest = _inputs_digest(version, {**modules, **extra}, bb, applets, init)
    suffix = "-agent" if agent else ""
    initrd = cache_dir / f"sr-guest{suffix}-{digest[:20]}.initrd.gz"
    if not initrd.exists():
        private_dir(cache_dir)
        write_private(initrd, _initramfs(init, bb, applets, modules, extra))
    return GuestImage(kernel=kernel, initrd=initrd)


def _agent_files(qemu_ga: Path) -> dict[str, bytes]:
    """qemu-ga and every shared library ``ldd`` resolves for it, keyed by initramfs path."""
    if not qemu_ga.is_file():
        raise NotFoundError(f"no guest agent at {qemu_ga}", hint="install qemu-guest-agent")
    files = {str(qemu_ga).lstrip("/"): qemu_ga.read_bytes()}
    for line in _run(["ldd", str(qemu_ga)]).splitlines():
        match = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if match:
            lib = Path(match.group(1))
            files[str(lib).lstrip("/")] = lib.read_bytes()  # through symlinks: the real bytes
        elif "not found" in line:
            raise NotFoundError(f"qemu-ga needs a library that is missing: {line.strip()}")
    return files


def make_ext4_disk(path: Path, size: int, *, files: Mapping[str, bytes] | None = None) -> None:
    """Create a qcow2 image of ``size`` bytes holding a fresh ext4 filesystem (``mkfs.ext4``).

    ``files`` are written into its root directory (name -> bytes) with ``debugfs``. The
    filesystem has no metadata checksums, so the guest needs no crc32c module for them.
    """
    if path.exists():
        raise InputError(f"{path} already exists", hint="remove it or pick another path")
    raw = path.with_name(path.name + ".raw")
    try:
        make_disk(raw, size, "raw", overwrite=True)
        _run(["mkfs.ext4", "-q", "-F", "-O", "^metadata_csum", "-L", "srdata", str(raw)])
        for name, data in (files or {}).items():
            src = path.with_name(f".{name}.src")
            write_private(src, data)
            try:
                _run(["debugfs", "-w", "-R", f"write {src} {name}", str(raw)])
            finally:
                src.unlink(missing_ok=True)
        _run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path)])
    finally:
        raw.unlink(missing_ok=True)


def find_kernel(boot_dir: Path, modules_root: Path) -> tuple[Path, str]:
    """The newest ``vmlinuz-*-amd64`` in ``boot_dir`` that has modules; returns (path, version)."""
    candidates = []
    for path in boot_dir.glob("vmlinuz-*-amd64"):
        version = path.name.removeprefix("vmlinuz-")
        if (modules_root / version).is_dir():
            candidates.append((_version_key(version), path, version))
    if not candidates:
        raise NotFoundError(
            f"no kernel vmlinuz-*-amd64 with modules under {boot_dir} and {modules_root}",
            hint="install the Debian package linux-image-amd64",
        )
    _, path, version = max(candidates)
    return path, version


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", version))


def _load_modules(mod_dir: Path, names: Iterable[str] = VIRTIO_MODULES) -> dict[str, bytes]:
    """The modules ``names`` as uncompressed .ko bytes, in load order; built-in ones are
    skipped."""
    names = tuple(names)
    builtin = _module_names(mod_dir / "modules.builtin")
    files = _module_files(mod_dir, names)
    modules: dict[str, bytes] = {}
    for name in names:
        if name in files:
            modules[name] = _decompress(files[name])
        elif name not in builtin:
            raise NotFoundError(
                f"kernel module {name} not found under {mod_dir}",
                hint="install the linux-image package matching the kernel",
            )
    return modules


def _module_names(listing: Path) -> set[str]:
    """Module names (file stem without .ko*) listed one per line in ``listing``."""
    if not listing.is_file():
        return set()
    lines = listing.read_text().splitlines()
    return {_module_name(Path(line.split(":", 1)[0])) for line in lines if line.strip()}


def _module_name(path: Path) -> str:
    return path.name.split(".ko", 1)[0].replace("-", "_")


def _module_files(mod_dir: Path, names: Iterable[str] = VIRTIO_MODULES) -> dict[str, Path]:
    """Map module name -> file, from modules.dep when present, else by walking kernel/."""
    dep = mod_dir / "modules.dep"
    if dep.is_file():
        rels = [line.split(":", 1)[0] for line in dep.read_text().splitlines() if ":" in line]
        paths: Iterable[Path] = (mod_dir / rel for rel in rels)
    else:
        paths = (mod_dir / "kernel").rglob("*.ko*")
    wanted = set(names)
    return {_module_name(p): p for p in paths if _module_name(p) in wanted and p.is_file()}


def _decompress(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.zst"):
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    return data


def _applets(busybox: Path) -> list[str]:
    """The applet names this busybox provides (``busybox --list``)."""
    out = _run([str(busybox), "--list"])
    return sorted({name for name in out.split() if re.fullmatch(r"[A-Za-z0-9_.\[\]-]+", name)})


def _inputs_digest(
    version: str, modules: Mapping[str, bytes], bb: bytes, applets: list[str], init: str
) -> str:
    h = hashlib.sha256()
    for part in (_LAYOUT_VERSION, version, init, " ".join(applets)):
        h.update(part.encode() + b"\0")
    h.update(hashlib.sha256(bb).digest())
    for name, data in modules.items():
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def _initramfs(
    init: str,
    bb: bytes,
    applets: list[str],
    modules: Mapping[str, bytes],
    extra: Mapping[str, bytes] | None = None,
) -> bytes:
    cpio = CpioWriter()
    dirs = {"bin", "dev", "lib", "lib/modules", "proc", "sys", "tmp", "mnt"}
    for name in extra or {}:
        parent = Path(name).parent
        while str(parent) != ".":
            dirs.add(str(parent))
            parent = parent.parent
    for d in sorted(dirs, key=lambda d: (d.count("/"), d)):
        cpio.directory(d)
    cpio.device("dev/console", major=5, minor=1)
    cpio.file("bin/busybox", bb, mode=0o755)
    for applet in applets:
        if applet != "busybox":
            cpio.symlink(f"bin/{applet}", "busybox")
    for name, data in modules.items():
        cpio.file(f"lib/modules/{name}.ko", data, mode=0o644)
    for name, data in (extra or {}).items():
        cpio.file(name, data, mode=0o755)
    cpio.file("init", init.encode(), mode=0o755)
    # mtime=0 keeps the output a pure function of its inputs.
    return gzip.compress(cpio.finish(), compresslevel=6, mtime=0)


class CpioWriter:
    """Writes the "new ASCII" (newc, magic 070701) cpio format the kernel unpacks.

    Each entry is a 110-byte ASCII header (magic + 13 eight-digit hex fields: ino, mode, uid,
    gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor, rdevminor, namesize incl. NUL,
    check), the NUL-terminated name padded to 4 bytes, then the data padded to 4 bytes. The
    archive ends with the entry ``TRAILER!!!``. Owners are root, mtimes 0.
    """

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._ino = 0

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode, b"", nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def device(self, name: str, *, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, b"", rdev=(major, minor))

    def finish(self) -> bytes:
        """Append the trailer and return the archive."""
        self._entry("TRAILER!!!", 0, b"", nlink=1, ino=0)
        return self._out.getvalue()

    def _entry(
        self,
        name: str,
        mode: int,
        data: bytes,
        *,
        nlink: int = 1,
        rdev: tuple[int, int] = (0, 0),
        ino: int | None = None,
    ) -> None:
        if ino is None:
            self._ino += 1
            ino = self._ino
        raw_name = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw_name), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._write_padded(header + raw_name)
        self._write_padded(data)

    def _write_padded(self, chunk: bytes) -> None:
        self._out.write(chunk)
        self._out.write(b"\0" * (-len(chunk) % 4))
