"""A small private PKI with `cryptography`: a CA, server certificates for the hosts a
service listens on, client certificates (device identity for mTLS), and certificate
signing requests, so that a party that needs a client certificate keeps its private
key and sends only the request. PEM files."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtune.errors import FedtuneError

VALID_DAYS = 365


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtune"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _load(folder: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), password=None)
    except FileNotFoundError as err:
        raise FedtuneError(f"{err.filename}: missing; create the CA first (fedtune certs create)") from None
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def create_ca(folder: str | Path, common_name: str = "fedtune CA") -> Path:
    """`ca.pem` and `ca.key` in `folder` (never overwritten)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "ca.pem").exists():
        return out / "ca.pem"
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write_key(out / "ca.key", key)
    (out / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return out / "ca.pem"


def issue(folder: str | Path, name: str, hosts: Sequence[str] = (), client: bool = False) -> tuple[Path, Path]:
    """`NAME.pem` + `NAME.key` signed by the CA in `folder`: a server certificate for
    `hosts` (DNS names or IPs), or a client certificate when `client`."""
    out = Path(folder)
    ca_cert, ca_key = _load(out)
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]),
            critical=False,
        )
    )
    if hosts:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_key(out / f"{name}.key", key)
    (out / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return out / f"{name}.pem", out / f"{name}.key"


def make_csr(folder: str | Path, name: str) -> tuple[Path, Path]:
    """`NAME.tls.key` (0600, never overwritten) and `NAME.csr`: a signing request for a
    client certificate with common name `name`; only the .csr leaves the folder."""
    out = Path(folder)
    key_path, csr_path = out / f"{name}.tls.key", out / f"{name}.csr"
    if key_path.exists():
        raise FedtuneError(f"{key_path}: already exists; refusing to overwrite a private key")
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(_name(name)).sign(key, hashes.SHA256())
    _write_key(key_path, key)
    csr_path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    return key_path, csr_path


def sign_csr(folder: str | Path, csr_path: str | Path, out: str | Path) -> tuple[Path, str]:
    """A client certificate for the request in `csr_path`, signed by the CA in `folder`,
    written to `out`; returns it and its common name. Refuses a private key sent by
    mistake, a malformed request and one whose signature does not verify."""
    csr_path = Path(csr_path)
    try:
        data = csr_path.read_bytes()
    except OSError as err:
        raise FedtuneError(f"{csr_path}: cannot read the signing request ({err.strerror})") from None
    if b"PRIVATE KEY" in data:
        raise FedtuneError(f"{csr_path}: this is a private key; the site sends only its .csr and keeps the key")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError:
        raise FedtuneError(
            f"{csr_path}: not a PEM certificate signing request (fedtune deploy site-key makes one)"
        ) from None
    if not csr.is_signature_valid:
        raise FedtuneError(f"{csr_path}: the request's signature does not verify")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise FedtuneError(f"{csr_path}: the request names no common name")
    common_name = str(names[0].value)
    ca_cert, ca_key = _load(Path(folder))
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return out, common_name


def read_pem(path: str | Path | None, what: str) -> bytes | None:
    """A file's bytes; a PEM certificate (`what` names one, or a CA) or private key (`what`
    ends in "key") is parsed before gRPC sees it: a missing, unreadable or malformed file is
    one line naming it."""
    if path is None:
        return None
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise FedtuneError(f"{path}: {what} file not found") from None
    except OSError as err:
        raise FedtuneError(f"{path}: cannot read {what}: {err.strerror}") from None
    try:
        if "certificate" in what or "CA" in what:
            x509.load_pem_x509_certificates(data)
        elif what.endswith("key"):
            serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise FedtuneError(f"{path}: not a usable PEM {what} ({str(err).splitlines()[0]})") from None
    return data
