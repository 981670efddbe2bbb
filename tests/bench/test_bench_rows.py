"""The rows added for resync, object stores and failover RTO: figures, ratios, rendering."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import run
from bench.harness import Contender, ContenderResult, Measured, RunRecord, result_json
from bench.report import row_markdown, update_doc
from bench.rows import _row, per_change


def _result(name: str, role: str, seconds: list[float], **figures: list[float]) -> ContenderResult:
    result = ContenderResult(Contender(name=name, role=role, argv=lambda: ["true"]))
    for k, secs in enumerate(seconds):
        measured = Measured(secs, 50 << 20, 1000, 1000, "")
        values = {fig: vals[k] for fig, vals in figures.items() if k < len(vals)}
        result.runs.append(RunRecord(measured, values, ["cmd", name]))
    return result


def test_ratio_over_a_figure_not_the_process_time() -> None:
    ours = _result("instant", "ours", [9.0, 9.0], first_output_s=[2.0, 3.0])
    other = _result("full", "anchor", [1.0, 1.0], first_output_s=[4.0, 6.0])
    doc = result_json(other, ours, None, "first_output_s")
    assert doc["time_ratio"]["per_run"] == [0.5, 0.5]
    assert result_json(other, ours, None)["time_ratio"]["per_run"] == [9.0, 9.0]
    # a run without the figure: no ratio rather than a ratio of mismatched pairs
    partial = _result("full", "anchor", [1.0, 1.0], first_output_s=[4.0])
    assert "time_ratio" not in result_json(partial, ours, None, "first_output_s")


def test_rto_table_shows_its_seconds_and_no_process_time() -> None:
    ours = _result("instant @ 2 GiB", "ours", [9.0], running_s=[0.31], first_output_s=[5.5])
    full = _result("full @ 2 GiB", "anchor", [20.0], running_s=[2.0], first_output_s=[11.0])
    row = _row(
        "failover-rto", "RTO", [ours, full], columns=["running_s", "first_output_s"],
        ratio_of="first_output_s", ratio_title="first output ratio", process_time=False,
        data_bytes=1 << 30,
    )  # fmt: skip
    text = row_markdown(row)
    assert "| contender | peak RSS | running s | first output s | first output ratio |" in text
    assert "| full @ 2 GiB | 50 MiB | 2.00 | 11.00 | 0.50 |" in text
    assert "time s" not in text and "MB/s" not in text


def test_delta_contenders_report_shipped_over_changed_bytes() -> None:
    contender = Contender(
        name="x", argv=lambda: ["true"], collect=lambda _o: {"bytes_shipped": 110.0}
    )
    assert per_change(contender, 100).collect("")["shipped_per_change"] == pytest.approx(1.1)
    bare = Contender(name="y", argv=lambda: ["true"])
    assert "shipped_per_change" not in per_change(bare, 100).collect("")
    row = _row("delta-file", "Delta", [_result("ours", "ours", [1.0], shipped_per_change=[1.02])])
    assert "| shipped/change |" in row_markdown(row) and "| 1.02x |" in row_markdown(row)


def test_doc_update_keeps_the_sections_it_does_not_own(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    tail = "\n## Failover RTO\n\nby hand | 0.24 |\n\n## Vault throughput\n\n| 1000 VMs | 12 s |\n"
    doc.write_text("# Benchmarks\n\nintro\n\n## Latest run\n\n" + tail)
    update_doc(doc, "## Quick run A\n")
    assert doc.read_text().endswith("<!-- bench:latest:end -->\n")  # added once, at the end
    doc.write_text(doc.read_text() + tail.replace("Vault", "More"))
    update_doc(doc, "## Quick run B\n")
    text = doc.read_text()
    assert "run A" not in text and text.count("## Quick run B") == 1
    assert text.startswith("# Benchmarks\n\nintro\n\n## Latest run\n\n" + tail)
    assert text.endswith(tail.replace("Vault", "More"))


def test_unknown_rows_are_refused_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        run.main(["--quick", "--rows", "resync,bogus", "--workdir", str(tmp_path / "w")])
    assert exc.value.code == 2
    assert "unknown rows bogus" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
    assert {name for name, _ in run.TABLE} | {"ceilings"} == set(run.ROWS)
