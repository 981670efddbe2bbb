"""``siterecovery failover``: drills, planned and unplanned failover, change point, commit.

Usage::

    siterecovery failover VM [VM...] --test|--planned|--unplanned [--point ID|latest|latest-app]
    siterecovery failover --all --unplanned
    siterecovery failover cleanup VM          end a drill, remove everything it made
    siterecovery failover change-point VM --point ID
    siterecovery failover commit VM
    siterecovery failover status VM           the replica, its point and hydration
    siterecovery failover network create|map|list

The group falls back to its ``run`` command when the first word is not a subcommand, so
``failover VM --test`` works next to ``failover cleanup VM``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer

from siterecovery.cli import output
from siterecovery.cli.context import Env, current_env
from siterecovery.cli.groups import default_command_group
from siterecovery.errors import InputError, SiteRecoveryError

_DefaultRunGroup = default_command_group("run")



JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON document for scripts.")]
WaitFlag = Annotated[
    bool, typer.Option("--wait", help="Through the vault API: wait for the job to end.")
]
WAIT_S = 600.0


def failover_app_factory(get_env: Callable[[], Env]) -> typer.Typer:
    """The ``failover`` Typer group; ``get_env`` returns the invocation's :class:`Env`."""
    app = typer.Typer(cls=_DefaultRunGroup, no_args_is_help=True,
                      help="Fail VMs over to the recovery site. `failover VM... --test|--planned|"
                      "--unplanned [--point ID|latest|latest-app]` (or --all), then cleanup "
                      "(drills), change-point and commit.")
    net_app = typer.Typer(help="Recovery networks and network mappings.", no_args_is_help=True)
    app.add_typer(net_app, name="network")

    def service(accel: str = "tcg") -> Any:
        from siterecovery.agent.embedded import EmbeddedFailover

        env = get_env()
        return EmbeddedFailover(env.db(), env.store(), env.settings.recovery_dir,
                               key_file=env.settings.key_file, run_dir=env.settings.run_dir,
                               accel=accel)  # fmt: skip

    @app.command("run", hidden=True)
    def run(
        vms: Annotated[list[str] | None, typer.Argument(help="VMs to fail over.")] = None,
        test: Annotated[bool, typer.Option("--test", help="A drill in the isolated network.")]
        = False,
        planned: Annotated[bool, typer.Option("--planned", help="Shut the source down first; "
                                              "zero data loss.")] = False,
        unplanned: Annotated[bool, typer.Option("--unplanned", help="The primary is lost.")]
        = False,
        point: Annotated[str, typer.Option(help="Point id, latest or latest-app.")] = "latest",
        all_vms: Annotated[bool, typer.Option("--all", help="Every protected VM.")] = False,
        full_restore: Annotated[bool, typer.Option(help="Copy the disks before starting.")]
        = False,
        expose: Annotated[list[str] | None, typer.Option(help="HOST_PORT:GUEST_PORT to expose "
                                                         "on the recovery host.")] = None,
        check_serial: Annotated[str | None, typer.Option(help="Drill check: console regex.")]
        = None,
        check_port: Annotated[int | None, typer.Option(help="Drill check: exposed host port "
                                                       "that must answer.")] = None,
        check_pattern: Annotated[str, typer.Option(help="Regex the port must answer.")] = "",
        append: Annotated[str | None, typer.Option(help="Replace the kernel command line.")]
        = None,
        accel: Annotated[str, typer.Option(help="tcg or kvm.")] = "tcg",
        wait: Annotated[bool, typer.Option("--wait", help="Through the vault API: wait for "
                                           "the jobs to end.")] = False,
        json_out: JsonFlag = False,
    ) -> None:
        """Fail VMs over: --test, --planned or --unplanned.

        Embedded: the replica starts on this host. Through the vault API: a job per VM for
        a recovery site's agent (a planned failover starts on the VM's own agent)."""
        from siterecovery.domain import FailoverKind
        from siterecovery.recovery.failover import FailoverOptions
        from siterecovery.recovery.replica import Probe, RecoveryMode

        if [test, planned, unplanned].count(True) != 1:
            raise InputError("say which failover: exactly one of --test, --planned, --unplanned")
        kind = FailoverKind.TEST if test else (
            FailoverKind.PLANNED if planned else FailoverKind.UNPLANNED)
        names = list(vms or [])
        facade = get_env().vault()
        if all_vms:
            names += [r["vm"] for r in facade.status(None) if r["vm"] not in names]
        if not names:
            raise InputError("name the VMs to fail over, or pass --all")
        probe = None
        if check_serial is not None:
            probe = Probe("serial", pattern=check_serial)
        elif check_port is not None:
            probe = Probe("port", pattern=check_pattern, port=check_port)
        if probe is not None and kind != FailoverKind.TEST:
            raise InputError("drill checks are for drills", hint="use them with --test")
        opts = FailoverOptions(point=point, append=append, expose=tuple(expose or ()),
                               probe=probe,
                               mode=RecoveryMode.FULL if full_restore else None)  # fmt: skip
        if facade.remote:
            requested = {vm: facade.request_failover(vm, str(kind), point, opts.details())
                         for vm in names}  # fmt: skip
            _report_jobs(requested, wait, json_out)
            return
        results = service(accel).failover_many(names, kind, opts)
        _report(results, json_out)

    @app.command("cleanup")
    def cleanup(vm: Annotated[str, typer.Argument(help="VM whose drill ends.")],
                wait: WaitFlag = False, json_out: JsonFlag = False) -> None:  # fmt: skip
        """End a drill: stop its replica and remove everything it made."""
        _report_jobs({vm: get_env().vault().follow_up(vm, "cleanup")}, wait, json_out)

    @app.command("change-point")
    def change_point(
        vm: Annotated[str, typer.Argument(help="A failed-over VM.")],
        point: Annotated[str, typer.Option(help="Point id, latest or latest-app.")],
        wait: WaitFlag = False,
        json_out: JsonFlag = False,
    ) -> None:
        """Restart the failed-over VM from another recovery point (before commit)."""
        job = get_env().vault().follow_up(vm, "change-point", point)
        _report_jobs({vm: job}, wait, json_out)

    @app.command("commit")
    def commit(vm: Annotated[str, typer.Argument(help="A failed-over VM.")],
               wait: WaitFlag = False, json_out: JsonFlag = False) -> None:  # fmt: skip
        """Commit the failover: the point can no longer change."""
        _report_jobs({vm: get_env().vault().follow_up(vm, "commit")}, wait, json_out)

    @app.command("status")
    def status(vm: Annotated[str, typer.Argument(help="A VM.")], json_out: JsonFlag = False
               ) -> None:
        """The VM's replica (and drill) on this recovery host, with hydration progress."""
        from siterecovery.recovery import instant

        svc = service()
        doc: dict[str, Any] = {}
        for label, test in (("failover", False), ("drill", True)):
            record = svc.replica(vm, test=test)
            if record is None:
                continue
            entry = output.to_jsonable(record)
            entry["running"] = instant.pid_alive(record.pid)
            if entry["running"] and record.mode == "instant":
                from pathlib import Path

                with_status = instant.hydration_status(Path(record.qmp), record.disks)
                entry["hydration"] = {d: {"done": a, "total": b, "local": c}
                                      for d, (a, b, c) in with_status.disks.items()}
            doc[label] = entry
        output.print_json(doc) if json_out else output.out.print_json(data=doc)

    @net_app.command("create")
    def net_create(
        name: Annotated[str, typer.Argument(help="Recovery network name.")],
        kind: Annotated[str, typer.Option(help="user (NAT out) or isolated (drills).")] = "user",
        subnet: Annotated[str, typer.Option(help="IPv4 CIDR the guests see.")] = "10.0.2.0/24",
    ) -> None:
        """Create a recovery network."""
        from siterecovery.recovery import network

        record = network.create_network(get_env().db(), name=name, kind=kind, subnet=subnet)
        output.out.print(f"recovery network {record.name} ({record.kind}, {record.subnet})")

    @net_app.command("map")
    def net_map(
        source: Annotated[str, typer.Argument(help="Source network name (as in VM NICs).")],
        recovery: Annotated[str, typer.Option(help="Recovery network for failover.")],
        test: Annotated[str, typer.Option(help="Isolated network for drills.")],
    ) -> None:
        """Map a source network to a recovery network and a drill network."""
        from siterecovery.recovery import network

        m = network.map_network(get_env().db(), source=source, recovery=recovery, test=test)
        output.out.print(f"{m.source_network} → {m.recovery_network.name} "
                         f"(drills: {m.test_network.name})")  # fmt: skip

    @net_app.command("list")
    def net_list(json_out: JsonFlag = False) -> None:
        """Recovery networks and mappings."""
        from siterecovery.recovery import network

        db = get_env().db()
        nets, maps = network.list_networks(db), network.list_mappings(db)
        if json_out:
            return output.print_json({"networks": nets, "mappings": maps})
        output.out.print(output.table("recovery networks", ["network", "kind", "subnet"],
                                      [(n.name, n.kind, n.subnet) for n in nets]))
        output.out.print(output.table("network mappings", ["source", "recovery", "drills"],
                                      [(m.source_network, m.recovery_network.name,
                                        m.test_network.name) for m in maps]))  # fmt: skip

    return app


