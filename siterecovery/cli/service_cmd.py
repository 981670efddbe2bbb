"""CLI commands of the vault as a service: ``vault serve``, ``agent register/run``, ``up``,
``token create/list/revoke``, ``registration-key create``.

``token`` and ``registration-key`` act on the vault database of the work directory directly:
they are run on the vault's host (the first admin token cannot come from the API).
Wired by ``register_service_commands(app, _env)`` in :mod:`siterecovery.cli.app`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from siterecovery.cli import output
from siterecovery.cli.context import Env
from siterecovery.domain import parse_duration, parse_size
from siterecovery.errors import InputError, SiteRecoveryError
from siterecovery.fsutil import CHILD_UMASK, open_private, private_dir, write_private

GetEnv = Callable[[typer.Context], Env]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON document for scripts.")]
ADMIN_TOKEN_FILE = "admin.token"
REPLACE_HELP = (
    "Re-register a registered host (reinstalled): its current credential stops working when "
    "the key is used."
)
#: The host name of the local agent that `up` registers.
LOCAL_HOST = "localhost"


def register_service_commands(app: typer.Typer, get_env: GetEnv) -> None:
    """Add the service commands to ``app`` (reusing its ``vault`` group if it has one).

    Idempotent: a second call on the same app adds nothing.
    """
    if any(c.name == "up" for c in app.registered_commands):
        return
    vault = _group(app, "vault", "The vault: create it, serve its API.")
    agent = _group(app, "agent", "This host's agent: register it, run it.")
    token = _group(app, "token", "Operators' API tokens (run on the vault's host).")
    regkey = _group(app, "registration-key", "One-time keys for hosts to join the vault.")
    vault.command("serve")(_serve(get_env))
    agent.command("register")(_agent_register(get_env))
    agent.command("run")(_agent_run(get_env))
    token.command("create")(_token_create(get_env))
    token.command("list")(_token_list(get_env))
    token.command("revoke")(_token_revoke(get_env))
    regkey.command("create")(_regkey_create(get_env))
    app.command("up")(_up(get_env))


def replace_resync(app: typer.Typer, get_env: GetEnv) -> None:
    """Make ``resync`` go through the invocation's vault (API or embedded): the command
    registered by :mod:`~siterecovery.cli.resync_cmd` runs the resync in-process only."""
    app.registered_commands[:] = [
        c for c in app.registered_commands
        if (c.name or getattr(c.callback, "__name__", "")) != "resync"
    ]  # fmt: skip
    app.command("resync")(_resync(get_env))


def _resync(get_env: GetEnv) -> Callable[..., None]:
    def resync(
        ctx: typer.Context,
        vm: Annotated[str, typer.Argument(help="A protected VM.")],
        full: Annotated[
            bool, typer.Option(help="Copy every disk whole (when replica data is damaged).")
        ] = False,
        json_out: JsonFlag = False,
    ) -> None:
        """Resynchronize a VM now: send only the blocks that differ from the replica.

        Embedded: runs here. Through the vault API: the VM's agent runs the job now.
        """
        job, figures = get_env(ctx).vault().resync(vm, full=full)
        if json_out:
            return output.print_json({"job": job["id"], **figures})
        if not figures:
            output.print_job(job)
            output.out.print(f"the VM's agent runs resync job {job['id'][:8]} now")
            return
        output.out.print(
            f"resync job {job['id'][:8]} [{job['state']}]: {figures['blocks_compared']} "
            f"blocks compared, {figures['blocks_sent']} sent "
            f"({output.size(figures['bytes_sent'])}, {output.size(figures['bytes_shipped'])} "
            f"stored) in {figures['duration_s']:.2f} s; recovery point {figures['point']}"
        )

    return resync


def _group(app: typer.Typer, name: str, help_text: str) -> typer.Typer:
    for info in app.registered_groups:
        if info.name == name and info.typer_instance is not None:
            return info.typer_instance
    group = typer.Typer(help=help_text, no_args_is_help=True)
    app.add_typer(group, name=name)
    return group


def _serve(get_env: GetEnv) -> Callable[..., None]:
    def serve(
        ctx: typer.Context,
        host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
        port: Annotated[int, typer.Option(min=1, max=65535)] = 8443,
        name: Annotated[
            list[str] | None, typer.Option(help="Extra DNS name or IP for the server certificate.")
        ] = None,
        heartbeat_timeout: Annotated[
            str, typer.Option(help="A host is disconnected after this long without a heartbeat.")
        ] = "90s",
        max_body: Annotated[
            str, typer.Option(help="Longest request body accepted (413 beyond), e.g. 4MiB.")
        ] = "1MiB",
    ) -> None:
        """Serve the vault's REST API over HTTPS (OpenAPI at /openapi.json)."""
        from siterecovery.api.deps import VaultOptions
        from siterecovery.api.server import serve as run_server

        env = get_env(ctx)
        _require_vault(env)
        timeout = parse_duration(heartbeat_timeout, what="heartbeat timeout")
        body = parse_size(max_body, what="request body limit")
        if not 1024 <= body <= 1 << 30:
            raise InputError(f"request body limit {max_body} is out of range",
                             hint="use 1KiB to 1GiB")  # fmt: skip
        options = VaultOptions(heartbeat_timeout_s=float(timeout), max_body_bytes=body)
        run_server(env.settings, host=host, port=port, names=name or [], options=options)

    return serve


