"""The ``siterecovery`` command.

Thin by design: each command parses its flags, calls a service, and prints a table or, with
``--json``, one JSON document. Errors are mapped to exit codes in one place (:func:`main`):
every :class:`SiteRecoveryError` prints its message and hint and exits with its ``exit_code``
(2 bad input, 3 not found, 4 store, 5 hypervisor, 6 vault, 7 replication/recovery).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from siterecovery import __version__
from siterecovery.cli import failover_cmd, output
from siterecovery.cli.context import Env, current_env
from siterecovery.cli.failback_cmd import register_failback_commands
from siterecovery.cli.job_cmd import register_job_commands
from siterecovery.cli.resync_cmd import register_resync_commands
from siterecovery.cli.service_cmd import register_service_commands, replace_resync
from siterecovery.cli.store_cmd import store_app_factory
from siterecovery.domain import parse_duration
from siterecovery.errors import InputError, SiteRecoveryError
from siterecovery.settings import Settings

app = typer.Typer(
    name="siterecovery",
    help="Open-source site recovery for virtual machines: protect, replicate, fail over.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
policy_app = typer.Typer(help="Replication policies.", no_args_is_help=True)
vault_app = typer.Typer(help="The vault: create it, serve its API.", no_args_is_help=True)
vm_app = typer.Typer(help="VMs known to the vault.", no_args_is_help=True)
app.add_typer(policy_app, name="policy")
app.add_typer(vault_app, name="vault")
app.add_typer(vm_app, name="vm")
app.add_typer(store_app_factory(lambda: current_env().settings), name="store")

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON document for scripts.")]
WorkdirOption = Annotated[
    Path | None,
    typer.Option(
        "--workdir", "-w", envvar="SITERECOVERY_WORKDIR",
        help="Work directory of the embedded vault and store "
        "(default: the user's data directory).",
    ),
]  # fmt: skip


def _env(ctx: typer.Context) -> Env:
    env = ctx.obj
    if not isinstance(env, Env):
        raise InputError("internal: no settings")
    return env


def _show_version(value: bool) -> None:
    if value:
        print(f"siterecovery {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    workdir: WorkdirOption = None,
    version: Annotated[
        bool,
        typer.Option("--version", help="Show the version.", callback=_show_version, is_eager=True),
    ] = False,
    vault: Annotated[
        str | None,
        typer.Option(
            "--vault",
            envvar="SITERECOVERY_VAULT",
            metavar="URL",
            help="Talk to this vault's API (https); the token comes from "
            "$SITERECOVERY_TOKEN or WORKDIR/admin.token.",
        ),
    ] = None,
    ca: Annotated[
        Path | None,
        typer.Option(
            "--ca",
            metavar="FILE",
            help="CA certificate the vault's TLS is pinned to (default: WORKDIR/pki/ca.pem).",
        ),
    ] = None,
) -> None:
    env = Env(Settings.load(workdir), vault_url=vault, ca_file=ca)
    ctx.obj = env
    ctx.call_on_close(env.close)


# -- demo ----------------------------------------------------------------------------------


@app.command()
def demo(
    ctx: typer.Context,
    keep: Annotated[bool, typer.Option(help="Keep the demo's work directory.")] = False,
    cycles: Annotated[int, typer.Option(min=1, max=100, help="Delta cycles to run.")] = 4,
    interval: Annotated[
        str, typer.Option(help="Time between cycles (the demo's short stand-in for 30s).")
    ] = "4s",
    accel: Annotated[str | None, typer.Option(help="tcg or kvm (default: probe).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the guest's records (0: random).")] = 0,
    json_out: JsonFlag = False,
) -> None:
    """Run the whole DR loop on a tiny real guest and verify the replica, byte for byte.

    Starts a QEMU VM that writes records, protects it, replicates it, loses the primary,
    fails over to the latest recovery point, boots the replica and checks its data.
    Uses WORKDIR/demo (removed at the end unless --keep).
    """
    from rich.console import Console

    from siterecovery.demo import DemoOptions, run_demo

    if accel not in (None, "tcg", "kvm"):
        raise InputError(f"unknown accelerator {accel!r}", hint="use tcg or kvm")
    interval_s = parse_duration(interval, what="interval")
    if not 1 <= interval_s <= 900:
        raise InputError(f"interval {interval!r} is out of range", hint="use 1s to 15m")
    options = DemoOptions(
        workdir=_env(ctx).settings.workdir / "demo", keep=keep, cycles=cycles,
        interval_s=float(interval_s), accel=accel, seed=seed,
    )  # fmt: skip
    console = Console(stderr=True, quiet=True) if json_out else output.out
    summary = run_demo(options, console=console)
    if json_out:
        output.print_json(summary.to_json())
    if not summary.verified:
        raise typer.Exit(1)


# -- vault and inventory ---------------------------------------------------------------------


@vault_app.command("init")
def vault_init(
    ctx: typer.Context,
    store: Annotated[
        str | None, typer.Option(help="Replica store URL (default: file://WORKDIR/store).")
    ] = None,
    encrypt: Annotated[
        bool,
        typer.Option(
            help="Encrypt data at rest (AES-256-GCM), the default; --no-encrypt leaves the "
            "replicated disks readable by anyone who can read the store.",
        ),
    ] = True,
    passphrase: Annotated[
        bool,
        typer.Option(
            help="Keep a passphrase-protected copy of the keys in the store, so they can be "
            "recovered with the passphrase if the key file is lost "
            "($SITERECOVERY_PASSPHRASE, --passphrase-file, or a prompt).",
        ),
    ] = False,
    passphrase_file: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="Read the passphrase from this file."),
    ] = None,
) -> None:
    """Create the embedded vault (SQLite), the replica store (encrypted) and its key file."""
    from siterecovery.cli.store_cmd import read_passphrase
    from siterecovery.store.backend import open_backend
    from siterecovery.store.keywrap import check_new_passphrase
    from siterecovery.workdir import UNENCRYPTED_WARNING, init_workdir

    base = _env(ctx).settings
    settings = Settings.embedded(base.workdir, store_url=store)
    if settings.key_file.exists():
        raise InputError(
            f"a vault already exists in {settings.workdir}",
            hint="use another --workdir, or remove that directory to start over",
        )
    open_backend(settings.store_url)  # a bad URL is refused before anything is asked
    phrase = None
    if passphrase or passphrase_file is not None:  # asked before anything is created
        phrase = check_new_passphrase(
            read_passphrase(passphrase_file, what="Passphrase for the store keys", confirm=True)
        )
    init_workdir(settings, encrypted=encrypt, passphrase=phrase)
    output.out.print(f"vault: {settings.vault_url}\nstore: {settings.store_url}"
                     f" ({'encrypted' if encrypt else 'not encrypted'})")  # fmt: skip
    if not encrypt:
        output.warn(UNENCRYPTED_WARNING)
    output.out.print(
        f"[bold]back up {settings.key_file}[/] (`siterecovery store key export`): without it"
        + (" or the passphrase" if phrase else "")
        + " the replica store cannot be read"
    )
    if phrase is None:
        output.out.print(
            "tip: `siterecovery store key passphrase` keeps a passphrase-protected copy of the "
            "keys in the store"
        )


@vm_app.command("register")
def vm_register(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="VM name in the vault.")],
    qmp: Annotated[Path, typer.Option(help="The VM's QMP unix socket.")],
    host: Annotated[str, typer.Option(help="Host name in the vault.")] = "localhost",
    site: Annotated[str, typer.Option(help="Primary site name.")] = "primary",
) -> None:
    """Register a running QEMU VM (started with -qmp unix:PATH,server=on,wait=off)."""
    from siterecovery.agent.embedded import EmbeddedAgent
    from siterecovery.vault import service
    from siterecovery.vault.models import SiteRole

    env = _env(ctx)
    service.ensure_site(env.db(), name=site, role=SiteRole.PRIMARY)
    service.ensure_host(env.db(), name=host, site=site)
    protection = EmbeddedAgent(env.db(), env.store(), env.settings.run_dir)
    record = protection.register_vm(host=host, name=name, qmp_path=qmp.resolve(), config={})
    output.out.print(f"registered VM {record.name} with disks {[d.name for d in record.disks]}")


@vm_app.command("list")
def vm_list(ctx: typer.Context, json_out: JsonFlag = False) -> None:
    """VMs registered in the vault, with their protection state."""
    vms = _env(ctx).vault().list_vms()
    if json_out:
        return output.print_json(vms)
    rows = [(v["name"], v["host"], v["state"], ", ".join(f"{d['name']} {output.size(d['size'])}"
             for d in v["disks"])) for v in vms]  # fmt: skip
    output.out.print(output.table("VMs", ["VM", "host", "state", "disks"], rows))


# -- policies --------------------------------------------------------------------------------


@policy_app.command("create")
def policy_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Policy name.")],
    frequency: Annotated[str, typer.Option(help="Copy frequency: 30s, 5m or 15m.")] = "30s",
    retention: Annotated[str, typer.Option(help="Recovery point retention, e.g. 24h.")] = "24h",
    app_consistent: Annotated[
        str, typer.Option(help="App-consistent snapshot frequency, e.g. 4h (0: off).")
    ] = "0",
    resync_window: Annotated[str, typer.Option(help="Off-hours resync window.")] = "18:30-06:00",
    encryption: Annotated[bool, typer.Option(help="Encrypt replicated data.")] = False,
) -> None:
    """Create a replication policy."""
    retention_s = parse_duration(retention, what="retention", default_unit="h")
    app_s = parse_duration(app_consistent, what="app-consistent frequency", default_unit="h")
    for what, seconds in (("retention", retention_s), ("app-consistent frequency", app_s)):
        if seconds % 3600:
            raise InputError(f"{what} must be whole hours", hint="e.g. 24h")
    record = _env(ctx).vault().create_policy({
        "name": name, "copy_frequency_s": parse_duration(frequency, what="copy frequency"),
        "retention_h": retention_s // 3600, "app_consistent_h": app_s // 3600,
        "resync_window": resync_window, "encryption": encryption,
    })  # fmt: skip
    output.out.print(f"policy {record['name']} created")


@policy_app.command("list")
def policy_list(ctx: typer.Context, json_out: JsonFlag = False) -> None:
    """Replication policies."""
    policies = _env(ctx).vault().list_policies()
    if json_out:
        return output.print_json(policies)
    rows = [(p["name"], f"{p['copy_frequency_s']}s", f"{p['retention_h']}h",
             f"{p['app_consistent_h']}h" if p["app_consistent_h"] else "off",
             p["resync_window"], "yes" if p["encryption"] else "no")
            for p in policies]  # fmt: skip
    columns = ["policy", "frequency", "retention", "app-consistent", "resync window", "encrypted"]
    output.out.print(output.table("policies", columns, rows))


# -- protection and replication --------------------------------------------------------------


@app.command()
def protect(
    ctx: typer.Context,
    vm: Annotated[str, typer.Argument(help="A registered VM.")],
    policy: Annotated[str, typer.Option(help="Replication policy.")],
) -> None:
    """Enable protection: the enable protection job, with the initial replication.

    Embedded: runs the job now. Through the vault API: queues it for the VM's agent.
    """
    job, summary = _env(ctx).vault().protect(vm, policy)
    output.print_job(job)
    output.out.print(summary or f"the agent of the VM's host runs job {job['id'][:8]}; "
                     f"follow it with `siterecovery job {job['id'][:8]}`")  # fmt: skip


@app.command()
def unprotect(
    ctx: typer.Context,
    vm: Annotated[str, typer.Argument(help="A protected VM.")],
    json_out: JsonFlag = False,
) -> None:
    """Disable protection: stop change tracking and forget the VM's recovery point records.

    The replica data is left to the store's retention and garbage collection. Refused while
    a job of the VM runs or a failover is in progress. Embedded: runs the job now; through
    the vault API: queues it for the VM's agent.
    """
    job = _env(ctx).vault().unprotect(vm)
    if json_out:
        return output.print_json(job)
    output.print_job(job)


@app.command()
def replicate(
    ctx: typer.Context,
    vm: Annotated[str, typer.Argument(help="A protected VM.")],
    count: Annotated[int, typer.Option(min=1, help="Cycles to run.")] = 1,
    every: Annotated[str, typer.Option(help="Pause between cycles.")] = "30s",
    json_out: JsonFlag = False,
) -> None:
    """Run delta replication cycles now, embedded (agents run them on the policy's schedule)."""
    import time

    from siterecovery.agent.embedded import EmbeddedAgent

    env = _env(ctx)
    pause = parse_duration(every, what="pause")
    service_ = EmbeddedAgent(env.db(), env.store(), env.settings.run_dir)
    figures = []
    for n in range(count):
        if n:
            time.sleep(pause)
        result = service_.replicate(vm)
        figures.append({"point": result.point.point_id, **result.figures()})
        if not json_out:
            output.out.print(
                f"point {result.point.point_id}: {output.size(result.bytes_read)} read, "
                f"{output.size(result.bytes_shipped)} shipped in {result.duration_s:.2f} s"
            )
    if json_out:
        output.print_json(figures)


@app.command()
def status(
    ctx: typer.Context,
    vm: Annotated[str | None, typer.Argument(help="One VM (default: all).")] = None,
    json_out: JsonFlag = False,
) -> None:
    """Replicated VMs with state, health and its reasons, RPO, last cycle, and the last error
    with its class, attempts and next retry time."""
    records = _env(ctx).vault().status(vm)
    if json_out:
        return output.print_json(records)
    output.out.print(output.status_table(records))


@app.command("points")
def points_cmd(
    ctx: typer.Context,
    vm: Annotated[str, typer.Argument(help="A protected VM.")],
    json_out: JsonFlag = False,
) -> None:
    """Recovery points of a VM, oldest first."""
    records = _env(ctx).vault().points(vm)
    if json_out:
        return output.print_json(records)
    rows = [(p["point_id"], output.when(p["created_at"]), p["consistency"],
             output.size(p["bytes_shipped"])) for p in records]  # fmt: skip
    output.out.print(
        output.table(
            f"recovery points of {vm}", ["point", "created (UTC)", "consistency", "shipped"], rows
        )
    )


@app.command()
def jobs(
    ctx: typer.Context,
    vm: Annotated[str | None, typer.Option(help="Only this VM's jobs.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 20,
    watch: Annotated[
        bool, typer.Option("--watch", help="Refresh the table until interrupted (Ctrl-C).")
    ] = False,
    every: Annotated[float, typer.Option(min=0.2, max=60, help="Seconds between refreshes.")] = 2.0,
    json_out: JsonFlag = False,
) -> None:
    """Jobs, newest first."""
    if watch and json_out:
        raise InputError("--watch draws a live table: it cannot be combined with --json",
                         hint="poll `siterecovery jobs --json` instead")  # fmt: skip
    vault = _env(ctx).vault()
    if watch:
        return output.watch(lambda: output.jobs_table(vault.jobs(vm, limit)), every)
    records = vault.jobs(vm, limit)
    if json_out:
        return output.print_json(records)
    output.out.print(output.jobs_table(records))


# -- recovery --------------------------------------------------------------------------------


@app.command()
def restore(
    ctx: typer.Context,
    vm: Annotated[str, typer.Argument(help="A protected VM.")],
    to: Annotated[
        Path, typer.Option(help="Directory for the disk images: a new one, or empty.")
    ],
    point: Annotated[str, typer.Option(help="Recovery point id, or latest.")] = "latest",
    fmt: Annotated[str, typer.Option("--format", help="raw or qcow2.")] = "qcow2",
) -> None:
    """Export a recovery point's disks as images, every byte verified.

    The images are written into a new (or empty) directory, never over existing files.
    """
    from siterecovery.recovery.failover import check_restore_dir, materialize
    from siterecovery.vault import points

    check_restore_dir(to)  # bad input first: nothing is read or written before this
    env = _env(ctx)
    point_id = point
    if point == "latest":
        latest = points.latest_point(env.db(), vm=vm)
        if latest is None:
            raise InputError(f"VM {vm} has no recovery point")
        point_id = latest.point_id
    manifest = env.store().load_point(vm, point_id)
    disks = materialize(env.store(), manifest, to, fmt=fmt)
    for name, path in disks.paths.items():
        output.out.print(f"{name}: {path}")


app.add_typer(failover_cmd.failover_app_factory(current_env), name="failover")


register_resync_commands(app, _env)
register_job_commands(app, _env)
register_failback_commands(app, _env)
register_service_commands(app, _env)
replace_resync(app, _env)


def main() -> None:
    """Entry point: run the app and map siterecovery errors to messages and exit codes."""
    try:
        app()
    except SiteRecoveryError as exc:
        output.err.print(f"[red]error:[/] {exc.message}", highlight=False)
        if exc.hint:
            output.err.print(f"  hint: {exc.hint}", highlight=False)
        sys.exit(exc.exit_code)
