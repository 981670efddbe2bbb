"""Render a results document (see bench/README.md) as markdown and update docs/benchmarks.md.

One table per row of the benchmark: a line per contender with time median (min-max), MB/s
when the row has a data size, peak memory, the row's byte figures, and the pair-by-pair time
ratio ours/anchor (median, min-max; below 1 means ours is faster). Rows whose feature does not
exist yet print their status instead of a table.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from bench.machine import summary_line

START = "<!-- bench:latest:start -->"
END = "<!-- bench:latest:end -->"

#: figure name -> column title, in column order
FIGURES = {
    "running_s": "running s",
    "first_output_s": "first output s",
    "booted_s": "booted s",
    "io_read_bytes": "read (rchar)",
    "bytes_read": "disk read",
    "bytes_sent": "sent",
    "bytes_shipped": "shipped",
    "shipped_per_change": "shipped/change",
    "bytes_stored": "stored",
    "bytes_allocated": "allocated",
}
#: figures that are not bytes: name -> how a summary of it is written
SECONDS = ("running_s", "first_output_s", "booted_s")
RATIOS = ("shipped_per_change",)


def human_bytes(value: float) -> str:
    """Bytes in binary units with three significant digits (``1.50 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _range(summary: dict[str, Any], fmt: str) -> str:
    med, low, high = (format(summary[k], fmt) for k in ("median", "min", "max"))
    return med if summary["n"] == 1 or low == high else f"{med} ({low}-{high})"


def _bytes(summary: dict[str, Any]) -> str:
    return human_bytes(summary["median"])


def _figure(name: str, summary: dict[str, Any]) -> str:
    """One figure's cell: seconds and ratios with their range, bytes as a median."""
    if name in SECONDS:
        return _range(summary, ".2f")
    if name in RATIOS:
        return f"{summary['median']:.2f}x"
    return _bytes(summary)


def _contender_line(
    doc: dict[str, Any], columns: list[str], has_rate: bool, process_time: bool = True
) -> str:
    summary = doc.get("summary")
    name = doc["name"] + (" **(ours)**" if doc["role"] == "ours" else "")
    if not summary:
        blank = len(columns) + (2 if process_time else 1)
        cells = [f"failed: {(doc.get('error') or 'no run')[:120]}"] + [""] * blank
        return f"| {name} | " + " | ".join(cells) + " |"
    cells = []
    if process_time:
        cells.append(_range(summary["seconds"], ".2f"))
    if has_rate:
        cells.append(_range(summary["mb_per_s"], ".0f") if "mb_per_s" in summary else "")
    cells.append(_bytes(summary["max_rss_bytes"]))
    cells += [_figure(c, summary[c]) if c in summary else "" for c in columns]
    ratio = doc.get("time_ratio")
    cells.append(_range(ratio, ".2f") if ratio else "")
    return f"| {name} | " + " | ".join(cells) + " |"


def row_markdown(row: dict[str, Any]) -> str:
    """One benchmark row as a markdown section."""
    lines = [f"### {row['title']}", ""]
    if row.get("note"):
        lines += [row["note"], ""]
    if row["status"] != "ok":
        return "\n".join([*lines, f"*{row['status']}*", ""])
    contenders = row["contenders"]
    present = {k for c in contenders for k in c.get("summary", {})}
    wanted = row.get("columns") or list(FIGURES)
    columns = [name for name in FIGURES if name in present and name in wanted]
    process_time = row.get("process_time", True)
    has_rate = bool(row.get("data_bytes")) and process_time
    head = [
        "contender",
        *(["time s"] if process_time else []),
        *(["MB/s"] if has_rate else []),
        "peak RSS",
        *(FIGURES[c] for c in columns),
        row.get("ratio_title", "time ours/this"),
    ]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [_contender_line(c, columns, has_rate, process_time) for c in contenders]
    return "\n".join([*lines, ""])


def _ceilings_markdown(ceilings: dict[str, Any]) -> str:
    lines = [
        "### Hash and compression ceilings (this machine, in-process, MB/s of input)",
        "",
        f"{human_bytes(ceilings['sample_bytes'])} samples in "
        f"{human_bytes(ceilings['block_bytes'])} blocks, median of {ceilings['runs']} passes.",
        "",
        "| hash | MB/s |",
        "|---|---|",
    ]
    lines += [f"| {name} | {rate:.0f} |" for name, rate in ceilings["hash_mb_per_s"].items()]
    lines += [
        "",
        "| zstd | data | compress MB/s | decompress MB/s | ratio |",
        "|---|---|---|---|---|",
    ]
    for data in ("text", "random"):
        for level, fig in ceilings[f"zstd_{data}"].items():
            lines.append(
                f"| {level} | {data} | {fig['compress_mb_per_s']:.0f} | "
                f"{fig['decompress_mb_per_s']:.0f} | {fig['ratio']:.2f} |"
            )
    return "\n".join([*lines, ""])


def markdown(results: dict[str, Any]) -> str:
    """The whole run as markdown: header, machine, workload, one section per row."""
    work = results["workload"]
    settings = results["settings"]
    lines = [
        f"## {results['variant'].capitalize()} run of {results['started']}",
        "",
        f"- machine: {summary_line(results['machine'])}",
        f"- workload: {human_bytes(work['size'])} raw disk, seed {work['seed']}, "
        f"{human_bytes(work['allocated_bytes'])} allocated, change "
        f"{work['change_writes']} x {human_bytes(work['write_size'])} = "
        f"{human_bytes(work['change_bytes'])}; sha256 {work['sha256'][:16]}…",
        f"- {settings['warmup']} warm-up + {settings['runs']} timed runs per contender, "
        "interleaved; time ratio = median of per-run ours/anchor (below 1: ours faster)",
        f"- siterecovery commit {results.get('commit', 'unknown')}",
        "",
    ]
    if results["variant"] == "quick":
        lines += [
            "*Quick variant: a small disk for a fast check of the harness and rough ratios; "
            "start-up costs weigh more here than on the full variant (`make bench`).*",
            "",
        ]
    lines += [row_markdown(row) for row in results["rows"]]
    if results.get("ceilings"):
        lines.append(_ceilings_markdown(results["ceilings"]))
    return "\n".join(lines)


def update_doc(doc: Path, table: str) -> None:
    """Replace the section between the markers of ``doc`` with ``table`` (add it if absent)."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    block = f"{START}\n{table.rstrip()}\n{END}"
    if START in text and END in text:
        text = re.sub(
            re.escape(START) + r".*?" + re.escape(END), lambda _m: block, text, flags=re.S
        )
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)