def _agent_register(get_env: GetEnv) -> Callable[..., None]:
    def register(
        ctx: typer.Context,
        key: Annotated[Path, typer.Option(help="Registration key file from the vault.")],
        vault: Annotated[str | None, typer.Option(help="Vault URL (default: the key's).")] = None,
        host: Annotated[str | None, typer.Option(help="This host's name in the vault.")] = None,
        qmp: Annotated[
            list[str] | None,
            typer.Option(help="Glob of VMs' QMP sockets (repeatable), e.g. /run/qemu/*.qmp."),
        ] = None,
        store_key: Annotated[
            Path | None,
            typer.Option(help="The replica store's key file (default: WORKDIR/store.key)."),
        ] = None,
    ) -> None:
        """Register this host with a one-time key; stores the host's own credential."""
        from siterecovery.agent.runner import check_globs
        from siterecovery.agent.runner import register as do_register

        env = get_env(ctx)
        globs = check_globs(qmp or [])
        config = do_register(env.settings.workdir, key, vault_url=vault, host=host,
                             qmp_globs=globs, store_key_file=store_key)  # fmt: skip
        output.out.print(f"host {config.host} registered in site {config.site} at "
                         f"{config.vault_url}")  # fmt: skip

    return register


def _agent_run(get_env: GetEnv) -> Callable[..., None]:
    def run(ctx: typer.Context) -> None:
        """Run this host's agent until interrupted (SIGINT/SIGTERM end it cleanly)."""
        from siterecovery.agent.runner import Agent

        agent = Agent.open(get_env(ctx).settings.workdir)
        _logging()
        agent.run(_stop_on_signals())

    return run


def _token_create(get_env: GetEnv) -> Callable[..., None]:
    def create(
        ctx: typer.Context,
        name: Annotated[str, typer.Argument(help="Token name.")],
        role: Annotated[str, typer.Option(help="reader, operator or admin.")] = "reader",
        ttl: Annotated[str | None, typer.Option(help="Lifetime, e.g. 30d (default: none).")] = None,
        json_out: JsonFlag = False,
    ) -> None:
        """Make an API token; its secret is printed once."""
        from siterecovery.vault import access

        ttl_s = parse_duration(ttl, what="lifetime") if ttl else None
        record, secret = access.create_token(get_env(ctx).db(), name=name, role=role,
                                             ttl_s=ttl_s)  # fmt: skip
        if json_out:
            return output.print_json({**output.to_jsonable(record), "secret": secret})
        output.out.print(secret, highlight=False)

    return create


def _token_list(get_env: GetEnv) -> Callable[..., None]:
    def list_(ctx: typer.Context, json_out: JsonFlag = False) -> None:
        """API tokens (never their secrets)."""
        from siterecovery.vault import access

        records = access.list_tokens(get_env(ctx).db())
        if json_out:
            return output.print_json(records)
        rows = [(t.name, t.role, output.when(t.created_at), output.when(t.expires_at),
                 "revoked" if t.revoked_at else "") for t in records]  # fmt: skip
        output.out.print(output.table("tokens", ["name", "role", "created", "expires", ""], rows))

    return list_


def _token_revoke(get_env: GetEnv) -> Callable[..., None]:
    def revoke(ctx: typer.Context, name: Annotated[str, typer.Argument()]) -> None:
        """Revoke an API token now."""
        from siterecovery.vault import access

        access.revoke_token(get_env(ctx).db(), name=name)
        output.out.print(f"token {name} revoked")

    return revoke


def _regkey_create(get_env: GetEnv) -> Callable[..., None]:
    def create(
        ctx: typer.Context,
        out: Annotated[Path, typer.Option(help="Key file to write (0600).")],
        host: Annotated[str, typer.Option(help="The one host name the key registers.")],
        site: Annotated[str, typer.Option(help="Site the host joins.")] = "primary",
        role: Annotated[str, typer.Option(help="Site role if the site is new.")] = "primary",
        ttl: Annotated[str, typer.Option(help="Validity: up to 5d.")] = "1d",
        vault_url: Annotated[str, typer.Option(help="URL agents reach the vault at.")] = (
            "https://127.0.0.1:8443"
        ),
        replace: Annotated[bool, typer.Option(help=REPLACE_HELP)] = False,
    ) -> None:
        """Make a one-time, expiring registration key file for one named host."""
        from siterecovery.agent.config import KeyFile
        from siterecovery.api.server import pki_of
        from siterecovery.vault import access

        env = get_env(ctx)
        if out.exists():
            raise InputError(f"{out} exists", hint="choose another file name")
        ttl_s = parse_duration(ttl, what="validity")
        key, expires = access.create_registration_key(
            env.db(), site=site, host=host, role=role, ttl_s=ttl_s, replace=replace,
            by="`registration-key create` on the vault host",
        )  # fmt: skip
        ca_pem = pki_of(env.settings).ca_cert.read_text()
        KeyFile(vault_url, key, site, expires.isoformat(), ca_pem, host=host).save(out)
        what = "re-registering" if replace else "registering"
        output.out.print(f"key {what} host {host} in site {site} written to {out} "
                         f"(valid until {expires:%Y-%m-%d %H:%M} UTC, one use)")  # fmt: skip

    return create


