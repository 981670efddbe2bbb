"""The ``s3://`` backend: objects in an S3 (or S3-compatible) bucket, through boto3.

URL: ``s3://BUCKET[/prefix]``. Object ``chunks/ab/...`` of a store at ``s3://b/replica`` is
S3 object ``replica/chunks/ab/...`` of bucket ``b``; listings strip the prefix again. The URL
never holds a secret:

* endpoint: ``SITERECOVERY_S3_ENDPOINT``, else ``AWS_ENDPOINT_URL``, else AWS itself; a custom
  endpoint gets path-style addressing (``http://host:port/BUCKET/key``);
* credentials and region: boto3's standard chain (``AWS_ACCESS_KEY_ID`` /
  ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and the AWS config
  files, instance roles); the region defaults to ``us-east-1``.

Contracts (see :class:`~siterecovery.store.backend.Backend`):

* put is atomic: objects up to ``multipart_threshold`` are one ``PutObject``; larger ones are
  a multipart upload, which becomes visible only when ``CompleteMultipartUpload`` succeeds
  (a failed upload is aborted, best effort; an abandoned one stays invisible and is removed
  by the bucket's lifecycle rule for incomplete uploads);
* ``create_only`` sends ``If-None-Match: *`` on the PutObject or the Complete call. Servers
  that ignore the header would silently overwrite, so before the first create-only put a
  backend probes once: it writes a dot-named probe object twice, the second time
  conditionally, and raises :class:`ConditionalWritesUnsupported` unless the server refused;
* listings are sorted here (some servers, e.g. SeaweedFS, list in directory order) and skip
  names that are not valid store keys (dot-named probes, foreign objects).

Every boto3/botocore exception is converted at this boundary: 404/NoSuchKey →
``ObjectNotFound``, 412 on a create-only put → ``ObjectExists``, NoSuchBucket →
``ContainerNotFound``, 401/403 and missing credentials → ``StoreAuthError``, connection
failures, timeouts, throttling and 5xx → ``StoreUnavailable`` (recoverable).

The SDK is imported when a backend is built, not when this module is imported, so
``open_backend`` stays cheap for the other schemes.
"""

from __future__ import annotations

import os
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any
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

__all__ = ["ConditionalWritesUnsupported", "S3Backend"]

MiB = 1024 * 1024
#: S3 allows at most this many parts in one multipart upload.
MAX_PARTS = 10_000
#: S3's smallest part (except the last).
MIN_PART = 5 * MiB

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$")
_AUTH_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AuthorizationHeaderMalformed",
}
_TRANSIENT_CODES = {
    "SlowDown",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "ConditionalRequestConflict",  # a concurrent conditional write: retrying settles it
    "OperationAborted",
}

#: (endpoint, bucket) pairs whose server was proven to honour If-None-Match: *.
_CONDITIONAL_OK: set[tuple[str | None, str]] = set()
_PROBE_LOCK = threading.Lock()
#: boto3 clients by configuration: building one loads the service model (~0.5 s), and
#: clients are thread-safe, so backends with the same settings share one.
_CLIENTS: dict[tuple[Any, ...], Any] = {}
_CLIENTS_LOCK = threading.Lock()

#: Called after each part of a multipart upload: (part number, part bytes).
PartHook = Callable[[int, int], None]


class ConditionalWritesUnsupported(StoreError):
    """The S3 server ignores ``If-None-Match: *``, so create-only puts cannot be made safe."""

    hint = (
        "use an S3 server that supports conditional writes (AWS S3, SeaweedFS, MinIO, ...): "
        "the replica store relies on them to never overwrite a recovery point"
    )


def _error_info(exc: Any) -> tuple[str, int]:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


