"""Run the benchmark and publish its results.

    python -m bench.run --quick      256 MiB reference disk (2.5 GiB sparse for scaling), 3 runs
    python -m bench.run              2 GiB reference disk (20 GiB sparse for scaling), 5 runs
    python -m bench.run --quick --rows resync,failover     a subset of the rows

Writes ``bench/results/<UTC date and time>-<variant>.json`` (schema in bench/README.md) and
the same run as markdown beside it, and replaces the "latest run" section of
``docs/benchmarks.md``. Anchors must be installed first (``scripts/bench-setup.sh``; ``make
bench`` does both).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import ceilings, machine, report, rows, rows_recovery, rows_remote
from bench.rows import Bench
from bench.workload import GiB, MiB, WorkloadSpec

REPO = Path(__file__).resolve().parent.parent
VARIANTS: dict[str, dict[str, Any]] = {
    "quick": {"size": 256 * MiB, "large": 2560 * MiB, "runs": 3, "warmup": 1, "sample": 32 * MiB},
    "full": {"size": 2 * GiB, "large": 20 * GiB, "runs": 5, "warmup": 1, "sample": 128 * MiB},
}
ROWS = ("initial", "s3", "azure", "delta", "resync", "restore", "scaling", "failover", "ceilings")
#: row name -> row function, in run order (ceilings are measured last, in-process)
TABLE: tuple[tuple[str, rows.RowFn], ...] = (
    ("initial", rows.initial_row),
    ("s3", rows_remote.s3_row),
    ("azure", rows_remote.azure_row),
    ("delta", rows.delta_row),
    ("resync", rows_recovery.resync_row),
    ("restore", rows.restore_row),
    ("scaling", rows.scaling_row),
    ("failover", rows_recovery.failover_row),
)


def _log(message: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {message}", flush=True)


def _commit() -> str:
    result = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() or "unknown"


def _workload_doc(bench: Bench) -> dict[str, Any]:
    spec = bench.spec
    return {
        **asdict(spec),
        "large_size": bench.large.size,
        "sha256": rows.sha256_file(bench.image),
        "allocated_bytes": bench.image.stat().st_blocks * 512,
        "change_writes": spec.change_writes,
        "change_bytes": spec.change_bytes,
    }


def _guarded(name: str, fn: rows.RowFn, bench: Bench) -> dict[str, Any]:
    """Run one row; a crash becomes a failed row (with the error) instead of ending the run."""
    try:
        return fn(bench)
    except Exception as exc:  # a broken row must not hide the others' results
        _log(f"row {name} failed: {exc}")
        traceback.print_exc()
        return {
            "id": name,
            "title": name,
            "status": f"failed: {exc}",
            "note": "",
            "data_bytes": None,
            "contenders": [],
        }


def run(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run every selected row of ``variant``; return the results document."""
    conf = dict(VARIANTS[variant])
    if args.size_mib:
        conf.update(size=args.size_mib * MiB, large=10 * args.size_mib * MiB)
    spec = WorkloadSpec(size=conf["size"], seed=args.seed)
    work = Path(args.workdir) / variant
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(
        spec,
        spec.scaled(conf["large"]),
        work,
        args.runs or conf["runs"],
        conf["warmup"] if args.warmup is None else args.warmup,
        _log,
    )
    started = datetime.now(UTC)
    rows.ensure_image(bench.image, spec, _log)
    rows.prepare_source(bench)
    results: dict[str, Any] = {
        "schema": "siterecovery-bench/1",
        "variant": variant,
        "started": f"{started:%Y-%m-%dT%H:%M:%SZ}",
        "commit": _commit(),
        "machine": machine.describe(work),
        "workload": _workload_doc(bench),
        "settings": {"runs": bench.runs, "warmup": bench.warmup, "workdir": str(work)},
        "rows": [],
    }
    selected = set(args.rows.split(",")) if args.rows else set(ROWS)
    for name, fn in TABLE:
        if name in selected:
            results["rows"].append(_guarded(name, fn, bench))
    if "ceilings" in selected:
        _log("== ceilings")
        results["ceilings"] = ceilings.measure(
            spec, size=conf["sample"], block=bench.block_size, runs=max(3, bench.runs)
        )
    results["finished"] = f"{datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ}"
    if not args.keep:
        rows.cleanup(bench)
    return results


def publish(results: dict[str, Any], out_dir: Path, doc: Path) -> Path:
    """Write the JSON and markdown results and update ``doc``; return the JSON path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = results["started"].replace(":", "").replace("-", "")
    path = out_dir / f"{stamp}-{results['variant']}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    table = report.markdown(results)
    path.with_suffix(".md").write_text(table)
    report.update_doc(doc, table)
    return path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="256 MiB variant (a few minutes)")
    parser.add_argument(
        "--workdir",
        default="/var/tmp/siterecovery-bench",
        help="images, stores and repositories (needs ~4x the disk size free)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--size-mib", type=int, help="override the disk size (large = 10x)")
    parser.add_argument("--runs", type=int, help="timed runs per contender")
    parser.add_argument("--warmup", type=int, help="untimed warm-up runs per contender")
    parser.add_argument("--rows", help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--keep", action="store_true", help="keep stores and copies afterwards")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument(
        "--render", type=Path, metavar="JSON", help="only re-render a results file into --doc"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.render:
        results = json.loads(args.render.read_text())
        table = report.markdown(results)
        args.render.with_suffix(".md").write_text(table)
        report.update_doc(args.doc, table)
        return 0
    unknown = set(args.rows.split(",")) - set(ROWS) if args.rows else set()
    if unknown:
        _parser().error(f"unknown rows {', '.join(sorted(unknown))}: use {','.join(ROWS)}")
    variant = "quick" if args.quick else "full"
    started = time.monotonic()
    results = run(variant, args)
    path = publish(results, args.results, args.doc)
    _log(f"done in {time.monotonic() - started:.0f} s: {path} and {args.doc}")
    failed = [row["id"] for row in results["rows"] if row["status"].startswith("failed")]
    if failed:
        _log(f"failed rows: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