def _up(get_env: GetEnv) -> Callable[..., None]:
    def up(
        ctx: typer.Context,
        port: Annotated[int, typer.Option(min=1, max=65535)] = 8443,
        qmp: Annotated[
            list[str] | None, typer.Option(help="Glob of the local VMs' QMP sockets (repeatable).")
        ] = None,
        encrypt: Annotated[
            bool,
            typer.Option(help="Encrypt a new store at rest, the default (only on first start)."),
        ] = True,
    ) -> None:
        """Start the vault and a local agent together (the embedded default).

        Initializes the vault in WORKDIR if needed (the store encrypted unless --no-encrypt),
        writes an admin token to WORKDIR/admin.token and registers this host's agent on first
        start.
        """
        env = get_env(ctx)
        _ensure_vault(env, encrypt=encrypt)
        vault = _start_vault(env, port)
        try:
            url = f"https://127.0.0.1:{port}"
            _wait_ready(env, url, vault)
            _ensure_admin_token(env)
            _ensure_agent(env, url, qmp or [])
            from siterecovery.agent.runner import Agent

            output.out.print(f"vault at {url}; agent running (Ctrl-C stops both)")
            _logging()
            Agent.open(env.settings.workdir).run(_stop_on_signals())
        finally:
            vault.terminate()
            vault.wait(timeout=15)

    return up


# -- helpers ---------------------------------------------------------------------------------


def _require_vault(env: Env) -> None:
    env.db()  # NotFoundError with the hint to run `vault init`


def _ensure_vault(env: Env, *, encrypt: bool) -> None:
    """Initialize the work directory on the first start (as `vault init` does)."""
    from siterecovery.workdir import UNENCRYPTED_WARNING, init_workdir

    if env.settings.key_file.exists():
        return
    init_workdir(env.settings, encrypted=encrypt)
    if not encrypt:
        output.warn(UNENCRYPTED_WARNING)


def _start_vault(env: Env, port: int) -> subprocess.Popen[bytes]:
    from siterecovery.api.server import pki_of

    pki_of(env.settings)
    argv = [
        sys.executable,
        "-m",
        "siterecovery",
        "--workdir",
        str(env.settings.workdir),
        "vault",
        "serve",
        "--port",
        str(port),
    ]
    log = open_private(env.settings.workdir / "vault.log", append=True)
    try:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, umask=CHILD_UMASK)
    finally:
        os.close(log)


def _wait_ready(env: Env, url: str, vault: subprocess.Popen[bytes], timeout: float = 30) -> None:
    from siterecovery.api.client import VaultClient
    from siterecovery.api.server import pki_of

    deadline = time.monotonic() + timeout
    with VaultClient(url, ca_file=pki_of(env.settings).ca_cert) as client:
        while True:
            if vault.poll() is not None:
                raise InputError(f"the vault exited ({vault.returncode})",
                                 hint=f"see {env.settings.workdir / 'vault.log'}")  # fmt: skip
            try:
                client.get("/healthz")
                return
            except SiteRecoveryError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def _ensure_admin_token(env: Env) -> None:
    from siterecovery.vault import access

    path = env.settings.workdir / ADMIN_TOKEN_FILE
    if path.exists():
        return
    _, secret = access.create_token(env.db(), name="local-admin", role="admin")
    write_private(path, (secret + "\n").encode())


def _ensure_agent(env: Env, url: str, globs: list[str]) -> None:
    from siterecovery.agent.config import AgentConfig, KeyFile
    from siterecovery.agent.runner import check_globs, register
    from siterecovery.api.server import pki_of
    from siterecovery.vault import access

    workdir = env.settings.workdir
    if (AgentConfig.dir_of(workdir) / "agent.json").exists():
        return
    db = env.db()
    key, expires = access.create_registration_key(
        db, site="primary", host=LOCAL_HOST, ttl_s=600, by="`up`",
        replace=access.is_registered(db, host=LOCAL_HOST),  # its agent directory was lost
    )  # fmt: skip
    key_file = workdir / "agent" / "registration.key"
    private_dir(key_file.parent)
    KeyFile(url, key, "primary", expires.isoformat(),
            pki_of(env.settings).ca_cert.read_text(), host=LOCAL_HOST).save(key_file)  # fmt: skip
    register(workdir, key_file, host=LOCAL_HOST,
             qmp_globs=check_globs(globs or [str(workdir / "vms" / "*.qmp")]))  # fmt: skip
    key_file.unlink()


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(_sig: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def _logging() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll is noise
