"""The harness measures real child processes and interleaves contenders."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from bench.harness import TIME, BenchError, Contender, measure, result_json, run_row
from bench.report import markdown, row_markdown, update_doc

needs_time = pytest.mark.skipif(
    not os.access(TIME, os.X_OK), reason="GNU time missing (scripts/bench-setup.sh installs it)"
)


@needs_time
def test_measure_counts_child_reads_and_memory(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_bytes(b"x" * (4 << 20))
    measured = measure(["cat", str(data)])
    assert measured.io_read_bytes >= 4 << 20
    assert measured.io_written_bytes >= 4 << 20  # cat wrote it to our stdout file
    assert len(measured.stdout) == 4 << 20
    assert measured.max_rss_bytes > 0 and measured.seconds > 0
    big = measure(
        [sys.executable, "-c", "b = bytearray(64 << 20); b[::4096] = b'x' * len(b[::4096])"]
    )
    assert big.max_rss_bytes >= 64 << 20
    # a tiny command reports its own peak, not the (bigger) harness's resident size
    assert measure(["true"]).max_rss_bytes < 16 << 20


@needs_time
def test_measure_reports_failures_with_stderr() -> None:
    with pytest.raises(BenchError, match="boom"):
        measure([sys.executable, "-c", "import sys; sys.exit('boom')"])


def _appender(log: Path, name: str, *, role: str = "anchor", fail: bool = False) -> Contender:
    code = f"open({str(log)!r}, 'a').write({name!r} + '\\n')" + ("; 1/0" if fail else "")
    prepared: list[int] = []
    return Contender(
        name=name,
        role=role,
        argv=lambda: [sys.executable, "-c", code],
        prepare=lambda: prepared.append(1),
        collect=lambda _out: {"bytes_stored": float(len(prepared))},
    )


@needs_time
def test_rows_warm_up_then_interleave_and_survive_a_failing_anchor(tmp_path: Path) -> None:
    log = tmp_path / "order"
    contenders = [
        _appender(log, "ours", role="ours"),
        _appender(log, "a"),
        _appender(log, "broken", fail=True),
        _appender(log, "b"),
    ]
    results = run_row(contenders, runs=3, warmup=1, log=lambda _m: None)
    order = log.read_text().split()
    # warm-up of each (the broken one fails there and is dropped), then ours a b rounds
    assert order == ["ours", "a", "broken", "b"] + ["ours", "a", "b"] * 3
    assert [len(r.runs) for r in results] == [3, 3, 0, 3]
    assert results[2].error is not None and "ZeroDivisionError" in results[2].error
    anchor_doc = result_json(results[1], results[0], data_bytes=1_000_000)
    assert anchor_doc["time_ratio"]["n"] == 3 and len(anchor_doc["time_ratio"]["per_run"]) == 3
    assert anchor_doc["summary"]["bytes_stored"]["max"] == 4.0  # prepare ran before every run
    assert "mb_per_s" in anchor_doc["summary"]
    assert "time_ratio" not in result_json(results[0], results[0], None)
    broken_doc = result_json(results[2], results[0], None)
    assert broken_doc["runs"] == [] and "summary" not in broken_doc
    row = {
        "id": "x",
        "title": "T",
        "status": "ok",
        "note": "",
        "data_bytes": 1_000_000,
        "contenders": [result_json(r, results[0], 1_000_000) for r in results],
    }
    text = row_markdown(row)
    assert "| ours **(ours)** |" in text and "failed: " in text and "| b |" in text


def test_unavailable_rows_and_doc_update(tmp_path: Path) -> None:
    results = {
        "variant": "quick",
        "started": "2026-01-01T00:00:00Z",
        "commit": "abc",
        "machine": {
            "cores": 2,
            "cpu_model": "CPU",
            "memory_bytes": 1 << 30,
            "kernel": "6.1",
            "os": "Debian",
            "filesystem": "ext4",
        },
        "workload": {
            "size": 1 << 28,
            "seed": 1,
            "allocated_bytes": 1 << 27,
            "change_writes": 41,
            "write_size": 65536,
            "change_bytes": 41 * 65536,
            "sha256": "ab" * 32,
        },
        "settings": {"runs": 3, "warmup": 1},
        "rows": [
            {
                "id": "resync",
                "title": "Resync",
                "status": "not available yet: later",
                "note": "",
                "data_bytes": None,
                "contenders": [],
            }
        ],
    }
    text = markdown(results)
    assert "*not available yet: later*" in text and "2 cores, CPU" in text
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nintro\n")
    update_doc(doc, text)
    update_doc(doc, text.replace("later", "soon"))
    content = doc.read_text()
    assert content.startswith("# Benchmarks\n\nintro\n")
    assert content.count("bench:latest:start") == 1 and "soon" in content and "later" not in content
