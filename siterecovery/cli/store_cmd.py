"""``siterecovery store ...``: check and maintain the replica store.

Commands: ``verify [--deep]``, ``gc [--dry-run] [--min-age 1h]``, ``compact VM``,
``prune VM``; each takes ``--json`` (one JSON document on stdout, progress on stderr only).
The lead mounts the sub-app built by :func:`store_app_factory`, which opens the store from
the :class:`Settings` (``store_url`` and ``key_file``) when a command runs. Errors are
raised as siterecovery errors and mapped to exit codes by the CLI's ``main``; ``verify``
exits 1 when something is damaged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from siterecovery.cli import output
from siterecovery.domain import parse_duration
from siterecovery.settings import Settings
from siterecovery.store import ReplicaStore, StoreKeys, VerifyReport
from siterecovery.store.compaction import CompactionPolicy, CompactionReport, compact
from siterecovery.store.gc import GcReport, collect_garbage
from siterecovery.store.retention import PruneReport, RetentionPolicy, prune

__all__ = ["store_app_factory"]

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON document for scripts.")]
VmArg = Annotated[str, typer.Argument(help="The VM whose recovery points to work on.")]


def open_store(settings: Settings) -> ReplicaStore:
    """The replica store named by ``settings``, opened with its key file."""
    return ReplicaStore.open(settings.store_url, StoreKeys.load(settings.key_file))


def store_app_factory(get_settings: Callable[[], Settings]) -> typer.Typer:
    """The ``store`` sub-app; ``get_settings`` is called when a command runs."""
    app = typer.Typer(help="Check and maintain the replica store.", no_args_is_help=True)

    @app.command()
    def verify(
        deep: Annotated[
            bool, typer.Option("--deep", help="Also read every segment and chunk.")
        ] = False,
        json_out: JsonFlag = False,
    ) -> None:
        """Check every recovery point and the objects it needs; exit 1 if anything is
        damaged."""
        report = open_store(get_settings()).verify(deep=deep)
        if json_out:
            output.print_json(_verify_json(report))
        else:
            _print_verify(report)
        if not report.ok:
            raise typer.Exit(1)

    @app.command()
    def gc(
        dry_run: Annotated[
            bool, typer.Option("--dry-run", help="List what would be deleted; delete nothing.")
        ] = False,
        min_age: Annotated[
            str, typer.Option(help="Keep unreferenced objects younger than this (safety delay).")
        ] = "1h",
        json_out: JsonFlag = False,
    ) -> None:
        """Delete objects no recovery point needs (older than the safety delay)."""
        age = timedelta(seconds=parse_duration(min_age, what="minimum age"))
        store = open_store(get_settings())
        with _progress(json_out) as progress:
            report = collect_garbage(store, min_age=age, dry_run=dry_run, progress=progress)
        if json_out:
            output.print_json(_gc_json(report))
        else:
            _print_gc(report)

    @app.command(name="compact")
    def compact_cmd(
        vm: VmArg,
        max_chain: Annotated[
            int, typer.Option(min=1, help="Most segments a restore reads per disk.")
        ] = CompactionPolicy.max_chain,
        min_fold: Annotated[
            int, typer.Option(min=1, help="Fold the segments all points share from this many.")
        ] = CompactionPolicy.min_fold,
        json_out: JsonFlag = False,
    ) -> None:
        """Fold old delta segments of VM into new base images (points keep their ids)."""
        report = compact(open_store(get_settings()), vm, CompactionPolicy(max_chain, min_fold))
        if json_out:
            output.print_json(report)
        else:
            _print_compaction(report)

    @app.command(name="prune")
    def prune_cmd(
        vm: VmArg,
        retention: Annotated[str, typer.Option(help="Keep recovery points this long.")] = "24h",
        keep_all: Annotated[
            str, typer.Option(help="Keep every point this long; then one per hour.")
        ] = "1h",
        dry_run: Annotated[
            bool, typer.Option("--dry-run", help="List what would expire; delete nothing.")
        ] = False,
        json_out: JsonFlag = False,
    ) -> None:
        """Delete the recovery points of VM that its retention expires (data goes at gc)."""
        policy = RetentionPolicy(
            parse_duration(retention, what="retention", default_unit="h") / 3600,
            parse_duration(keep_all, what="keep-all window", default_unit="h") / 3600,
        )
        report = prune(open_store(get_settings()), vm, policy, dry_run=dry_run)
        if json_out:
            output.print_json(report)
        else:
            _print_prune(report)

    return app


# -- rendering ---------------------------------------------------------------------------------


def _verify_json(report: VerifyReport) -> dict[str, Any]:
    return {
        "ok": report.ok,
        "deep": report.deep,
        "points_checked": report.points_checked,
        "objects_checked": report.objects_checked,
        "damaged_points": [
            {"point": f"{d.vm}/{d.point_id}", "key": d.key, "problem": d.problem}
            for d in report.damaged_points
        ],
        "damaged_objects": [
            {"key": d.key, "problem": d.problem, "points": list(d.points)}
            for d in report.damaged_objects
        ],
        "affected_points": report.affected_points,
    }


def _print_verify(report: VerifyReport) -> None:
    kind = "deep" if report.deep else "quick"
    summary = (
        f"{kind} check: {report.points_checked} recovery points, {report.objects_checked} objects"
    )
    if report.ok:
        output.out.print(f"[green]OK[/] {summary}: nothing damaged", highlight=False)
        return
    rows = [[d.key, d.problem, f"{d.vm}/{d.point_id}"] for d in report.damaged_points]
    rows += [[d.key, d.problem, "\n".join(d.points)] for d in report.damaged_objects]
    output.out.print(output.table("Damaged objects", ["object", "problem", "points"], rows))
    output.out.print(
        f"[red]DAMAGED[/] {summary}: {len(report.affected_points)} recovery point(s) cannot "
        "be restored:\n  " + "\n  ".join(report.affected_points),
        highlight=False,
    )


def _gc_json(report: GcReport) -> dict[str, Any]:
    doc: dict[str, Any] = output.to_jsonable(report)
    doc["kept"] = report.kept
    return doc


def _print_gc(report: GcReport) -> None:
    verb = "would delete" if report.dry_run else "deleted"
    rows: list[list[Any]] = [
        ["recovery points", report.points],
        ["objects scanned", report.objects_scanned],
        ["kept: referenced", report.kept_referenced],
        ["kept: younger than the safety delay", report.kept_young],
        ["kept: written under a live lease", report.kept_leased],
        ["kept: chunks while a writer deduplicates", report.deferred_chunks],
        [verb, report.deleted],
        ["bytes freed" if not report.dry_run else "bytes to free", output.size(report.bytes_freed)],
        ["expired leases removed", report.leases_removed],
        ["temporary files removed", report.temp_files_removed],
    ]
    if report.dry_run and report.candidates:
        output.out.print(output.table("Would delete", ["object"], [[k] for k in report.candidates]))
    output.out.print(output.table("Garbage collection", ["", ""], rows))
    for warning in report.warnings:
        output.err.print(f"[yellow]warning:[/] {warning}", highlight=False)


def _print_compaction(report: CompactionReport) -> None:
    rows: list[list[Any]] = [
        ["new bases", len(report.bases_written)],
        ["blocks rewritten", report.blocks_rewritten],
        ["chunks stored", report.chunks_stored],
        ["points rebased", len(report.points_rewritten)],
        ["points changed meanwhile (left alone)", len(report.points_skipped)],
        ["longest chain before", report.longest_chain_before],
        ["longest chain after", report.longest_chain_after],
    ]
    output.out.print(output.table(f"Compaction of {report.vm}", ["", ""], rows))
    for warning in report.warnings:
        output.err.print(f"[yellow]warning:[/] {warning}", highlight=False)


def _print_prune(report: PruneReport) -> None:
    gone = report.expired if report.dry_run else report.deleted
    title = "Would expire" if report.dry_run else "Expired"
    output.out.print(output.table(f"{title} recovery points of {report.vm}", ["point"],
                                  [[p] for p in gone]))  # fmt: skip
    output.out.print(f"{len(report.kept)} recovery point(s) kept", highlight=False)


@contextmanager
def _progress(quiet: bool) -> Iterator[Callable[[str, int, int], None]]:
    """A GC progress callback drawing a Rich bar on stderr (nothing when ``quiet``)."""
    console = Console(stderr=True, quiet=quiet)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        tasks: dict[str, Any] = {}

        def update(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task("marking" if phase == "mark" else "deleting")
            bar.update(tasks[phase], completed=done, total=max(total, 1))

        yield update