def _report(results: dict[str, Any], json_out: bool) -> None:
    failed = {vm: r for vm, r in results.items() if isinstance(r, SiteRecoveryError)}
    if len(results) == 1 and failed and not json_out:
        raise next(iter(failed.values()))  # main() prints it with its hint and exit code
    for outcome in results.values():
        if not isinstance(outcome, SiteRecoveryError):
            outcome.process.detach()  # the replica outlives this command
    if json_out:
        output.print_json({vm: ({"error": r.describe()} if isinstance(r, SiteRecoveryError) else
                                {"job": r.job.id, "point": r.point.point_id, "pid": r.process.pid,
                                 "seconds_to_start": round(r.seconds_to_start, 3),
                                 "evidence": r.evidence})
                           for vm, r in results.items()})  # fmt: skip
    else:
        for vm, r in results.items():
            if isinstance(r, SiteRecoveryError):
                output.err.print(f"[red]{vm}: failed:[/] {r.describe()}", highlight=False)
                continue
            _print_job(r.job)
            output.out.print(f"{vm}: replica running (pid {r.process.pid}) from point "
                             f"{r.point.point_id} {r.seconds_to_start:.2f} s after the command; "
                             f"console {r.record.serial}")  # fmt: skip
    if failed:
        first = next(iter(failed.values()))
        raise first if len(results) == 1 else typer.Exit(first.exit_code)


