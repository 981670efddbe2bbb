"""The vault's TLS material: its own CA, made at init, and a server certificate it signs.

Layout (``WORKDIR/pki``)::

    ca.pem        the CA certificate: copy it to agents and CLIs, which pin it
    ca.key        the CA's private key: stays on the vault host
    server.pem    the server certificate (localhost, 127.0.0.1, ::1, this host's names, extra)
    server.key    its private key

Every file is 0600 in a 0700 directory (:mod:`siterecovery.fsutil`); ``ca.pem`` is public,
but it is handed out by copying, not by reading it in place. Keys are ECDSA P-256.
:func:`ensure_pki` is idempotent: existing files are kept (a server
certificate missing a requested name is re-issued by the same CA). Clients build their TLS
context with :func:`client_context`, which trusts **only** the pinned CA.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from siterecovery.errors import InputError, NotFoundError
from siterecovery.fsutil import private_dir, write_private

CA_DAYS = 3650
SERVER_DAYS = 825


@dataclass(frozen=True)
class Pki:
    """Paths of a vault's TLS files under ``root``."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"


def ensure_pki(root: Path, *, hostnames: Sequence[str] = ()) -> Pki:
    """Make (or keep) the CA and a server certificate valid for ``hostnames`` and local names."""
    pki = Pki(root)
    private_dir(root)
    if not pki.ca_cert.exists():
        _make_ca(pki)
    names = _names(hostnames)
    if not pki.server_cert.exists() or not _covers(pki.server_cert, names):
        _make_server(pki, names)
    return pki


def client_context(ca_file: Path) -> ssl.SSLContext:
    """A TLS client context trusting only the CA in ``ca_file`` (hostnames are checked)."""
    if not ca_file.is_file():
        raise NotFoundError(
            f"vault CA certificate {ca_file} not found",
            hint="copy the vault's WORKDIR/pki/ca.pem, or use the key file it made",
        )
    context = ssl.create_default_context(cafile=str(ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def fingerprint(cert_pem: bytes) -> str:
    """The SHA-256 fingerprint of a PEM certificate, as colon-separated hex."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.fingerprint(hashes.SHA256()).hex(":")


def _names(extra: Sequence[str]) -> list[str]:
    names = ["localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn(), *extra]
    for name in extra:
        if not name or len(name) > 253 or any(c.isspace() for c in name):
            raise InputError(f"invalid server name {name!r} for the vault certificate")
    return sorted(set(names))


def _san(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _covers(cert_path: Path, names: Sequence[str]) -> bool:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    have = {str(v) for v in san.get_values_for_type(x509.DNSName)}
    have |= {str(v) for v in san.get_values_for_type(x509.IPAddress)}
    fresh = cert.not_valid_after_utc > datetime.now(UTC) + timedelta(days=30)
    return fresh and {str(ipaddress.ip_address(n)) if _is_ip(n) else n for n in names} <= have


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _make_ca(pki: Pki) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "siterecovery vault CA")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    _write_key(pki.ca_key, key)
    write_private(pki.ca_cert, cert.public_bytes(serialization.Encoding.PEM))


def _make_server(pki: Pki, names: Sequence[str]) -> None:
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "siterecovery vault")])
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=SERVER_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    _write_key(pki.server_key, key)
    write_private(pki.server_cert, cert.public_bytes(serialization.Encoding.PEM))


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private(path, data)
