"""The tiny demo guest: its host-side helpers, its initramfs, and real boots under TCG."""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from siterecovery.errors import InputError, NotFoundError
from siterecovery.hypervisor.guest import (
    RECORD_SIZE,
    VIRTIO_MODULES,
    CpioWriter,
    GuestImage,
    build_guest,
    expected_marker,
    expected_record,
    find_kernel,
    guest_cmdline,
    make_disk,
    marker_offset,
    parse_console,
)
from siterecovery.hypervisor.process import DriveSpec, QemuProcess, VmProcessSpec

BUSYBOX = Path("/bin/busybox")
needs_busybox = pytest.mark.skipif(not BUSYBOX.is_file(), reason="needs busybox-static")


# ---------------------------------------------------------------------------------------------
# Host-side helpers


def test_expected_record_layout() -> None:
    rec = expected_record(7, 3)
    assert len(rec) == RECORD_SIZE
    assert rec[:64] == b"SRREC 7 3".ljust(63) + b"\n"
    assert rec[64:] == b"7-3\n" * ((RECORD_SIZE - 64) // 4)
    assert expected_record(12, 345)[-6:] == b"-345\n1"  # the last line is cut mid-way
    assert expected_record(7, 3) == rec
    assert expected_record(7, 4) != rec
    assert expected_record(8, 3) != rec
    with pytest.raises(InputError):
        expected_record(-1, 0)


def test_expected_marker_and_its_offset() -> None:
    assert expected_marker(5, 9) == b"SRMARK 5 9".ljust(511) + b"\n"
    assert marker_offset(0) == 1 << 20
    assert marker_offset(65) == (1 << 20) + 512


def test_parse_console_keeps_sr_lines_and_ignores_noise() -> None:
    h0, h1 = "a" * 64, "b" * 64
    text = (
        "[    0.5] random: crng init done\r\n"
        "SR-BOOTED\r\n"
        f"SR-WROTE 0 {h0}\r\n"
        f"SR-WROTE 1 {h1}\r\n"
        "SR-WROTE 2 not-a-hash\r\n"
        f"SR-HAVE 0 {h0}\n"
        "SR-VERIFY-DONE 1\n"
        "SR-WRITER-DONE 2\n"
        "SR-ERROR no disk /dev/vdb\n"
    )
    log = parse_console(text)
    assert log.booted
    assert log.wrote == {0: h0, 1: h1}
    assert log.have == {0: h0}
    assert log.verify_done == 1
    assert log.writer_done == 2
    assert log.errors == ["no disk /dev/vdb"]
    empty = parse_console("SeaBIOS\n")
    assert (empty.booted, empty.wrote, empty.verify_done) == (False, {}, None)


def test_guest_cmdline() -> None:
    assert guest_cmdline("writer", count=5, seed=7) == (
        "console=ttyS0 quiet panic=-1 sr.mode=writer sr.count=5 sr.seed=7"
    )
    assert guest_cmdline("verify").endswith("sr.mode=verify")
    cases: list[tuple[str, dict[str, str | int]]] = [
        ("reader", {}),
        ("writer", {"count": "5 6"}),
        ("writer", {"Count": 5}),
        ("writer", {"seed": 'a"b'}),
        ("writer", {"mode": "idle"}),
        ("writer", {"count": True}),
    ]
    for mode, params in cases:
        with pytest.raises(InputError):
            guest_cmdline(mode, **params)


@pytest.mark.qemu
def test_make_disk(tmp_path: Path) -> None:
    disk = tmp_path / "d.qcow2"
    make_disk(disk, 8 << 20)
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(disk)], capture_output=True, check=True
        ).stdout
    )
    assert (info["format"], info["virtual-size"]) == ("qcow2", 8 << 20)
    stamp = disk.stat().st_mtime_ns
    with pytest.raises(InputError, match="already exists"):
        make_disk(disk, 1 << 20)
    assert disk.stat().st_mtime_ns == stamp
    make_disk(disk, 1 << 20, fmt="raw", overwrite=True)
    assert disk.stat().st_size == 1 << 20
    for size, fmt in [(0, "qcow2"), (1000, "qcow2"), (1 << 20, "vmdk")]:
        with pytest.raises(InputError):
            make_disk(tmp_path / "other", size, fmt)
    assert not (tmp_path / "other").exists()
    with pytest.raises(InputError):
        make_disk(tmp_path / "missing" / "d.qcow2", 1 << 20)


