"""Self-signed certificates for test servers (HTTPS registries, token signers)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def self_signed(key: ec.EllipticCurvePrivateKey, common_name: str, *, ip: str | None = None,
                ca: bool = False, days: int = 1) -> x509.Certificate:
    """A certificate for ``key`` signed by itself; ``ip`` adds an IP subjectAltName."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=days))
    )
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    if ip is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), False)
    return builder.sign(key, hashes.SHA256())


def server_certificate(workdir: Path, ip: str = "127.0.0.1") -> tuple[Path, Path]:
    """Write a self-signed certificate and key for a server at ``ip``; returns (cert, key) paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert_path, key_path = workdir / "cert.pem", workdir / "key.pem"
    cert_path.write_bytes(self_signed(key, ip, ip=ip).public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path
