"""The reference workload: deterministic, sparse, exact mix, and a well-formed change."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from bench.workload import (
    Kind,
    MiB,
    WorkloadSpec,
    apply_change,
    change_writes,
    generate_image,
    region_kinds,
    write_change_files,
)

SMALL = WorkloadSpec(size=10 * MiB, seed=7)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    generate_image(tmp_path / "a.raw", SMALL)
    generate_image(tmp_path / "b.raw", SMALL)
    generate_image(tmp_path / "c.raw", WorkloadSpec(size=10 * MiB, seed=8))
    assert _sha(tmp_path / "a.raw") == _sha(tmp_path / "b.raw")
    assert _sha(tmp_path / "a.raw") != _sha(tmp_path / "c.raw")
    assert not (tmp_path / "a.raw.partial").exists()


def test_known_digest_pins_the_generator(tmp_path: Path) -> None:
    # Results of different runs compare only if the bytes never drift: pin them.
    spec = WorkloadSpec(size=4 * MiB, seed=1)
    generate_image(tmp_path / "d.raw", spec)
    assert region_kinds(spec) == [Kind.TEXT, Kind.HOLE, Kind.RANDOM, Kind.HOLE]
    assert _sha(tmp_path / "d.raw") == PINNED_4MIB_SEED1


def test_exact_mix_and_holes_are_unallocated(tmp_path: Path) -> None:
    kinds = region_kinds(SMALL)
    assert [kinds.count(k) for k in (Kind.HOLE, Kind.TEXT, Kind.RANDOM)] == [4, 3, 3]
    image = tmp_path / "a.raw"
    generate_image(image, SMALL)
    assert image.stat().st_size == SMALL.size
    assert image.stat().st_blocks * 512 <= 6 * MiB
    with image.open("rb") as f:
        for index, kind in enumerate(kinds):
            start = index * MiB
            data_at = _next_data(f.fileno(), start)
            if kind is Kind.HOLE:
                assert data_at >= start + MiB, f"region {index} is a hole but has data"
                assert os.pread(f.fileno(), MiB, start) == bytes(MiB)
            else:
                assert data_at == start


def _next_data(fd: int, offset: int) -> int:
    try:
        return os.lseek(fd, offset, os.SEEK_DATA)
    except OSError:  # ENXIO: no data after offset
        return 1 << 62


def test_text_regions_look_like_logs_and_random_regions_do_not_repeat(tmp_path: Path) -> None:
    image = tmp_path / "a.raw"
    generate_image(image, SMALL)
    data = image.read_bytes()
    regions = [data[i * MiB : (i + 1) * MiB] for i in range(SMALL.regions)]
    kinds = region_kinds(SMALL)
    texts = [r for r, k in zip(regions, kinds, strict=True) if k is Kind.TEXT]
    assert all(r.count(b"\n") > 5000 and b" host-" in r and r.isascii() for r in texts)
    filled = [r for r, k in zip(regions, kinds, strict=True) if k is not Kind.HOLE]
    assert len(set(filled)) == len(filled)


def test_change_is_one_percent_of_aligned_distinct_writes() -> None:
    spec = WorkloadSpec(size=64 * MiB, seed=3)
    writes = list(change_writes(spec))
    assert len(writes) == spec.change_writes == 10  # 1 % of 64 MiB in 64 KiB writes
    offsets = [offset for offset, _ in writes]
    assert offsets == sorted(set(offsets))
    assert all(o % spec.write_size == 0 and o + spec.write_size <= spec.size for o in offsets)
    assert all(len(data) == spec.write_size for _, data in writes)
    assert list(change_writes(spec)) == writes


def test_apply_change_touches_exactly_the_change(tmp_path: Path) -> None:
    image = tmp_path / "a.raw"
    generate_image(image, SMALL)
    before = image.read_bytes()
    apply_change(image, SMALL)
    after = image.read_bytes()
    expected = bytearray(before)
    for offset, data in change_writes(SMALL):
        expected[offset : offset + len(data)] = data
    assert after == bytes(expected) and after != before
    files = write_change_files(tmp_path / "w", SMALL)
    assert [(o, f.read_bytes()) for o, f in files] == list(change_writes(SMALL))


def test_sparse_variant_keeps_data_and_change_size() -> None:
    large = SMALL.scaled(100 * MiB)
    kinds = region_kinds(large)
    assert len(kinds) == 100
    assert kinds.count(Kind.TEXT) == 3 and kinds.count(Kind.RANDOM) == 3
    assert large.change_bytes == SMALL.change_bytes


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": MiB + 1},
        {"size": 0},
        {"hole_pct": 50},
        {"change_fraction": 0.0},
        {"size": MiB, "base_size": 2 * MiB},
        {"region": 100_000},
    ],
)
def test_bad_specs_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        WorkloadSpec(**kwargs)  # type: ignore[arg-type]


PINNED_4MIB_SEED1 = "fae116dc7ec466abcbe68196211bf55974bc7a28360e76cad5974e7b7a1e10f6"
