"""The reference workload: a raw VM disk image and its 1 % change, deterministic from a seed.

Layout (``WorkloadSpec``): the disk is cut into regions of ``region`` bytes (1 MiB). A seeded
shuffle decides each region's kind:

- ``HOLE``   — never written: the image file stays unallocated there (``lseek(SEEK_DATA)``
  skips it), like the free space of a real guest disk;
- ``TEXT``   — log-like lines (timestamps, hosts, services, request lines, numbers) from a
  seeded template; compresses like real logs (zstd about 4-6x) and never repeats a region;
- ``RANDOM`` — seeded random bytes: incompressible, never deduplicated.

The reference mix is 40 % holes, 30 % text, 30 % random over a 2 GiB disk. The *sparse* variant
used for scaling rows keeps the same data (text and random regions of the base size) and adds
holes up to a larger disk size, so a cycle that scales with the change (not the disk) shows it.

The **change** is ``change_fraction`` of the *base* size (so the same number of bytes for the
sparse variant) as writes of ``write_size`` (64 KiB) seeded random bytes at distinct seeded
offsets aligned to ``write_size``, in ascending offset order.

Everything is a pure function of the spec: the same spec gives the same image bytes (same
sha256) and the same change, on every machine and Python >= 3.9 (``random.Random`` with an
``int`` or ``str`` seed and ``randbytes`` are stable across versions).
"""

from __future__ import annotations

import enum
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20
GiB = 1 << 30


class Kind(enum.Enum):
    """What one region of the reference disk holds."""

    HOLE = "hole"
    TEXT = "text"
    RANDOM = "random"


@dataclass(frozen=True)
class WorkloadSpec:
    """A reference disk and its change; see the module docstring.

    ``size`` is the disk size; ``base_size`` is the size whose region mix (``hole_pct``,
    ``text_pct``, ``random_pct``) defines the data, and the change size
    (``change_fraction * base_size``). ``size > base_size`` adds pure holes (sparse variant).
    """

    size: int = 2 * GiB
    seed: int = 1
    base_size: int | None = None
    region: int = MiB
    hole_pct: int = 40
    text_pct: int = 30
    random_pct: int = 30
    change_fraction: float = 0.01
    write_size: int = 64 * 1024

    def __post_init__(self) -> None:
        base = self.base
        if self.region <= 0 or self.write_size <= 0 or self.region % self.write_size:
            raise ValueError("region must be a positive multiple of write_size")
        if base <= 0 or base % self.region or self.size % self.region or self.size < base:
            raise ValueError(
                f"sizes must be positive multiples of the region ({self.region} bytes) and "
                f"size ({self.size}) >= base_size ({base})"
            )
        if (
            self.hole_pct + self.text_pct + self.random_pct != 100
            or min(self.hole_pct, self.text_pct, self.random_pct) < 0
        ):
            raise ValueError("hole_pct + text_pct + random_pct must be 100, each >= 0")
        if not 0 < self.change_fraction <= 1:
            raise ValueError("change_fraction must be in (0, 1]")

    @property
    def base(self) -> int:
        """The size that defines the data mix and the change size."""
        return self.base_size if self.base_size is not None else self.size

    @property
    def regions(self) -> int:
        return self.size // self.region

    @property
    def change_writes(self) -> int:
        """How many ``write_size`` writes the change makes (at least one)."""
        return max(1, round(self.base * self.change_fraction / self.write_size))

    @property
    def change_bytes(self) -> int:
        return self.change_writes * self.write_size

    def scaled(self, size: int) -> WorkloadSpec:
        """The sparse variant of this workload on a disk of ``size`` bytes."""
        return WorkloadSpec(
            size=size,
            seed=self.seed,
            base_size=self.base,
            region=self.region,
            hole_pct=self.hole_pct,
            text_pct=self.text_pct,
            random_pct=self.random_pct,
            change_fraction=self.change_fraction,
            write_size=self.write_size,
        )


def region_kinds(spec: WorkloadSpec) -> list[Kind]:
    """Each region's kind, in disk order: exact counts from the percentages, seeded order."""
    base_regions = spec.base // spec.region
    text = base_regions * spec.text_pct // 100
    rand = base_regions * spec.random_pct // 100
    holes = spec.regions - text - rand
    kinds = [Kind.HOLE] * holes + [Kind.TEXT] * text + [Kind.RANDOM] * rand
    random.Random(f"layout-{spec.seed}").shuffle(kinds)
    return kinds


