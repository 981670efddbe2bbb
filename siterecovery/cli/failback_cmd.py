"""``siterecovery failback`` and ``siterecovery reverse-replicate``: bring a committed VM home.

Usage::

    siterecovery failback VM --minimize-downtime|--full-download [--host H]
    siterecovery failback commit VM
    siterecovery reverse-replicate VM

They run here, on the host that holds both the running replica and the primary VM's images
(the embedded setup). Registered on the main app by :func:`register_failback_commands`;
``get_env`` turns the typer context into the invocation's :class:`~siterecovery.cli.context.Env`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer._click.core import Context as ClickContext  # typer 0.29 vendors click
from typer.core import TyperGroup

from siterecovery.cli import output
from siterecovery.cli.context import Env
from siterecovery.errors import InputError

if TYPE_CHECKING:
    from siterecovery.recovery.failback import FailbackOutcome, FailbackService

GetEnv = Callable[[typer.Context], Env]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON document for scripts.")]


class _DefaultRunGroup(TyperGroup):
    """A group whose unknown first word (a VM name or an option) goes to ``run``."""

    def parse_args(self, ctx: ClickContext, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


def register_failback_commands(app: typer.Typer, get_env: GetEnv) -> None:
    """Add the ``failback`` group and ``reverse-replicate`` to ``app``."""
    group = typer.Typer(
        cls=_DefaultRunGroup, no_args_is_help=True,
        help="Fail a committed VM back to its primary disks: `failback VM "
        "--minimize-downtime|--full-download`, then `failback commit VM`.",
    )  # fmt: skip
    app.add_typer(group, name="failback")

    @group.command("run", hidden=True)
    def run(
        ctx: typer.Context,
        vm: Annotated[str, typer.Argument(help="A VM whose failover is committed.")],
        minimize_downtime: Annotated[bool, typer.Option(
            "--minimize-downtime", help="Copy differing blocks while the replica runs, then "
            "stop it and copy the last changes.")] = False,
        full_download: Annotated[bool, typer.Option(
            "--full-download", help="Stop the replica and copy whole disks.")] = False,
        host: Annotated[str | None, typer.Option(
            help="The primary host to fail back to (default: the VM's own).")] = None,
        accel: Annotated[str, typer.Option(help="tcg or kvm, for the primary VM.")] = "tcg",
        json_out: JsonFlag = False,
    ) -> None:  # fmt: skip
        """Fail a committed VM back to its primary disks and start it there."""
        from siterecovery.recovery.failback import FailbackMethod

        if minimize_downtime == full_download:
            raise InputError("choose exactly one of --minimize-downtime and --full-download")
        env = get_env(ctx)
        _check_host(env, vm, host)
        method = (FailbackMethod.MINIMIZE_DOWNTIME if minimize_downtime
                  else FailbackMethod.FULL_DOWNLOAD)  # fmt: skip
        outcome = _service(env, accel).failback(vm, method)
        _report(vm, outcome, json_out)

    @group.command("commit")
    def commit(
        ctx: typer.Context,
        vm: Annotated[str, typer.Argument(help="A failed-back VM.")],
        json_out: JsonFlag = False,
    ) -> None:
        """Commit the failback: the primary VM is the VM again; the replica's files go."""
        job = _service(get_env(ctx), "tcg").commit(vm)
        if json_out:
            output.print_json({"job": job.id, "state": str(job.state)})
            return
        output.out.print(f"failback of {vm} committed (job {job.id[:8]}); next: "
                         f"`siterecovery reverse-replicate {vm}`")  # fmt: skip

    @app.command("reverse-replicate")
    def reverse_replicate(
        ctx: typer.Context,
        vm: Annotated[str, typer.Argument(help="A VM whose failback is committed.")],
        json_out: JsonFlag = False,
    ) -> None:
        """Protect the failed-back VM again: ship only what differs from the newest point.

        Embedded: runs the job now. Through the vault API: queues it for the VM's agent.
        """
        job, figures = get_env(ctx).vault().reverse_replicate(vm)
        if json_out:
            output.print_json({"job": job["id"], "state": job["state"], **figures})
            return
        if not figures:
            output.out.print(f"reverse replication job {job['id'][:8]} queued for the agent "
                             f"of {vm}'s host; follow it with `siterecovery job "
                             f"{job['id'][:8]}`")  # fmt: skip
            return
        output.out.print(
            f"reverse replication job {job['id'][:8]} [{job['state']}]: "
            f"{figures['blocks_compared']} blocks compared, {figures['blocks_sent']} sent "
            f"({output.size(figures['bytes_sent'])}); {vm} is protected, recovery point "
            f"{figures['point']}"
        )


def _service(env: Env, accel: str) -> FailbackService:
    from siterecovery.agent.embedded import EmbeddedFailover
    from siterecovery.recovery.failback import FailbackService

    failover = EmbeddedFailover(env.db(), env.store(), env.settings.recovery_dir,
                               key_file=env.settings.key_file, run_dir=env.settings.run_dir,
                               accel=accel)  # fmt: skip
    return FailbackService(env.db(), failover, accel=accel, detach=True)


def _check_host(env: Env, vm: str, host: str | None) -> None:
    from siterecovery.vault import service

    if host is None:
        return
    recorded = service.get_vm(env.db(), name=vm).host
    if host != recorded:
        raise InputError(
            f"VM {vm} lives on host {recorded}, not {host}: failback to another host is not "
            "supported yet", hint=f"fail back to {recorded} (omit --host)",
        )  # fmt: skip


def _report(vm: str, outcome: FailbackOutcome, json_out: bool) -> None:
    doc: dict[str, Any] = {"job": outcome.job.id, "method": str(outcome.method),
                           "pid": outcome.primary.pid, **outcome.figures}  # fmt: skip
    if json_out:
        output.print_json(doc)
        return
    first, final = outcome.figures["first_pass"], outcome.figures["final_pass"]
    if outcome.first_pass:
        copied = output.size(first["bytes_copied"])
        output.out.print(f"while the replica ran: {first['blocks_compared']} blocks compared, "
                         f"{first['blocks_copied']} copied ({copied})")  # fmt: skip
    output.out.print(f"replica stopped: {final['blocks_copied']} blocks copied "
                     f"({output.size(final['bytes_copied'])}); downtime "
                     f"{outcome.downtime_s:.2f} s")  # fmt: skip
    output.out.print(f"{vm} runs on the primary again (pid {outcome.primary.pid}); check it, "
                     f"then `siterecovery failback commit {vm}`")  # fmt: skip
