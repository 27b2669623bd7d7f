"""Throwaway PKI for the TLS tests, made at test time with `cryptography` (keys never touch the repo).

    pki = make_pki(tmp_path)
    pki.ca, pki.server_cert, pki.server_key          # server for 127.0.0.1 / ::1 / localhost
    pki.client_cert, pki.client_key                  # client certificate signed by the same CA
    pki.rogue_client_cert, pki.rogue_client_key      # a client certificate from another CA
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_client_cert: Path
    rogue_client_key: Path

    def server_env(self, prefix: str, *, mutual: bool = False) -> dict[str, str]:
        """`{prefix}_TLS_CERT_FILE`, `..._KEY_FILE` and, for mutual TLS, `..._CLIENT_CA_FILE`."""
        env = {f"{prefix}_TLS_CERT_FILE": str(self.server_cert), f"{prefix}_TLS_KEY_FILE": str(self.server_key)}
        if mutual:
            env[f"{prefix}_TLS_CLIENT_CA_FILE"] = str(self.ca)
        return env

    def client_env(self, prefix: str, *, with_cert: bool = False) -> dict[str, str]:
        """`{prefix}_TLS_CA_FILE` and, with a client certificate, `..._CLIENT_CERT_FILE` / `..._CLIENT_KEY_FILE`."""
        env = {f"{prefix}_TLS_CA_FILE": str(self.ca)}
        if with_cert:
            env[f"{prefix}_TLS_CLIENT_CERT_FILE"] = str(self.client_cert)
            env[f"{prefix}_TLS_CLIENT_KEY_FILE"] = str(self.client_key)
        return env


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)
    return path


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _authority(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    common_name: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    *,
    usage: x509.ObjectIdentifier,
    names: list[x509.GeneralName],
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    issuer_cert, issuer_key = issuer
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    authority = _authority("export-metering test CA")
    rogue = _authority("someone else's CA")
    server = _leaf(
        "localhost",
        authority,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        names=[
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ],
    )
    client = _leaf("renderer", authority, usage=ExtendedKeyUsageOID.CLIENT_AUTH, names=[])
    rogue_client = _leaf("intruder", rogue, usage=ExtendedKeyUsageOID.CLIENT_AUTH, names=[])
    return Pki(
        ca=_write_cert(directory / "ca.pem", authority[0]),
        server_cert=_write_cert(directory / "server.pem", server[0]),
        server_key=_write_key(directory / "server.key", server[1]),
        client_cert=_write_cert(directory / "client.pem", client[0]),
        client_key=_write_key(directory / "client.key", client[1]),
        rogue_ca=_write_cert(directory / "rogue-ca.pem", rogue[0]),
        rogue_client_cert=_write_cert(directory / "rogue-client.pem", rogue_client[0]),
        rogue_client_key=_write_key(directory / "rogue-client.key", rogue_client[1]),
    )
