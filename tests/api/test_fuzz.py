"""Schema fuzzing with schemathesis against the served ``/openapi.json``: no 500s, ever.

Every operation is called with generated payloads (bounded examples per operation) over real
HTTPS; operator paths with an admin token, agent paths with a host credential, so requests
get past authentication and reach validation and the services.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from .vaultproc import VaultProcess, init_vault

EXAMPLES = 12


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[VaultProcess, dict[str, str]]]:
    vault = VaultProcess(init_vault(Path(tmp_path_factory.mktemp("fuzz")) / "vault")).start()
    admin = vault.token("fuzz-admin-7f3c", "admin")
    with vault.client() as anonymous:
        key = vault.registration_key("fuzz-host")
        host = anonymous.post("/v1/agent/register", {"key": key, "host": "fuzz-host"})
    yield vault, {"admin": admin, "host": host["credential"]}
    vault.stop()


@pytest.fixture(scope="module")
def api_schema(served: tuple[VaultProcess, dict[str, str]]) -> Any:
    vault, _ = served
    with vault.client() as client:
        document = client.get("/openapi.json")
    return schemathesis.openapi.from_dict(document)


def test_no_server_errors(api_schema: Any, served: tuple[VaultProcess, dict[str, str]]) -> None:
    vault, secrets = served
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) > 25  # the whole API is described
    calls: dict[int, int] = {}
    for operation in operations:
        secret = secrets["host"] if operation.path.startswith("/v1/agent/") else secrets["admin"]
        fuzz(operation, vault, {"Authorization": f"Bearer {secret}"}, calls)
    assert sum(calls.values()) >= 2 * len(operations)
    assert not any(code >= 500 and code != 501 for code in calls), calls
    assert "unexpected error" not in vault.log.read_text()


def fuzz(
    operation: Any, vault: VaultProcess, headers: dict[str, str], calls: dict[int, int]
) -> None:
    """Call ``operation`` with generated cases; fail on any server error."""

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(case=operation.as_strategy())
    def call(case: Any) -> None:
        response = case.call(base_url=vault.url, headers=headers, verify=str(vault.ca),
                             timeout=30)  # fmt: skip
        calls[response.status_code] = calls.get(response.status_code, 0) + 1
        case.validate_response(response, checks=[not_a_server_error])

    call()