# ---------------------------------------------------------------------------------------------
# The initramfs


def _cpio_list(archive: bytes) -> list[str]:
    """``busybox cpio -tv`` of an uncompressed archive (an independent reader of our format)."""
    done = subprocess.run(
        [str(BUSYBOX), "cpio", "-t", "-v"], input=archive, capture_output=True, check=True
    )
    return done.stdout.decode().splitlines()


def _cpio_extract(archive: bytes, dest: Path, *patterns: str) -> None:
    subprocess.run(
        [str(BUSYBOX), "cpio", "-i", "-d", *patterns],
        input=archive,
        cwd=dest,
        capture_output=True,
        check=True,
    )


@needs_busybox
def test_cpio_writer_is_read_by_busybox_cpio(tmp_path: Path) -> None:
    cpio = CpioWriter()
    cpio.directory("bin")
    cpio.file("bin/tool", b"x" * 5, mode=0o755)  # odd sizes exercise the 4-byte padding
    cpio.symlink("bin/alias", "tool")
    cpio.device("console", major=5, minor=1)
    archive = cpio.finish()
    assert archive.endswith(b"\0" * (-len(archive) % 4)) and len(archive) % 4 == 0
    listing = _cpio_list(archive)
    assert [line[0] for line in listing] == ["d", "-", "l", "c"]
    assert listing[1].startswith("-rwxr-xr-x") and listing[1].endswith(" bin/tool")
    assert listing[2].endswith("bin/alias -> tool")
    _cpio_extract(archive, tmp_path, "bin/tool")
    assert (tmp_path / "bin" / "tool").read_bytes() == b"xxxxx"


def _fake_system(root: Path, module_bytes: dict[str, bytes]) -> tuple[Path, Path]:
    """A /boot and /lib/modules with several kernels and virtio modules in three encodings."""
    boot, mods = root / "boot", root / "modules"
    boot.mkdir()
    for version in ("6.1.0-2-amd64", "6.1.0-10-amd64", "6.1.0-11-amd64"):
        (boot / f"vmlinuz-{version}").write_bytes(b"kernel " + version.encode())
    for version in ("6.1.0-2-amd64", "6.1.0-10-amd64"):  # 6.1.0-11 has no modules: not usable
        (mods / version).mkdir(parents=True)
    drivers = mods / "6.1.0-10-amd64" / "kernel" / "drivers"
    drivers.mkdir(parents=True)
    (mods / "6.1.0-10-amd64" / "modules.builtin").write_text("kernel/drivers/x/virtio.ko\n")
    encoders: list[tuple[str, Callable[[bytes], bytes]]] = [
        (".ko", lambda b: b),
        (".ko.xz", lzma.compress),
        (".ko.zst", lambda b: zstandard.ZstdCompressor().compress(b)),
    ]
    for n, (name, data) in enumerate(module_bytes.items()):
        suffix, encode = encoders[n % 3]
        (drivers / f"{name}{suffix}").write_bytes(encode(data))
    return boot, mods


def _initrd_files(image: GuestImage, dest: Path) -> list[str]:
    archive = gzip.decompress(image.initrd.read_bytes())
    dest.mkdir()
    _cpio_extract(archive, dest, "init", "bin/busybox", "lib/modules/*")
    return _cpio_list(archive)


