"""The demo as a user runs it, with a real booted guest; and its verifier on bad data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from siterecovery.demo import _scan_records
from siterecovery.hypervisor.guest import RECORD_SIZE, expected_record

SEED = 4242


def slots(records: list[bytes], total: int) -> list[bytes]:
    return records + [bytes(RECORD_SIZE)] * (total - len(records))


def test_verifier_counts_complete_records() -> None:
    good = [expected_record(SEED, i) for i in range(5)]
    assert _scan_records(iter(slots(good, 8)), SEED).complete == 5
    assert _scan_records(iter(slots(good, 8)), SEED).problem == ""


def test_verifier_accepts_one_torn_record_only() -> None:
    good = [expected_record(SEED, i) for i in range(3)]
    torn = expected_record(SEED, 3)[:4096] + bytes(RECORD_SIZE - 4096)
    found = _scan_records(iter(slots([*good, torn], 8)), SEED)
    assert (found.complete, found.problem) == (3, "")
    later = _scan_records(iter(slots([*good, torn, expected_record(SEED, 4)], 8)), SEED)
    assert "after the last record" in later.problem


def test_verifier_rejects_a_flipped_byte() -> None:
    records = [expected_record(SEED, i) for i in range(4)]
    bad = bytearray(records[2])
    bad[1000] ^= 0x01
    records[2] = bytes(bad)
    found = _scan_records(iter(slots(records, 6)), SEED)
    assert found.complete == 2
    assert "never wrote" in found.problem


def test_verifier_rejects_a_record_from_another_seed() -> None:
    records = [expected_record(SEED, 0), expected_record(SEED + 1, 1)]
    assert "never wrote" in _scan_records(iter(slots(records, 4)), SEED).problem


@pytest.mark.qemu
@pytest.mark.slow
def test_demo_end_to_end(tmp_path: Path) -> None:
    """`siterecovery demo --json`: protect, replicate, lose the primary, fail over, verify."""
    result = subprocess.run(
        [sys.executable, "-m", "siterecovery", "--workdir", str(tmp_path), "demo", "--json",
         "--cycles", "3", "--interval", "2s"],
        capture_output=True, text=True, check=False, timeout=600,
        env={**os.environ, "COLUMNS": "120"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads(result.stdout)
    assert summary["verified"] is True, summary["problems"]
    assert summary["problems"] == []
    for key in ("initial_replication_s", "cycle_s", "rpo_s", "rto_s", "recovery_points"):
        assert key in summary
    assert summary["recovery_points"] == 4  # initial + 3 cycles
    assert summary["points_verified"] == 4  # every point restored and checked on the host
    assert 0 < summary["records_recovered"] <= summary["records_acknowledged"]
    assert 0 < summary["rpo_s"] < 60
    assert summary["cycle_bytes_shipped"] > 0
    assert not (tmp_path / "demo").exists()  # removed without --keep
