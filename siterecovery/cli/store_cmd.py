"""``siterecovery store ...``: check and maintain the replica store and its keys.

Commands: ``verify [--deep] [--repair-plan] [--mark-resync]``, ``gc [--dry-run]
[--min-age 1h]``, ``compact VM``, ``prune VM``, and ``key show | export | passphrase |
recover``; each takes ``--json`` where it prints a report (one JSON document on stdout,
progress on stderr only). The lead mounts the sub-app built by :func:`store_app_factory`,
which opens the store from the :class:`Settings` (``store_url`` and ``key_file``) when a
command runs, through a short retry policy (:data:`CLI_RETRY`). Errors are raised as
siterecovery errors and mapped to exit codes by the CLI's ``main``; ``verify`` exits 1 when
something is damaged.

Passphrases never come from a flag value: :func:`read_passphrase` takes them from a
``--passphrase-file``, else ``$SITERECOVERY_PASSPHRASE``, else an interactive prompt.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from siterecovery.cli import output
from siterecovery.domain import parse_duration
from siterecovery.errors import NotFoundError, SiteRecoveryError
from siterecovery.settings import Settings
from siterecovery.store import ReplicaStore, StoreKeys, VerifyReport
from siterecovery.store.backend import Backend, open_backend
from siterecovery.store.compaction import CompactionPolicy, CompactionReport, compact
from siterecovery.store.errors import PassphraseRequired, StoreInputError
from siterecovery.store.gc import GcReport, collect_garbage
from siterecovery.store.keycopy import find_key_copy, recover_keys
from siterecovery.store.keys import PASSPHRASE_ENV, inspect_key_file
from siterecovery.store.keywrap import check_new_passphrase
from siterecovery.store.repair import RepairAction, damaged_vms, repair_plan
from siterecovery.store.retention import PruneReport, RetentionPolicy, prune
from siterecovery.store.wrappers import RetryPolicy, wrap_backend

__all__ = [
    "CLI_RETRY",
    "NEW_PASSPHRASE_ENV",
    "load_keys",
    "open_store",
    "read_passphrase",
    "store_app_factory",
]

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON document for scripts.")]
VmArg = Annotated[str, typer.Argument(help="The VM whose recovery points to work on.")]
PassphraseFile = Annotated[
    Path | None,
    typer.Option(
        "--passphrase-file", exists=True, dir_okay=False,
        help=f"Read the passphrase from the first line of this file (else ${PASSPHRASE_ENV}, "
        "else a prompt).",
    ),
]  # fmt: skip

#: Store operations of a CLI command: 3 attempts, at most about 3 s of waiting in all, so a
#: brief outage does not fail a command and a real one fails it fast.
CLI_RETRY = RetryPolicy(attempts=3, base_delay=1.0, max_delay=2.0, multiplier=2.0, jitter=0.2)
#: Where `store key passphrase` takes the new passphrase from when no file is given.
NEW_PASSPHRASE_ENV = "SITERECOVERY_NEW_PASSPHRASE"


def _cli_wrap(backend: Backend) -> Backend:
    return wrap_backend(backend, retry=CLI_RETRY)


def read_passphrase(
    file: Path | None, *, what: str, confirm: bool = False, env: str = PASSPHRASE_ENV
) -> str:
    """A passphrase from ``file`` (its first line), else ``$env``, else a hidden prompt
    (asked twice when ``confirm``). ``PassphraseRequired`` when none can be had."""
    if file is not None:
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise StoreInputError(f"cannot read passphrase file {file}: {exc.strerror}") from exc
        if not lines or not lines[0]:
            raise StoreInputError(f"passphrase file {file} is empty")
        return lines[0]
    if os.environ.get(env):
        return os.environ[env]
    try:
        answer = typer.prompt(what, hide_input=True, confirmation_prompt=confirm)
    except (typer.Abort, click.exceptions.Abort) as exc:  # EOF on stdin: no one to ask
        raise PassphraseRequired(f"no passphrase given for {what.lower()}") from exc
    return str(answer)


def load_keys(path: Path, passphrase_file: Path | None = None) -> StoreKeys:
    """The keys of the key file at ``path``; a protected one is unlocked with the passphrase
    from :func:`read_passphrase` (asked only then)."""
    return StoreKeys.load(
        path, lambda: read_passphrase(passphrase_file, what=f"Passphrase of {path}")
    )


def open_store(settings: Settings, passphrase_file: Path | None = None) -> ReplicaStore:
    """The replica store named by ``settings``, opened with its key file, retrying
    unavailable store operations on :data:`CLI_RETRY`."""
    keys = load_keys(settings.key_file, passphrase_file)
    return ReplicaStore.open(settings.store_url, keys, wrap=_cli_wrap)


def store_app_factory(get_settings: Callable[[], Settings]) -> typer.Typer:
    """The ``store`` sub-app; ``get_settings`` is called when a command runs."""
    app = typer.Typer(help="Check and maintain the replica store.", no_args_is_help=True)

    @app.command()
    def verify(
        deep: Annotated[
            bool, typer.Option("--deep", help="Also read every segment and chunk.")
        ] = False,
        plan: Annotated[
            bool,
            typer.Option("--repair-plan", help="Say which resyncs repair each damaged object."),
        ] = False,
        mark: Annotated[
            bool,
            typer.Option(
                "--mark-resync", help="Mark every protected VM with damaged data resync required."
            ),
        ] = False,
        json_out: JsonFlag = False,
    ) -> None:
        """Check every recovery point and the objects it needs; exit 1 if anything is
        damaged."""
        settings = get_settings()
        store = open_store(settings)
        report = store.verify(deep=deep)
        marked = _mark_resync(settings, store, report) if mark and not report.ok else None
        if json_out:
            doc = _verify_json(report)
            if plan:
                doc["repair_plan"] = [_action_json(a) for a in repair_plan(report)]
            if marked is not None:
                doc["resync"] = marked
            output.print_json(doc)
        else:
            _print_verify(report, plan=plan, marked=marked)
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

    app.add_typer(_key_app(get_settings), name="key")
    return app


def _mark_resync(
    settings: Settings, store: ReplicaStore, report: VerifyReport
) -> dict[str, dict[str, str]]:
    """Mark each VM with damaged data *resync required* in the vault; VMs the vault does not
    protect, or whose state forbids it, are listed as skipped with the reason."""
    from siterecovery.agent.embedded import EmbeddedAgent
    from siterecovery.cli.context import Env

    env = Env(settings)
    result: dict[str, dict[str, str]] = {"marked": {}, "skipped": {}}
    try:
        service = EmbeddedAgent(env.db(), store, settings.run_dir)
        for vm, reason in damaged_vms(report).items():
            try:
                service.require_resync(vm, reason)
            except NotFoundError as exc:
                result["skipped"][vm] = exc.message
            except SiteRecoveryError as exc:  # e.g. failed over: resync is not possible now
                result["skipped"][vm] = exc.message
            else:
                result["marked"][vm] = reason
    finally:
        env.close()
    return result


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


def _action_json(action: RepairAction) -> dict[str, Any]:
    doc: dict[str, Any] = output.to_jsonable(action)
    doc["vms"] = list(action.vms)
    doc["advice"] = action.advice
    return doc


def _print_verify(
    report: VerifyReport, *, plan: bool = False, marked: dict[str, dict[str, str]] | None = None
) -> None:
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
    if plan:
        rows = [[a.key, ", ".join(a.resync) or ", ".join(a.vms), a.advice]
                for a in repair_plan(report)]  # fmt: skip
        output.out.print(output.table("Repair plan", ["object", "resync", "what it does"], rows))
    for vm, reason in (marked or {}).get("marked", {}).items():
        output.out.print(f"{vm}: marked resync required ({reason})", highlight=False)
    for vm, why in (marked or {}).get("skipped", {}).items():
        output.err.print(f"[yellow]{vm}: not marked[/]: {why}", highlight=False)


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


# -- keys --------------------------------------------------------------------------------------

ToFile = Annotated[Path, typer.Option("--to", dir_okay=False, help="The key file to write.")]
ProtectFlag = Annotated[
    bool,
    typer.Option(
        "--protect/--no-protect",
        help="Wrap the written key file under the passphrase (default: plain, mode 0600).",
    ),
]


def _key_app(get_settings: Callable[[], Settings]) -> typer.Typer:
    """``store key``: show, back up, passphrase-protect and recover the store keys."""
    key = typer.Typer(help="The store keys: show, export, passphrase, recover.",
                      no_args_is_help=True)  # fmt: skip

    @key.command("show")
    def show(json_out: JsonFlag = False) -> None:
        """Show the key file's fingerprint and wrapping, and the store's copy (no secret)."""
        doc = _key_status(get_settings())
        if json_out:
            output.print_json(doc)
            return
        rows = [[name.replace("_", " "), value] for name, value in doc.items()]
        output.out.print(output.table("Store keys", ["", ""], rows))
        if doc["store_copy"] is None:
            output.err.print(
                "[yellow]warning:[/] the store holds no passphrase-protected copy of the keys: "
                "losing the key file loses the store; run `siterecovery store key passphrase`",
                highlight=False,
            )

    @key.command("export")
    def export(to: ToFile, protect: ProtectFlag = False,
               passphrase_file: PassphraseFile = None) -> None:  # fmt: skip
        """Write a backup of the key file to FILE (keep it off-site); refuses to overwrite."""
        settings = get_settings()
        _refuse_existing(to)
        keys = load_keys(settings.key_file, passphrase_file)
        phrase = None
        if protect:
            phrase = read_passphrase(
                passphrase_file, what="Passphrase for the backup", confirm=True
            )
        keys.save(to, passphrase=phrase)
        if StoreKeys.load(to, phrase) != keys:  # prove the backup reads back
            raise StoreInputError(f"the backup {to} did not read back", hint="try another path")
        kind = "passphrase-protected" if protect else "plain"
        output.out.print(f"exported keys {keys.fingerprint} to {to} ({kind}, mode 0600)")

    @key.command("passphrase")
    def passphrase(passphrase_file: PassphraseFile = None) -> None:
        """Set or change the passphrase of the store's copy of the keys (and of the key file,
        if it is protected). The new passphrase comes from --passphrase-file, else
        $SITERECOVERY_NEW_PASSPHRASE, else a prompt."""
        settings = get_settings()
        protected = inspect_key_file(settings.key_file).protected
        keys = load_keys(settings.key_file)
        new = read_passphrase(passphrase_file, what="New passphrase", confirm=True,
                              env=NEW_PASSPHRASE_ENV)  # fmt: skip
        check_new_passphrase(new)
        store = ReplicaStore.open(settings.store_url, keys, wrap=_cli_wrap)
        copy = store.put_key_copy(new)
        output.out.print(f"stored the keys {keys.fingerprint} wrapped under the passphrase: {copy}")
        if protected:
            keys.save(settings.key_file, passphrase=new, replace=True)
            output.out.print(f"re-wrapped {settings.key_file} under the new passphrase")

    @key.command("recover")
    def recover(
        to: ToFile,
        store: Annotated[
            str | None, typer.Option("--store", help="Store URL (default: this vault's store).")
        ] = None,
        passphrase_file: PassphraseFile = None,
        protect: ProtectFlag = False,
    ) -> None:
        """Recover the key file from the store's passphrase-protected copy into FILE."""
        url = store or get_settings().store_url
        _refuse_existing(to)
        phrase = read_passphrase(passphrase_file, what=f"Passphrase of the keys in {url}")
        keys = recover_keys(url, phrase, wrap=_cli_wrap)
        keys.save(to, passphrase=phrase if protect else None)
        output.out.print(
            f"recovered keys {keys.fingerprint} of {url} into {to}; they open the store"
        )

    return key


def _refuse_existing(path: Path) -> None:
    if path.exists():
        raise StoreInputError(
            f"{path} already exists", hint="choose another path; key files are never overwritten"
        )


def _key_status(settings: Settings) -> dict[str, Any]:
    info = inspect_key_file(settings.key_file)
    fingerprint = info.fingerprint or StoreKeys.load(settings.key_file).fingerprint  # version 1
    wrapping = info.wrapping
    if info.kdf is not None:
        wrapping += f" (scrypt n={info.kdf.n} r={info.kdf.r} p={info.kdf.p})"
    mode = settings.key_file.stat().st_mode & 0o777
    try:
        copy = find_key_copy(_cli_wrap(open_backend(settings.store_url)), fingerprint)
        store_copy: str | None = copy.key if copy is not None else None
    except SiteRecoveryError as exc:
        store_copy = f"unknown: {exc.message}"
    return {
        "key_file": str(settings.key_file),
        "mode": f"{mode:04o}",
        "wrapping": wrapping,
        "fingerprint": fingerprint,
        "data_key": info.has_data_key,
        "store": settings.store_url,
        "store_copy": store_copy,
    }