class S3Backend:
    """Objects in ``bucket`` under ``prefix``. See the module docstring for the contracts.

    ``client`` may be a ready boto3 S3 client; otherwise one is built from the keyword
    arguments (``None`` means boto3's default chain). ``sdk_attempts`` is botocore's own
    attempt count per request (1 = no SDK retry; wrap the backend with
    :class:`~siterecovery.store.wrappers.RetryingBackend` for the product's schedule).
    ``on_part`` is called after each uploaded part of a multipart put (progress, tests).
    ``part_size`` is raised to S3's minimum of 5 MiB.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: Any = None,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        session_token: str | None = None,
        multipart_threshold: int = 64 * MiB,
        part_size: int = 16 * MiB,
        sdk_attempts: int = 3,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
    ) -> None:
        if not _BUCKET_RE.match(bucket):
            raise StoreInputError(
                f"invalid S3 bucket name {bucket!r}",
                hint="bucket names are 3-63 characters of lowercase letters, digits, '.', '-'",
            )
        prefix = prefix.strip("/")
        if prefix:
            try:
                validate_key(prefix)
            except InvalidKey as exc:
                raise StoreInputError(f"invalid prefix {prefix!r} in S3 store URL") from exc
        if part_size < 1 or multipart_threshold < 1:
            raise ValueError("part_size and multipart_threshold must be positive")
        # S3 (and SeaweedFS) refuse parts under 5 MiB except the last one.
        part_size = max(part_size, MIN_PART)
        self.bucket = bucket
        self.prefix = prefix
        self._root = f"{prefix}/" if prefix else ""
        self.endpoint_url = endpoint_url
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.on_part: PartHook | None = None
        self._client = client or _make_client(
            endpoint_url=endpoint_url,
            region=region,
            access_key=access_key,
            secret_key=secret_key,
            session_token=session_token,
            sdk_attempts=sdk_attempts,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )

    @classmethod
    def from_url(cls, url: str) -> S3Backend:
        """Build from ``s3://BUCKET[/prefix]``; endpoint and credentials come from the
        environment and the AWS config files (see the module docstring), never the URL."""
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise StoreInputError(
                f"invalid S3 store URL {url!r}", hint="write it as s3://BUCKET[/prefix]"
            )
        if "@" in parts.netloc or ":" in parts.netloc or parts.query or parts.fragment:
            raise StoreInputError(
                f"invalid S3 store URL {url!r}: no credentials, port, query or fragment",
                hint="give the endpoint in SITERECOVERY_S3_ENDPOINT or AWS_ENDPOINT_URL and "
                "credentials in the AWS environment variables or config files",
            )
        endpoint = os.environ.get("SITERECOVERY_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
        return cls(parts.netloc, parts.path, endpoint_url=endpoint or None)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    # -- helpers ----------------------------------------------------------------------

    def _name(self, key: str) -> str:
        return self._root + validate_key(key)

    def _error(self, exc: BaseException, action: str, key: str) -> StoreError:
        """Convert an SDK exception into the store error tree."""
        bce = _botocore_exceptions()
        what = f"{action} {key} in {self.url}"
        if isinstance(exc, bce.NoCredentialsError | bce.PartialCredentialsError):
            return StoreAuthError(f"cannot {what}: no usable S3 credentials ({exc})")
        if isinstance(exc, bce.ClientError):
            code, status = _error_info(exc)
            message = str(exc.response.get("Error", {}).get("Message", "")) or code
            if code == "NoSuchBucket":
                return ContainerNotFound(f"cannot {what}: bucket {self.bucket} does not exist")
            if code in ("NoSuchKey", "NotFound") or status == 404:
                return ObjectNotFound(f"object {key} not found in {self.url}")
            if code in _AUTH_CODES or status in (401, 403):
                return StoreAuthError(f"cannot {what}: access denied ({code or status})")
            if code in _TRANSIENT_CODES or status >= 500 or status == 429:
                return StoreUnavailable(f"cannot {what}: {message} (HTTP {status})")
            return StoreError(f"cannot {what}: {message} (HTTP {status})")
        if isinstance(exc, bce.ParamValidationError):
            return StoreError(f"cannot {what}: {exc}")
        if isinstance(exc, bce.BotoCoreError | OSError):
            # Connection refused/reset, timeouts, truncated bodies: the network failed.
            return StoreUnavailable(f"cannot {what}: {exc}")
        return StoreError(f"cannot {what}: {type(exc).__name__}: {exc}")

    def _sdk_errors(self) -> tuple[type[BaseException], ...]:
        bce = _botocore_exceptions()
        return (bce.BotoCoreError, bce.ClientError, OSError)

    # -- Backend ------------------------------------------------------------------------

    def put(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        name = self._name(key)
        data = bytes(data)
        if create_only:
            self._check_conditional_writes()
        condition = {"IfNoneMatch": "*"} if create_only else {}
        try:
            if len(data) <= self.multipart_threshold:
                self._client.put_object(Bucket=self.bucket, Key=name, Body=data, **condition)
            else:
                self._put_multipart(name, data, condition)
        except self._sdk_errors() as exc:
            raise self._put_error(exc, key, create_only) from exc

    def _put_error(self, exc: BaseException, key: str, create_only: bool) -> StoreError:
        code, status = _error_info(exc)
        if create_only and (status == 412 or code == "PreconditionFailed"):
            return ObjectExists(f"object {key} already exists")
        if create_only and (status == 501 or code == "NotImplemented"):
            return ConditionalWritesUnsupported(
                f"cannot store {key} in {self.url}: the server does not implement a "
                f"request option ({code or status})"
            )
        return self._error(exc, "store", key)

    def _put_multipart(self, name: str, data: bytes, condition: dict[str, str]) -> None:
        # Never more than MAX_PARTS parts: grow the part size for very large objects.
        size = max(self.part_size, -(-len(data) // MAX_PARTS))
        upload_id = self._client.create_multipart_upload(Bucket=self.bucket, Key=name)["UploadId"]
        try:
            parts = []
            for number, start in enumerate(range(0, len(data), size), start=1):
                body = data[start : start + size]
                reply = self._client.upload_part(
                    Bucket=self.bucket, Key=name, UploadId=upload_id, PartNumber=number, Body=body
                )
                parts.append({"PartNumber": number, "ETag": reply["ETag"]})
                if self.on_part is not None:
                    self.on_part(number, len(body))
            self._client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=name,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
                **condition,
            )
        except BaseException:
            self._abort_quietly(name, upload_id)
            raise

    def _abort_quietly(self, name: str, upload_id: str) -> None:
        # Best effort: the parts are invisible either way; aborting only frees their space.
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id)
        except self._sdk_errors():
            pass

    def _check_conditional_writes(self) -> None:
        """Once per process and endpoint, prove the server honours ``If-None-Match: *``
        (module docstring)."""
        server = (self.endpoint_url, self.bucket)
        if server in _CONDITIONAL_OK:
            return
        with _PROBE_LOCK:
            if server in _CONDITIONAL_OK:
                return
            probe = f"{self._root}.siterecovery-probe-{uuid.uuid4().hex}"
            try:
                self._client.put_object(Bucket=self.bucket, Key=probe, Body=b"")
                honoured = self._probe_refused(probe)
            except self._sdk_errors() as exc:
                raise self._error(exc, "probe conditional writes with", probe) from exc
            finally:
                try:
                    self._client.delete_object(Bucket=self.bucket, Key=probe)
                except self._sdk_errors():
                    pass
            if not honoured:
                raise ConditionalWritesUnsupported(
                    f"the S3 server of {self.url} ignores If-None-Match: *, so a create-only "
                    "put could overwrite an object; refusing to write"
                )
            _CONDITIONAL_OK.add(server)

    def _probe_refused(self, probe: str) -> bool:
        try:
            self._client.put_object(Bucket=self.bucket, Key=probe, Body=b"", IfNoneMatch="*")
        except _botocore_exceptions().ClientError as exc:
            code, status = _error_info(exc)
            if status == 412 or code == "PreconditionFailed":
                return True
            if status == 501 or code == "NotImplemented":
                return False
            raise
        return False

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        name = self._name(key)
        if offset < 0 or (length is not None and length < 0):
            raise StoreInputError(f"invalid range offset={offset} length={length} for {key}")
        if length == 0:
            if self.stat(key) is None:
                raise ObjectNotFound(f"object {key} not found in {self.url}")
            return b""
        ranged = offset > 0 or length is not None
        extra = {}
        if ranged:
            end = "" if length is None else str(offset + length - 1)
            extra["Range"] = f"bytes={offset}-{end}"
        try:
            reply = self._client.get_object(Bucket=self.bucket, Key=name, **extra)
            data: bytes = reply["Body"].read()
        except self._sdk_errors() as exc:
            if _error_info(exc)[1] == 416:
                return b""  # the object exists; the range starts at or past its end
            raise self._error(exc, "read", key) from exc
        if ranged and reply["ResponseMetadata"]["HTTPStatusCode"] == 200:
            # The server ignored the Range header and sent the whole object.
            data = data[offset : None if length is None else offset + length]
        return data

    def stat(self, key: str) -> ObjectInfo | None:
        name = self._name(key)
        try:
            reply = self._client.head_object(Bucket=self.bucket, Key=name)
        except self._sdk_errors() as exc:
            error = self._error(exc, "stat", key)
            if isinstance(error, ObjectNotFound):
                return None
            raise error from exc
        return ObjectInfo(key, int(reply["ContentLength"]), reply["LastModified"].timestamp())

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        infos: list[ObjectInfo] = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._root + prefix
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(self._root) :]
                    if _is_store_key(key):
                        infos.append(
                            ObjectInfo(key, int(obj["Size"]), obj["LastModified"].timestamp())
                        )
        except self._sdk_errors() as exc:
            raise self._error(exc, "list", prefix or "(all)") from exc
        infos.sort(key=lambda i: i.key)
        return iter(infos)

    def delete(self, key: str) -> None:
        name = self._name(key)
        try:
            self._client.delete_object(Bucket=self.bucket, Key=name)
        except self._sdk_errors() as exc:
            error = self._error(exc, "delete", key)
            if not isinstance(error, ObjectNotFound):
                raise error from exc


def _botocore_exceptions() -> Any:
    """``botocore.exceptions``, imported on first use (the SDK is untyped)."""
    from botocore import exceptions  # type: ignore[import-untyped]

    return exceptions


def _is_store_key(key: str) -> bool:
    try:
        validate_key(key)
    except InvalidKey:
        return False
    return True


def _make_client(**settings: Any) -> Any:
    """A boto3 S3 client for ``settings`` (see :func:`_build_client`), shared by backends
    with the same settings and the same credential environment."""
    env = tuple(os.environ.get(name) for name in _CREDENTIAL_ENV)
    cache_key = (*sorted(settings.items()), env)
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(cache_key)
        if client is None:
            client = _CLIENTS[cache_key] = _build_client(**settings)
    return client


#: Environment variables boto3's credential chain reads; part of the client cache key so a
#: changed environment gets a new client.
_CREDENTIAL_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)


def _build_client(
    *,
    endpoint_url: str | None,
    region: str | None,
    access_key: str | None,
    secret_key: str | None,
    session_token: str | None,
    sdk_attempts: int,
    connect_timeout: float,
    read_timeout: float,
) -> Any:
    try:
        import boto3  # type: ignore[import-untyped]
        from botocore.config import Config  # type: ignore[import-untyped]
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise StoreError(
            "the s3:// backend needs boto3", hint="pip install boto3 (or reinstall siterecovery)"
        ) from exc
    session = boto3.session.Session(
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        aws_session_token=session_token,
        region_name=region,
    )
    options: dict[str, Any] = {
        "retries": {"max_attempts": max(1, sdk_attempts), "mode": "standard"},
        "connect_timeout": connect_timeout,
        "read_timeout": read_timeout,
        "max_pool_connections": 32,
    }
    if endpoint_url:
        # S3-compatible servers: path-style addressing, and only the checksums S3 requires
        # (several servers reject the newer default trailing-checksum uploads).
        options["s3"] = {"addressing_style": "path"}
        options["request_checksum_calculation"] = "when_required"
        options["response_checksum_validation"] = "when_required"
    return session.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=session.region_name or "us-east-1",
        config=Config(**options),
    )


register_scheme("s3", S3Backend.from_url)
