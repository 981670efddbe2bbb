"""``siterecovery resync VM`` and ``siterecovery run``: resynchronize now; run the schedule.

Registered on the main app by :func:`register_resync_commands`. ``get_env`` turns the typer
context into the invocation's :class:`~siterecovery.cli.context.Env`.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

import typer

from siterecovery.cli import output
from siterecovery.cli.context import Env
from siterecovery.domain import parse_duration
from siterecovery.errors import InputError

if TYPE_CHECKING:
    from siterecovery.agent.embedded import EmbeddedAgent

GetEnv = Callable[[typer.Context], Env]

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON document for scripts.")]


def register_resync_commands(app: typer.Typer, get_env: GetEnv) -> None:
    """Add ``resync`` and ``run`` to ``app``."""

    @app.command()
    def resync(
        ctx: typer.Context,
        vm: Annotated[str, typer.Argument(help="A protected VM.")],
        full: Annotated[
            bool, typer.Option(help="Copy every disk whole (when replica data is damaged).")
        ] = False,
        json_out: JsonFlag = False,
    ) -> None:
        """Resynchronize a VM now: send only the blocks that differ from the replica."""
        env = get_env(ctx)
        protection = _protection(env)
        job, result = protection.resync(vm, full=full)
        if result is None:
            output.print_job(output.to_jsonable(job))
            return
        if json_out:
            output.print_json({"job": job.id, **result.figures()})
            return
        output.out.print(
            f"resync job {job.id[:8]} [{job.state}]: {result.blocks_compared} blocks compared, "
            f"{result.blocks_sent} sent ({output.size(result.bytes_sent)}, "
            f"{output.size(result.bytes_stored)} stored) in {result.duration_s:.2f} s; "
            f"recovery point {result.point.point_id}"
        )

    @app.command("run")
    def run_cmd(
        ctx: typer.Context,
        host: Annotated[
            str | None, typer.Option(help="Only this host's VMs (default: every VM).")
        ] = None,
        tick: Annotated[str, typer.Option(help="How often to look for due work.")] = "5s",
        once: Annotated[bool, typer.Option(help="Run what is due now, then exit.")] = False,
        threshold: Annotated[
            float, typer.Option(help="Resync when a disk's pending change passes this share.")
        ] = 0.5,
        maintenance: Annotated[
            bool,
            typer.Option(help="Prune and compact hourly and collect garbage daily "
                         "(retention from each VM's policy)."),
        ] = True,
    ) -> None:
        """Run due cycles, retries and resyncs on each policy's schedule, in the foreground."""
        from siterecovery.agent.loop import Outcome, Runner
        from siterecovery.replication.maintenance import (
            Maintenance,
            MaintenanceOutcome,
            MaintenancePlan,
        )

        tick_s = parse_duration(tick, what="tick")
        if not 1 <= tick_s <= 900:
            raise InputError(f"tick {tick!r} is out of range", hint="use 1s to 15m")
        protection = _protection(get_env(ctx), threshold)
        upkeep = (
            Maintenance(protection.db, protection.store, MaintenancePlan())
            if maintenance else None
        )  # fmt: skip
        runner = Runner(protection, host=host, maintenance=upkeep)

        def report(outcome: Outcome) -> None:
            mark = "[green]ok[/]" if outcome.ok else "[red]failed[/]"
            output.err.print(f"{outcome.vm} {outcome.action} {mark}: {outcome.summary}")

        def report_upkeep(done: MaintenanceOutcome) -> None:
            mark = "[green]ok[/]" if done.ok else "[red]failed[/]"
            output.err.print(f"store {done.operation} {done.vm or ''} {mark}: {done.summary}")

        if once:
            outcomes = runner.run_due()
            for outcome in outcomes:
                report(outcome)
            if any(not o.ok for o in outcomes):
                raise typer.Exit(1)
            return
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            runner.run_forever(
                stop, tick_s=float(tick_s), report=report, on_maintenance=report_upkeep
            )
        except KeyboardInterrupt:
            stop.set()


def _protection(env: Env, threshold: float = 0.5) -> EmbeddedAgent:
    from siterecovery.agent.embedded import EmbeddedAgent

    return EmbeddedAgent(
        env.db(), env.store(), env.settings.run_dir, resync_threshold=threshold
    )