@needs_busybox
def test_build_guest_packs_modules_and_caches_by_content(tmp_path: Path) -> None:
    wanted = [m for m in VIRTIO_MODULES if m != "virtio"]  # "virtio" is built in here
    modules = {m: f"module {m} ".encode() * 100 for m in wanted}
    boot, mods = _fake_system(tmp_path, modules)
    cache = tmp_path / "cache"

    image = build_guest(cache, boot_dir=boot, modules_root=mods)
    assert image.kernel == boot / "vmlinuz-6.1.0-10-amd64"
    listing = _initrd_files(image, tmp_path / "x")
    for m in wanted:
        assert (tmp_path / "x" / "lib" / "modules" / f"{m}.ko").read_bytes() == modules[m]
    assert not (tmp_path / "x" / "lib" / "modules" / "virtio.ko").exists()
    assert (tmp_path / "x" / "bin" / "busybox").read_bytes() == BUSYBOX.read_bytes()
    init = (tmp_path / "x" / "init").read_text()
    assert f"for m in {' '.join(wanted)}; do" in init
    assert any(line.startswith("-rwxr-xr-x") and line.endswith(" init") for line in listing)
    assert any(line.endswith("bin/sh -> busybox") for line in listing)
    assert any(line.startswith("c") and line.endswith("dev/console") for line in listing)

    stamp = image.initrd.stat().st_mtime_ns
    assert build_guest(cache, boot_dir=boot, modules_root=mods) == image
    assert image.initrd.stat().st_mtime_ns == stamp  # not rebuilt
    changed = mods / "6.1.0-10-amd64" / "kernel" / "drivers" / "virtio_ring.ko"
    changed.write_bytes(b"a newer virtio_ring")
    rebuilt = build_guest(cache, boot_dir=boot, modules_root=mods)
    assert rebuilt.initrd != image.initrd
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [image.initrd.name, rebuilt.initrd.name]
    )  # no temporary files left behind


def test_build_guest_reports_what_is_missing(tmp_path: Path) -> None:
    boot, mods = _fake_system(tmp_path, {"virtio_ring": b"only one"})
    with pytest.raises(NotFoundError, match="virtio_pci_modern_dev") as info:
        build_guest(tmp_path / "cache", boot_dir=boot, modules_root=mods)
    assert "linux-image" in info.value.hint
    with pytest.raises(NotFoundError, match="no kernel") as info:
        find_kernel(tmp_path / "nowhere", mods)
    assert "linux-image-amd64" in info.value.hint
    assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------------------------------------
# Real boots (TCG)


def _read_at(image: Path, offset: int, size: int) -> bytes:
    with open(image, "rb") as f:
        f.seek(offset)
        return f.read(size)


def _to_raw(image: Path) -> Path:
    raw = image.with_suffix(".raw")
    subprocess.run(
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw)], check=True
    )
    return raw


@pytest.mark.qemu
@pytest.mark.slow
def test_writer_records_are_durable_and_verify_reads_them_back(tmp_path: Path) -> None:
    guest = build_guest(tmp_path / "cache")
    sys_disk, data_disk = tmp_path / "sys.qcow2", tmp_path / "data.qcow2"
    make_disk(sys_disk, 8 << 20)
    make_disk(data_disk, 16 << 20)
    drives = [DriveSpec("sys", sys_disk), DriveSpec("data", data_disk)]
    seed, count = 4242, 5

    def vm(name: str, mode: str, **params: int) -> VmProcessSpec:
        return VmProcessSpec(
            name=name,
            workdir=tmp_path,
            drives=drives,
            kernel=guest.kernel,
            initrd=guest.initrd,
            append=guest_cmdline(mode, **params),
            accel="tcg",
        )

    started = time.monotonic()
    writer = QemuProcess.start(vm("writer", "writer", seed=seed, count=count, interval_ms=50))
    try:
        writer.wait_serial("^SR-BOOTED$", timeout=120)
        boot_time = time.monotonic() - started
        writer.wait_serial(f"^SR-WROTE {count - 1} ", timeout=60)
    finally:
        # A crash, not a shutdown: every record announced must already be on the disk.
        writer.kill()
    print(f"\nTCG boot to SR-BOOTED: {boot_time:.1f} s")
    wrote = parse_console(writer.serial_text()).wrote
    assert wrote == {i: hashlib.sha256(expected_record(seed, i)).hexdigest() for i in range(count)}

    data = _to_raw(data_disk).read_bytes()
    for i in range(count):
        assert data[i * RECORD_SIZE : (i + 1) * RECORD_SIZE] == expected_record(seed, i)
    assert data[count * RECORD_SIZE :].count(0) == len(data) - count * RECORD_SIZE
    system = _to_raw(sys_disk)
    for i in range(count):
        assert _read_at(system, marker_offset(i), 512) == expected_marker(seed, i)

    verifier = QemuProcess.start(vm("verify", "verify"))
    try:
        assert verifier.wait(timeout=120) == 0  # the guest powers off when done
    finally:
        verifier.stop()
    log = parse_console(verifier.serial_text())
    assert log.errors == []
    assert log.have == wrote
    assert log.verify_done == count