_LEVELS = ("INFO",) * 12 + ("DEBUG",) * 5 + ("WARN",) * 2 + ("ERROR",)
_SERVICES = ("nginx", "sshd", "kernel", "postgres", "app-worker", "cron", "systemd", "redis")
_PATHS = ("/api/v1/items", "/api/v1/orders", "/login", "/static/app.js", "/health", "/search")
_METHODS = ("GET",) * 6 + ("POST",) * 2 + ("PUT", "DELETE")
_STATUS = (200,) * 14 + (201, 204, 301, 304, 400, 403, 404, 500)
_MESSAGES = (
    'request {ip} "{method} {path}/{n} HTTP/1.1" {status} {size} {ms}ms',
    "connection from {ip} port {port} accepted for user u{user}",
    "checkpoint complete: wrote {n} buffers ({pct}%); sync files={user}, total={ms} ms",
    "job {hexid} finished in {ms} ms, {size} rows processed",
    "session {hexid} closed after {n} s idle",
    "cache miss key=obj:{n}:{user} fill={ms}ms size={size}",
)


def _text_region(rng: random.Random, index: int, size: int) -> bytes:
    """``size`` bytes of log lines; timestamps advance with ``index`` so regions never repeat."""
    lines: list[str] = []
    total = 0
    clock = 1_700_000_000.0 + index * 3600.0
    while total < size:
        clock += rng.random() * 0.05
        line = _log_line(rng, clock)
        lines.append(line)
        total += len(line)
    return "".join(lines).encode()[:size]


def _log_line(rng: random.Random, clock: float) -> str:
    secs = int(clock)
    stamp = f"{secs // 86400 % 28 + 1:02d}T{secs // 3600 % 24:02d}:{secs // 60 % 60:02d}:"
    stamp += f"{secs % 60:02d}.{int(clock * 1e6) % 1_000_000:06d}"
    message = rng.choice(_MESSAGES).format(
        ip=f"10.{rng.randrange(4)}.{rng.randrange(256)}.{rng.randrange(256)}",
        method=rng.choice(_METHODS),
        path=rng.choice(_PATHS),
        n=rng.randrange(100_000),
        status=rng.choice(_STATUS),
        size=rng.randrange(40, 90_000),
        ms=rng.randrange(1, 900),
        port=rng.randrange(1024, 65536),
        user=rng.randrange(500),
        pct=rng.randrange(100),
        hexid=f"{rng.getrandbits(48):012x}",
    )
    host = rng.randrange(16)
    service, level = rng.choice(_SERVICES), rng.choice(_LEVELS)
    return f"2026-01-{stamp}Z host-{host:02d} {service}: {level} {message}\n"


def region_data(spec: WorkloadSpec, index: int, kind: Kind) -> bytes:
    """The bytes of region ``index`` (empty for a hole); independent of every other region."""
    if kind is Kind.HOLE:
        return b""
    rng = random.Random(f"region-{spec.seed}-{index}")
    if kind is Kind.RANDOM:
        return rng.randbytes(spec.region)
    return _text_region(rng, index, spec.region)


def generate_image(path: Path, spec: WorkloadSpec) -> None:
    """Write the reference raw image to ``path`` (replaced), sparse: holes stay unallocated.

    Written to ``path.partial`` then renamed, so an interrupted run never leaves an image that
    looks complete.
    """
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as out:
        out.truncate(spec.size)
        for index, kind in enumerate(region_kinds(spec)):
            if kind is not Kind.HOLE:
                os.pwrite(out.fileno(), region_data(spec, index, kind), index * spec.region)
    partial.replace(path)


def change_writes(spec: WorkloadSpec) -> Iterator[tuple[int, bytes]]:
    """The change as ``(offset, data)`` writes, ascending offsets, ``write_size`` bytes each."""
    rng = random.Random(f"change-{spec.seed}")
    slots = rng.sample(range(spec.size // spec.write_size), spec.change_writes)
    for slot in sorted(slots):
        yield slot * spec.write_size, rng.randbytes(spec.write_size)


def apply_change(path: Path, spec: WorkloadSpec) -> None:
    """Apply the change to the raw image at ``path`` in place (for the anchors' copies)."""
    with path.open("r+b") as out:
        for offset, data in change_writes(spec):
            os.pwrite(out.fileno(), data, offset)


def write_change_files(directory: Path, spec: WorkloadSpec) -> list[tuple[int, Path]]:
    """Store each change write as its own file (for ``qemu-io write -s FILE``); return them."""
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for number, (offset, data) in enumerate(change_writes(spec)):
        file = directory / f"w{number:06d}.bin"
        file.write_bytes(data)
        files.append((offset, file))
    return files
