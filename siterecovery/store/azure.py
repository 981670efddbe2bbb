"""The ``azure://`` backend: objects as block blobs in an Azure Blob Storage container.

URL: ``azure://ACCOUNT/CONTAINER[/prefix]``. Object ``chunks/ab/...`` of a store at
``azure://acct/replica/site1`` is blob ``site1/chunks/ab/...`` of container ``replica``;
listings strip the prefix again. Credentials never come from the URL or the command line:

* ``SITERECOVERY_AZURE_CONFIG`` names a file holding the connection string (its first line
  that is neither blank nor a ``#`` comment), else
* ``AZURE_STORAGE_CONNECTION_STRING`` holds it.

The connection string's ``AccountName`` (when present) must equal the URL's account, so a
store URL cannot silently write to another account. Its ``BlobEndpoint`` (when present)
chooses the endpoint, which is how tests point at Azurite.

Contracts (see :class:`~siterecovery.store.backend.Backend`):

* put is atomic: blobs up to ``single_put_limit`` are one Put Blob; larger ones are staged
  as uncommitted blocks (random ids) and made visible at once by Put Block List. Uncommitted
  blocks of a failed upload are never visible and the service discards them (after a week,
  or when the blob is next committed);
* ``create_only`` sends ``If-None-Match: *`` on the Put Blob or the Put Block List;
* listings are sorted here and skip names that are not valid store keys.

Every SDK exception is converted at this boundary: BlobNotFound → ``ObjectNotFound``,
BlobAlreadyExists / 412 on a create-only put → ``ObjectExists``, ContainerNotFound →
``ContainerNotFound``, 401/403 and unusable keys → ``StoreAuthError``, connection failures,
timeouts, throttling and 5xx → ``StoreUnavailable`` (recoverable).

The SDK is imported when a backend is built, not when this module is imported.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import uuid
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from siterecovery.store.backend import (
    ObjectInfo,
    register_scheme,
    validate_key,
    validate_prefix,
)
from siterecovery.store.errors import (
    ContainerNotFound,
    InvalidKey,
    ObjectExists,
    ObjectNotFound,
    StoreAuthError,
    StoreError,
    StoreInputError,
    StoreUnavailable,
)

if TYPE_CHECKING:
    from azure.storage.blob import ContainerClient

__all__ = ["AzureBackend", "load_connection_string", "parse_connection_string"]

MiB = 1024 * 1024
#: Azure allows at most this many blocks in one committed blob.
MAX_BLOCKS = 50_000

_ACCOUNT_RE = re.compile(r"^[a-z0-9]{3,24}$")
_CONTAINER_RE = re.compile(r"^(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")
_TRANSIENT_CODES = {"ServerBusy", "InternalError", "OperationTimedOut"}

#: Called after each staged block of a large put: (block number from 1, block bytes).
PartHook = Callable[[int, int], None]


def parse_connection_string(text: str) -> dict[str, str]:
    """Split ``Key=Value;Key=Value`` into a dict (values may contain ``=``)."""
    fields: dict[str, str] = {}
    for part in text.strip().split(";"):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        if not sep:
            raise StoreInputError(
                "malformed Azure connection string (expected Key=Value pairs separated by ';')",
                hint="copy the connection string from the storage account's access keys page",
            )
        fields[name.strip()] = value.strip()
    return fields


def load_connection_string(environ: dict[str, str] | None = None) -> str:
    """The connection string from ``SITERECOVERY_AZURE_CONFIG`` (a file) or
    ``AZURE_STORAGE_CONNECTION_STRING``; :class:`StoreAuthError` when neither gives one."""
    env = os.environ if environ is None else environ
    config = env.get("SITERECOVERY_AZURE_CONFIG")
    if config:
        try:
            lines = Path(config).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise StoreAuthError(
                f"cannot read the Azure config file {config} (SITERECOVERY_AZURE_CONFIG): "
                f"{exc.strerror or exc}"
            ) from exc
        for line in lines:
            if line.strip() and not line.lstrip().startswith("#"):
                return line.strip()
        raise StoreAuthError(f"the Azure config file {config} holds no connection string")
    text = env.get("AZURE_STORAGE_CONNECTION_STRING", "").strip()
    if not text:
        raise StoreAuthError("no Azure credentials configured for the azure:// store")
    return text


def _code(exc: BaseException) -> str:
    code = getattr(exc, "error_code", None)
    if isinstance(code, Enum):
        return str(code.value)
    return str(code or "")


def _status(exc: BaseException) -> int:
    return int(getattr(exc, "status_code", 0) or 0)


class AzureBackend:
    """Objects as block blobs in ``container`` of ``account``, under ``prefix``.

    ``sdk_attempts`` is the SDK's own attempt count per request (1 = no SDK retry; wrap the
    backend with :class:`~siterecovery.store.wrappers.RetryingBackend` for the product's
    schedule). ``on_part`` is called after each staged block of a large put.
    """

    def __init__(
        self,
        account: str,
        container: str,
        prefix: str = "",
        *,
        connection_string: str,
        single_put_limit: int = 64 * MiB,
        block_size: int = 8 * MiB,
        sdk_attempts: int = 3,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
    ) -> None:
        if not _ACCOUNT_RE.match(account):
            raise StoreInputError(
                f"invalid Azure storage account name {account!r}",
                hint="account names are 3-24 lowercase letters and digits",
            )
        if not _CONTAINER_RE.match(container):
            raise StoreInputError(
                f"invalid Azure container name {container!r}",
                hint="container names are 3-63 lowercase letters, digits and single hyphens",
            )
        prefix = prefix.strip("/")
        if prefix:
            try:
                validate_key(prefix)
            except InvalidKey as exc:
                raise StoreInputError(f"invalid prefix {prefix!r} in Azure store URL") from exc
        if single_put_limit < 1 or block_size < 1:
            raise ValueError("single_put_limit and block_size must be positive")
        _check_credentials(account, connection_string)
        self.account = account
        self.container = container
        self.prefix = prefix
        self._root = f"{prefix}/" if prefix else ""
        self.single_put_limit = single_put_limit
        self.block_size = block_size
        self.on_part: PartHook | None = None
        self._client = _make_container_client(
            connection_string,
            container,
            single_put_limit=single_put_limit,
            block_size=block_size,
            sdk_attempts=sdk_attempts,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )

    @classmethod
    def from_url(cls, url: str) -> AzureBackend:
        """Build from ``azure://ACCOUNT/CONTAINER[/prefix]``; credentials come from the
        environment (see the module docstring), never the URL."""
        parts = urlsplit(url)
        container, _, prefix = parts.path.lstrip("/").partition("/")
        if parts.scheme != "azure" or not parts.netloc or not container:
            raise StoreInputError(
                f"invalid Azure store URL {url!r}",
                hint="write it as azure://ACCOUNT/CONTAINER[/prefix]",
            )
        if "@" in parts.netloc or ":" in parts.netloc or parts.query or parts.fragment:
            raise StoreInputError(
                f"invalid Azure store URL {url!r}: no credentials, port, query or fragment",
                hint="give the connection string in AZURE_STORAGE_CONNECTION_STRING or in the "
                "file named by SITERECOVERY_AZURE_CONFIG",
            )
        return cls(parts.netloc, container, prefix, connection_string=load_connection_string())

    @property
    def url(self) -> str:
        base = f"azure://{self.account}/{self.container}"
        return f"{base}/{self.prefix}" if self.prefix else base

    # -- helpers ----------------------------------------------------------------------

    def _name(self, key: str) -> str:
        return self._root + validate_key(key)

    def _error(self, exc: BaseException, action: str, key: str) -> StoreError:
        """Convert an SDK exception into the store error tree."""
        from azure.core import exceptions as ace

        what = f"{action} {key} in {self.url}"
        code, status = _code(exc), _status(exc)
        if code == "ContainerNotFound":
            return ContainerNotFound(f"cannot {what}: container {self.container} does not exist")
        if isinstance(exc, ace.ResourceNotFoundError) or status == 404:
            return ObjectNotFound(f"object {key} not found in {self.url}")
        if isinstance(exc, ace.ClientAuthenticationError) or status in (401, 403):
            return StoreAuthError(f"cannot {what}: access denied ({code or status})")
        if code in _TRANSIENT_CODES or status >= 500 or status in (408, 429):
            return StoreUnavailable(f"cannot {what}: {code or 'HTTP'} {status}")
        if isinstance(exc, ace.ServiceRequestError | ace.ServiceResponseError | OSError):
            # Connection refused/reset, timeouts, truncated bodies: the network failed.
            return StoreUnavailable(f"cannot {what}: {exc}")
        if isinstance(exc, ace.HttpResponseError):
            return StoreError(f"cannot {what}: {code or 'HTTP'} {status}: {exc.reason}")
        return StoreError(f"cannot {what}: {type(exc).__name__}: {exc}")

    @staticmethod
    def _sdk_errors() -> tuple[type[BaseException], ...]:
        from azure.core.exceptions import AzureError

        return (AzureError, OSError)

    # -- Backend ------------------------------------------------------------------------

    def put(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        name = self._name(key)
        data = bytes(data)
        blob = self._client.get_blob_client(name)
        try:
            if len(data) <= self.single_put_limit:
                blob.upload_blob(data, length=len(data), overwrite=not create_only)
            else:
                self._put_blocks(blob, data, create_only)
        except self._sdk_errors() as exc:
            raise self._put_error(exc, key, create_only) from exc

    def _put_error(self, exc: BaseException, key: str, create_only: bool) -> StoreError:
        from azure.core.exceptions import ResourceExistsError, ResourceModifiedError

        code, status = _code(exc), _status(exc)
        exists = isinstance(exc, ResourceExistsError | ResourceModifiedError) or status == 412
        if create_only and (exists or code == "BlobAlreadyExists"):
            return ObjectExists(f"object {key} already exists")
        if code == "InvalidBlockList":
            # Our staged blocks were discarded: another writer committed this blob meanwhile.
            if create_only and self.stat(key) is not None:
                return ObjectExists(f"object {key} already exists")
            return StoreUnavailable(
                f"cannot store {key} in {self.url}: a concurrent writer discarded the staged "
                "blocks; retry"
            )
        return self._error(exc, "store", key)

    def _put_blocks(self, blob: Any, data: bytes, create_only: bool) -> None:
        from azure.core import MatchConditions
        from azure.storage.blob import BlobBlock

        size = max(self.block_size, -(-len(data) // MAX_BLOCKS))
        # Random per upload so concurrent writers of one blob never share a block id.
        token = uuid.uuid4().hex
        blocks = []
        for number, start in enumerate(range(0, len(data), size), start=1):
            chunk = data[start : start + size]
            block_id = f"{token}-{number:06d}"
            blob.stage_block(block_id, chunk, length=len(chunk))
            blocks.append(BlobBlock(block_id=block_id))
            if self.on_part is not None:
                self.on_part(number, len(chunk))
        condition: dict[str, Any] = (
            {"match_condition": MatchConditions.IfMissing} if create_only else {}
        )
        blob.commit_block_list(blocks, **condition)

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        name = self._name(key)
        if offset < 0 or (length is not None and length < 0):
            raise StoreInputError(f"invalid range offset={offset} length={length} for {key}")
        if length == 0:
            if self.stat(key) is None:
                raise ObjectNotFound(f"object {key} not found in {self.url}")
            return b""
        blob = self._client.get_blob_client(name)
        try:
            ranged = offset > 0 or length is not None
            stream = blob.download_blob(offset=offset if ranged else None, length=length)
            return stream.readall()
        except self._sdk_errors() as exc:
            if _status(exc) == 416:
                return b""  # the blob exists; the range starts at or past its end
            raise self._error(exc, "read", key) from exc

    def stat(self, key: str) -> ObjectInfo | None:
        name = self._name(key)
        try:
            props = self._client.get_blob_client(name).get_blob_properties()
        except self._sdk_errors() as exc:
            error = self._error(exc, "stat", key)
            if isinstance(error, ObjectNotFound):
                return None
            raise error from exc
        return ObjectInfo(key, int(props.size), props.last_modified.timestamp())

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        infos: list[ObjectInfo] = []
        try:
            for props in self._client.list_blobs(name_starts_with=self._root + prefix):
                key = props.name[len(self._root) :]
                if _is_store_key(key):
                    infos.append(ObjectInfo(key, int(props.size), props.last_modified.timestamp()))
        except self._sdk_errors() as exc:
            raise self._error(exc, "list", prefix or "(all)") from exc
        infos.sort(key=lambda i: i.key)
        return iter(infos)

    def delete(self, key: str) -> None:
        name = self._name(key)
        try:
            self._client.get_blob_client(name).delete_blob()
        except self._sdk_errors() as exc:
            error = self._error(exc, "delete", key)
            if not isinstance(error, ObjectNotFound):
                raise error from exc


def _is_store_key(key: str) -> bool:
    try:
        validate_key(key)
    except InvalidKey:
        return False
    return True


def _check_credentials(account: str, connection_string: str) -> None:
    """Refuse a connection string for another account or with an unusable key, before any
    request (the SDK would fail later with a less clear error)."""
    fields = parse_connection_string(connection_string)
    named = fields.get("AccountName")
    if named is not None and named != account:
        raise StoreInputError(
            f"the Azure connection string is for account {named!r}, but the store URL names "
            f"account {account!r}",
            hint="use the connection string of the account in the store URL",
        )
    key = fields.get("AccountKey")
    if key is not None:
        try:
            base64.b64decode(key, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise StoreAuthError(
                f"the AccountKey in the Azure connection string for {account} is not valid base64"
            ) from exc
    if key is None and not {"SharedAccessSignature", "UseDevelopmentStorage"} & fields.keys():
        raise StoreAuthError(
            f"the Azure connection string for {account} has neither AccountKey nor "
            "SharedAccessSignature"
        )


def _make_container_client(
    connection_string: str,
    container: str,
    *,
    single_put_limit: int,
    block_size: int,
    sdk_attempts: int,
    connect_timeout: float,
    read_timeout: float,
) -> ContainerClient:
    try:
        from azure.storage.blob import BlobServiceClient, ExponentialRetry
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise StoreError(
            "the azure:// backend needs azure-storage-blob",
            hint="pip install azure-storage-blob (or reinstall siterecovery)",
        ) from exc
    # The SDK's default retry waits 15 s and more; keep its own retries few and short.
    retry = ExponentialRetry(
        initial_backoff=1,
        increment_base=2,
        retry_total=max(0, sdk_attempts - 1),
        random_jitter_range=1,
    )
    service = BlobServiceClient.from_connection_string(
        connection_string,
        retry_policy=retry,
        connection_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_single_put_size=single_put_limit,
        max_block_size=block_size,
    )
    return service.get_container_client(container)


register_scheme("azure", AzureBackend.from_url)
