"""Test certificates made with `cryptography`, on loopback names only: a CA, server
certificates for 127.0.0.1 and localhost, and client certificates, as PEM files."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import pytest

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402


def _name(common_name: str):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@dataclass
class Pki:
    """A CA in `folder`; `issue` writes a certificate and key it signed."""

    folder: Path

    def __post_init__(self):
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = self._sign("test ca", self.key.public_key(), ca=True)
        self.ca_file = self._write("ca.pem", self.cert.public_bytes(serialization.Encoding.PEM))

    def _sign(self, common_name: str, public_key, ca: bool = False, serial: int = 0,
              server: bool = False):
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (x509.CertificateBuilder().subject_name(_name(common_name))
                   .issuer_name(_name("test ca")).public_key(public_key)
                   .serial_number(serial or x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None),
                                  critical=True))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"),
                 x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def _write(self, name: str, data: bytes) -> str:
        path = self.folder / name
        path.write_bytes(data)
        return str(path)

    def issue(self, stem: str, server: bool = True, serial: int = 0) -> tuple[str, str]:
        """(cert file, key file) named stem.pem and stem.key."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._sign(stem, key.public_key(), serial=serial, server=server)
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return (self._write(f"{stem}.pem", cert.public_bytes(serialization.Encoding.PEM)),
                self._write(f"{stem}.key", key_pem))


def serial_of(pem_or_der: bytes) -> int:
    """The serial number of a certificate, PEM or DER."""
    if pem_or_der.lstrip().startswith(b"-----"):
        return x509.load_pem_x509_certificate(pem_or_der).serial_number
    return x509.load_der_x509_certificate(pem_or_der).serial_number
