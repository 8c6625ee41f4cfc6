"""HTTPS for the stand-in: a certificate authority generated on this machine, kept in a directory of its own, and
a server certificate it signs for the stand-in's host.

Bitrix24 is HTTPS only; an app, its SDK or the backend then talk to the stand-in exactly as they talk to a
portal, with certificate checks on, once they trust ``ca.pem`` (``REQUESTS_CA_BUNDLE`` for requests,
``SSL_CERT_FILE`` for Python's ``ssl`` and aiohttp, ``NODE_EXTRA_CA_CERTS`` for Node, the product's
``BITRIX24_CA_BUNDLE``, or a browser's certificate settings). The authority is made once and reused, so that
trust given to it survives restarts; the server certificate is made anew at each start (it is cheap, and
names whatever host the stand-in listens on). Its private key never leaves the directory (mode 0600).

Needs the ``cryptography`` package (the product's requirements have it); the rest of the stand-in is standard
library only and does not import this module unless HTTPS is asked for.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["LocalCA"]

CA_NAME = "Bitrix24 stand-in local CA"
CA_DAYS = 3650
# Browsers refuse server certificates valid for longer than 398 days.
SERVER_DAYS = 397


class LocalCA:
    """The authority in ``directory`` (created on first use): ``ca.pem`` to trust, and a server context."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    @property
    def ca_path(self) -> Path:
        """The authority's certificate, to give to clients (never its key)."""
        return self.directory / "ca.pem"

    def server_context(self, host: str) -> ssl.SSLContext:
        """A server-side TLS context with a fresh certificate for ``host``, ``127.0.0.1`` and ``localhost``."""
        key_path, cert_path = self.server_certificate(host)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert_path, key_path)
        return context

    def ensure(self) -> Path:
        """Make the authority if it is not there yet; its certificate's path."""
        self._authority()
        return self.ca_path

    # ---- making the certificates

    def _authority(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """The CA's key and certificate, made on first use."""

        key_path = self.directory / "ca.key"
        if key_path.exists() and self.ca_path.exists():
            loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(loaded, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{key_path} is not this stand-in's authority key: remove the directory")
            return loaded, x509.load_pem_x509_certificate(self.ca_path.read_bytes())
        self.directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
        now = dt.datetime.now(dt.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_private(key_path, _key_pem(key))
        self.ca_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        return key, certificate

    def server_certificate(self, host: str) -> tuple[Path, Path]:
        """A new key and certificate for ``host`` (and ``127.0.0.1``, ``localhost``): their paths."""
        ca_key, ca_certificate = self._authority()
        names: list[x509.GeneralName] = [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            if host and host != "localhost":
                names.append(x509.DNSName(host))
        else:
            if str(address) != "127.0.0.1":
                names.append(x509.IPAddress(address))
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        authority_key = ca_certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host or "localhost")]))
            .issuer_name(ca_certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(authority_key), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        key_path = self.directory / "server.key"
        cert_path = self.directory / "server.pem"
        _write_private(key_path, _key_pem(key))
        cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        return key_path, cert_path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_private(path: Path, data: bytes) -> None:
    """A private key, readable by its owner only from the first byte on."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


if (
    __name__ == "__main__"
):  # python -m standin.tls DIR: make the authority in DIR, print its certificate's path
    print(LocalCA(sys.argv[1] if len(sys.argv) > 1 else "var/standin/tls").ensure().resolve())