def _report_jobs(requested: dict[str, dict[str, Any]], wait: bool, json_out: bool) -> None:
    """Print the jobs asked for (after they end, with ``wait``); exit 1 if one failed."""
    jobs = {vm: _wait_job(job) if wait else job for vm, job in requested.items()}
    if json_out:
        output.print_json(jobs)
    else:
        for job in jobs.values():
            output.print_job(job)
            if job["state"] == "pending":
                output.out.print(f"job {job['id'][:8]} is queued for the agents; follow it "
                                 f"with `siterecovery job {job['id'][:8]}`")  # fmt: skip
    if any(j["state"] in ("failed", "cancelled") for j in jobs.values()):
        raise typer.Exit(1)


def _wait_job(job: dict[str, Any]) -> dict[str, Any]:
    """Poll the job until it ends (embedded jobs have ended already)."""
    import time

    deadline = time.monotonic() + WAIT_S
    facade = current_env().vault()
    while job["state"] in ("pending", "running"):
        if time.monotonic() > deadline:
            raise InputError(f"job {job['id'][:8]} is still {job['state']} after {WAIT_S:.0f} s",
                             hint="follow it with `siterecovery jobs --watch`")  # fmt: skip
        time.sleep(0.5)
        job = facade.job(job["id"])
    return job


def _print_job(job: Any) -> None:
    rows = []
    for t in job.tasks:
        took = ""
        if t.started_at and t.ended_at:
            took = f"{(t.ended_at - t.started_at).total_seconds():.2f} s"
        rows.append((t.name, t.state, took, t.error or ""))
    title = f"job {job.id[:8]} {job.kind} [{job.state}]"
    output.out.print(output.table(title, ["task", "state", "duration", "error"], rows))
