"""Run contenders side by side: warm-up, interleaved timed runs, per-run resource figures.

Every timed run is one child process (ours included), measured the same way:

- ``seconds``: wall time from spawn to reap (``time.perf_counter``);
- ``max_rss_bytes``: the command's peak resident memory as GNU time (``%M``) reports it — the
  largest of the process and the descendants it reaped. The command is started by
  ``/usr/bin/time``, not by this process directly: a child spawned from a big parent reports
  the parent's resident size as its own peak (the kernel keeps the pre-exec high-water mark);
- ``io_read_bytes`` / ``io_written_bytes``: ``rchar`` / ``wchar`` of the child and its
  descendants — bytes passed through read/write syscalls (files, pipes, sockets, page cache
  hits included). The kernel adds a reaped child's counters to its parent's, so they are the
  growth of ``/proc/self/io`` across the reap.

Work needed before a run (a fresh destination, a copy of a template repository) is done by the
contender's ``prepare`` and is not timed; figures read after a run (bytes stored, tool
statistics) come from ``collect``, also not timed.

Order: each contender runs ``warmup`` times untimed (page cache, lazy initialisation), then
round ``k`` runs every contender once, ours first — the A B A B interleaving that
:mod:`bench.stats` turns into pair-by-pair ratios.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.stats import ratio_summary, summarize, throughput

TIME = "/usr/bin/time"
Figures = dict[str, float]
Log = Callable[[str], None]


class BenchError(Exception):
    """A contender could not run; the message says which and why."""


@dataclass(frozen=True)
class Measured:
    """One timed child process; see the module docstring for each figure."""

    seconds: float
    max_rss_bytes: int
    io_read_bytes: int
    io_written_bytes: int
    stdout: str

    def to_json(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 4),
            "max_rss_bytes": self.max_rss_bytes,
            "io_read_bytes": self.io_read_bytes,
            "io_written_bytes": self.io_written_bytes,
        }


def _proc_io() -> dict[str, int]:
    counters: dict[str, int] = {}
    with open("/proc/self/io") as status:
        for line in status:
            name, _, value = line.partition(":")
            counters[name.strip()] = int(value)
    return counters


def measure(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 3600.0,
) -> Measured:
    """Run ``argv`` to completion and measure it; raise :class:`BenchError` if it fails.

    ``env`` entries are added to this process's environment. stdout is returned (the ours
    worker prints its figures there); stderr is quoted in the error when the run fails.
    """
    if not os.access(TIME, os.X_OK):
        raise BenchError(f"{TIME} is missing: run scripts/bench-setup.sh (Debian package time)")
    full_env = {**os.environ, **(env or {})}
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        out, err, rss = (Path(tmp) / name for name in ("out", "err", "rss"))
        with out.open("wb") as out_file, err.open("wb") as err_file:
            before = _proc_io()
            start = time.perf_counter()
            proc = subprocess.Popen(
                [TIME, "-f", "%M", "-o", str(rss), *argv],
                stdout=out_file,
                stderr=err_file,
                env=full_env,
                cwd=cwd,
            )
            try:
                code = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise BenchError(f"{argv[0]} did not finish within {timeout:g} s") from None
            seconds = time.perf_counter() - start
            after = _proc_io()
        stdout, stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
        rss_lines = rss.read_text().split()
    if code != 0:
        raise BenchError(f"{argv[0]} exited with {code}: {stderr.strip()[-2000:]}")
    return Measured(
        seconds=seconds,
        max_rss_bytes=int(rss_lines[-1]) * 1024,
        io_read_bytes=after["rchar"] - before["rchar"],
        io_written_bytes=after["wchar"] - before["wchar"],
        stdout=stdout,
    )


def _nothing() -> None:
    return None


def _no_figures(_stdout: str) -> Figures:
    return {}


@dataclass
class Contender:
    """One way of doing a row's job: a command plus its untimed prepare/collect steps.

    ``prepare()`` makes the state a run starts from; ``argv()`` is the timed command;
    ``collect(stdout)`` returns figures of the run (bytes stored, shipped…) after it.
    """

    name: str
    argv: Callable[[], list[str]]
    role: str = "anchor"
    prepare: Callable[[], None] = _nothing
    collect: Callable[[str], Figures] = _no_figures
    env: Mapping[str, str] = field(default_factory=dict)
    note: str = ""


@dataclass
class RunRecord:
    """One timed run of one contender: measurement plus collected figures."""

    measured: Measured
    figures: Figures
    argv: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {**self.measured.to_json(), "figures": self.figures}


@dataclass
class ContenderResult:
    """All timed runs of one contender in one row; ``error`` set when it could not run."""

    contender: Contender
    runs: list[RunRecord] = field(default_factory=list)
    error: str | None = None

    def seconds(self) -> list[float]:
        return [run.measured.seconds for run in self.runs]


def run_once(contender: Contender) -> RunRecord:
    """Prepare, run (timed) and collect one run of ``contender``."""
    contender.prepare()
    argv = contender.argv()
    measured = measure(argv, env=contender.env)
    return RunRecord(measured, contender.collect(measured.stdout), argv)


def run_row(
    contenders: Sequence[Contender], *, runs: int, warmup: int, log: Log
) -> list[ContenderResult]:
    """Warm every contender up, then run ``runs`` interleaved rounds; see the module docstring.

    A contender that fails is recorded with its error and left out of later rounds; the
    others go on. Results keep the order of ``contenders``.
    """
    results = [ContenderResult(c) for c in contenders]
    for result in results:
        for _ in range(warmup):
            _attempt(result, log, keep=False)
    for round_no in range(runs):
        for result in results:
            if result.error is None:
                _attempt(result, log, keep=True, round_no=round_no)
    return results


def _attempt(result: ContenderResult, log: Log, *, keep: bool, round_no: int = -1) -> None:
    name = result.contender.name
    try:
        record = run_once(result.contender)
    except (BenchError, OSError) as exc:
        result.error = str(exc)
        log(f"  {name}: FAILED: {exc}")
        return
    label = f"run {round_no + 1}" if keep else "warm-up"
    log(f"  {name} {label}: {record.measured.seconds:.2f} s")
    if keep:
        result.runs.append(record)


def result_json(
    result: ContenderResult,
    ours: ContenderResult,
    data_bytes: int | None,
    ratio_of: str | None = None,
) -> dict[str, Any]:
    """One contender's JSON record: runs, summaries and (anchors) ratio of ours to it.

    The ratio is over the process times, or over figure ``ratio_of`` when given (runs
    lacking it leave the ratio out).
    """
    contender = result.contender
    doc: dict[str, Any] = {
        "name": contender.name,
        "role": contender.role,
        "command": " ".join(result.runs[-1].argv) if result.runs else "",
        "note": contender.note,
        "error": result.error,
        "runs": [run.to_json() for run in result.runs],
    }
    if not result.runs:
        return doc
    doc["summary"] = _summaries(result, data_bytes)
    mine, theirs = _paired(ours, ratio_of), _paired(result, ratio_of)
    if contender.role == "anchor" and mine and len(mine) == len(theirs):
        doc["time_ratio"] = {
            **ratio_summary(mine, theirs).to_json(),
            "per_run": [round(a / b, 4) for a, b in zip(mine, theirs, strict=True)],
        }
    return doc


def _paired(result: ContenderResult, figure: str | None) -> list[float]:
    """The values a ratio is taken over: process seconds, or ``figure`` of every run."""
    if figure is None:
        return result.seconds()
    values = [run.figures.get(figure) for run in result.runs]
    return [v for v in values if v is not None] if None not in values else []


def _summaries(result: ContenderResult, data_bytes: int | None) -> dict[str, Any]:
    runs = result.runs
    summary: dict[str, Any] = {
        "seconds": summarize(result.seconds()).to_json(),
        "max_rss_bytes": summarize([r.measured.max_rss_bytes for r in runs]).to_json(),
        "io_read_bytes": summarize([r.measured.io_read_bytes for r in runs]).to_json(),
        "io_written_bytes": summarize([r.measured.io_written_bytes for r in runs]).to_json(),
    }
    if data_bytes:
        summary["mb_per_s"] = summarize(
            [throughput(data_bytes, s) for s in result.seconds()]
        ).to_json()
    names = sorted({name for run in runs for name in run.figures})
    for name in names:
        values = [run.figures[name] for run in runs if name in run.figures]
        summary[name] = summarize(values).to_json()
    return summary
