"""Registration keys are bound to one host name (DESIGN §6), over real HTTPS against a
`vault serve` process and through the CLI: a key never takes over another host, replacing a
registered host needs a key made with ``replace``, and both are audited."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest

from siterecovery.errors import NotFoundError
from siterecovery.vault.access import NotAuthenticated, PermissionDenied
from siterecovery.vault.errors import Conflict

from .test_http import register_host
from .vaultproc import CLI, VaultProcess


def heartbeat(vault: VaultProcess, credential: str) -> None:
    with vault.client(credential) as agent:
        agent.post("/v1/agent/heartbeat", {"session": str(uuid.uuid4())})


def test_a_key_for_a_new_host_cannot_take_over_a_registered_one(vault: VaultProcess) -> None:
    host_a = register_host(vault, "hostA")
    key = vault.registration_key("hostNew")
    with vault.client() as anonymous:
        with pytest.raises(PermissionDenied, match="key is for host 'hostNew', not 'hostA'"):
            anonymous.post("/v1/agent/register", {"key": key, "host": "hostA"})
        heartbeat(vault, host_a)  # the real hostA still works
        done = anonymous.post("/v1/agent/register", {"key": key, "host": "hostNew"})
    assert (done["host"], done["replaced"]) == ("hostNew", False)  # the key was not used up
    assert "denied 403 POST /v1/agent/register" in vault.log.read_text()


def test_reregistering_a_host_needs_a_replacing_key_and_is_audited(
    vault: VaultProcess, tokens: dict[str, str]
) -> None:
    old = register_host(vault, "hostA")
    with vault.client(tokens["admin"]) as admin:
        with pytest.raises(Conflict, match="'hostA' is already registered"):
            admin.post("/v1/registration-keys", {"site": "dc1", "host": "hostA"})
        with pytest.raises(Conflict, match="registered in site 'dc1', not 'dc2'"):
            admin.post("/v1/registration-keys", {"site": "dc2", "host": "hostA", "replace": True})
        with pytest.raises(NotFoundError, match="no credential to replace"):
            admin.post("/v1/registration-keys", {"site": "dc1", "host": "hostB", "replace": True})
        made = admin.post("/v1/registration-keys", {"site": "dc1", "host": "hostA",
                                                    "replace": True})  # fmt: skip
    assert made["name"] == "hostA" and made["secret"].startswith("srk_")
    heartbeat(vault, old)  # making the key changes nothing yet
    with vault.client() as anonymous:
        done = anonymous.post("/v1/agent/register", {"key": made["secret"], "host": "hostA"})
    assert done["replaced"] is True
    with pytest.raises(NotAuthenticated, match="unknown host credential"):
        heartbeat(vault, old)
    heartbeat(vault, done["credential"])
    log = vault.log.read_text()
    assert "for host 'hostA' in site 'dc1' (replaces its credential)" in log
    assert "by token 't-admin' (admin)" in log
    assert "host 'hostA' in site 'dc1' re-registered with key" in log


def test_a_plain_key_cannot_register_a_host_registered_since_it_was_made(
    vault: VaultProcess,
) -> None:
    key = vault.registration_key("hostA")
    first = register_host(vault, "hostA")  # with another key, made for hostA too
    with (
        vault.client() as anonymous,
        pytest.raises(Conflict, match="may not replace its credential"),
    ):
        anonymous.post("/v1/agent/register", {"key": key, "host": "hostA"})
    heartbeat(vault, first)


def test_the_cli_binds_keys_to_hosts(vault: VaultProcess, tmp_path: Path) -> None:
    def cli(workdir: Path, *args: str) -> tuple[int, str]:
        """Exit code and output (stdout and stderr, lines joined: the CLI wraps them)."""
        done = subprocess.run([*CLI, "--workdir", str(workdir), *args], capture_output=True,
                              text=True, timeout=60, check=False)  # fmt: skip
        return done.returncode, " ".join((done.stdout + done.stderr).split())

    key = tmp_path / "kvm1.key"
    made = cli(vault.settings.workdir, "registration-key", "create", "--out", str(key),
               "--host", "kvm1", "--site", "dc1", "--vault-url", vault.url)  # fmt: skip
    assert made[0] == 0, made
    assert json.loads(key.read_text())["host"] == "kvm1"
    other = cli(tmp_path / "h", "agent", "register", "--key", str(key), "--host", "kvm2")
    assert other[0] == 2 and "is for host 'kvm1', not 'kvm2'" in other[1], other
    joined = cli(tmp_path / "h", "agent", "register", "--key", str(key))  # host from the key
    assert joined[0] == 0 and "host kvm1 registered in site dc1" in joined[1], joined
    again = cli(vault.settings.workdir, "registration-key", "create", "--out",
                str(tmp_path / "again.key"), "--host", "kvm1", "--site", "dc1")  # fmt: skip
    assert again[0] == 6 and "--replace" in again[1], again
    assert not (tmp_path / "again.key").exists()
    replaced = cli(vault.settings.workdir, "registration-key", "create", "--out",
                   str(tmp_path / "again.key"), "--host", "kvm1", "--site", "dc1",
                   "--replace")  # fmt: skip
    assert replaced[0] == 0 and "re-registering host kvm1" in replaced[1], replaced
