"""Output helpers shared by every command: Rich tables for people, JSON for scripts.

Rule: with ``--json`` a command prints exactly one JSON document on stdout and nothing else
(progress and messages go to stderr); without it, readable tables.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

out = Console()
err = Console(stderr=True)


def warn(message: str) -> None:
    """A warning on stderr (also with ``--json``, which keeps stdout for the document)."""
    err.print(f"[yellow]warning:[/] {message}", highlight=False)


def to_jsonable(value: Any) -> Any:
    """Records, enums, datetimes and paths as plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in value]
    return value


def print_json(value: Any) -> None:
    """Print one JSON document on stdout."""
    print(json.dumps(to_jsonable(value), indent=2, sort_keys=True))


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    """A Rich table; cells are shown with ``str`` (None as an empty cell)."""
    result = Table(title=title, title_justify="left")
    for column in columns:
        result.add_column(column)
    for row in rows:
        result.add_row(*("" if cell is None else str(cell) for cell in row))
    return result


def when(value: datetime | str | None) -> str:
    """A timestamp (a datetime or ISO 8601 text) as people read it in a table (UTC, seconds)."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""


def _seconds(start: str | None, end: str | None) -> str:
    if not (start and end):
        return ""
    took = datetime.fromisoformat(end) - datetime.fromisoformat(start)
    return f"{took.total_seconds():.2f} s"


def job_table(job: Mapping[str, Any]) -> Table:
    """One job (a JSON document) with its tasks."""
    rows = [(t["name"], t["state"], _seconds(t.get("started_at"), t.get("ended_at")),
             t.get("error") or "") for t in job["tasks"]]  # fmt: skip
    title = f"job {str(job['id'])[:8]} {job['kind']} [{job['state']}]"
    return table(title, ["task", "state", "duration", "error"], rows)


def print_job(job: Mapping[str, Any]) -> None:
    out.print(job_table(job))


def jobs_table(jobs: Sequence[Mapping[str, Any]]) -> Table:
    """Jobs (JSON documents), newest first."""
    rows = [(str(j["id"])[:8], j["kind"], j.get("vm"), j["state"], f"{j['progress']}%",
             when(j["created_at"]), j.get("error") or "") for j in jobs]  # fmt: skip
    return table("jobs", ["job", "kind", "VM", "state", "progress", "created", "error"], rows)


def status_table(records: Sequence[Mapping[str, Any]]) -> Table:
    """Replicated VMs (``/v1/status`` documents) with health, RPO and the last error."""
    rows = [(r["vm"], r["policy"], r["state"],
             f"{r['health']}: {'; '.join(r['health_reasons'])}",
             "" if r["rpo_s"] is None else f"{r['rpo_s']:.0f}s", when(r["last_cycle_at"]),
             r["last_error"] or "", r.get("error_class") or "", r.get("attempts") or "",
             when(r.get("next_retry_at"))) for r in records]  # fmt: skip
    columns = ["VM", "policy", "state", "health", "RPO", "last cycle", "last error",
               "error class", "attempts", "next retry (UTC)"]  # fmt: skip
    return table("replicated VMs", columns, rows)


def watch(render: Callable[[], Table], every_s: float) -> None:
    """Redraw ``render()`` every ``every_s`` seconds in place until Ctrl-C."""
    import time

    from rich.live import Live

    with Live(render(), console=out, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(every_s)
                live.update(render(), refresh=True)
        except KeyboardInterrupt:
            return


def size(n: int | float) -> str:
    """Bytes in binary units."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"
