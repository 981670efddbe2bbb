"""``siterecovery job ID`` (``job show ID``) and ``siterecovery job cancel ID``.

``job`` is a group whose unknown first word (a job id) goes to ``show``, so ``job ID`` keeps
working. Both commands go through the invocation's vault (the API, or the embedded one).
Registered on the main app by :func:`register_job_commands`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer

from siterecovery.cli import output
from siterecovery.cli.context import Env
from siterecovery.cli.groups import default_command_group

GetEnv = Callable[[typer.Context], Env]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON document for scripts.")]
JobId = Annotated[str, typer.Argument(metavar="ID", help="Job id (a unique prefix works).")]


def register_job_commands(app: typer.Typer, get_env: GetEnv) -> None:
    """Add the ``job`` group (``show``, ``cancel``) to ``app``."""
    group = typer.Typer(cls=default_command_group("show"), no_args_is_help=True,
                        help="One job: show it (`job ID`), or cancel it.")  # fmt: skip
    app.add_typer(group, name="job")

    @group.command("show")
    def show(ctx: typer.Context, job_id: JobId, json_out: JsonFlag = False) -> None:
        """One job with its tasks."""
        record = get_env(ctx).vault().job(job_id)
        if json_out:
            return output.print_json(record)
        output.print_job(record)

    @group.command("cancel")
    def cancel(
        ctx: typer.Context,
        job_id: JobId,
        reason: Annotated[str | None, typer.Option(help="Why (kept in the job).")] = None,
        json_out: JsonFlag = False,
    ) -> None:
        """Cancel an open job: its lease ends and its VM goes where the job's kind leaves it
        safely (enable protection: unprotected, or error once it ran; resync: resync
        required). A running failover cannot be cancelled."""
        record = get_env(ctx).vault().cancel_job(job_id, reason)
        if json_out:
            return output.print_json(record)
        output.print_job(record)
        output.out.print(f"job {record['id'][:8]} cancelled")
