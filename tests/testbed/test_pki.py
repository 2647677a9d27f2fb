"""The throw-away PKI issues what kube-apiserver expects: serving SANs, CN=user, O=groups."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from captchatask import pki


def _load(cert_pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(cert_pem)


def test_serving_certificate_names_localhost_and_loopback_and_is_signed_by_the_ca() -> None:
    ca = pki.CertificateAuthority.create("test-serving-ca")
    issued = ca.issue_serving(
        common_name="localhost", dns_names=("localhost",), ip_addresses=("127.0.0.1",)
    )
    cert = _load(issued.cert_pem)

    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    cert.verify_directly_issued_by(ca.certificate)


def test_client_certificate_carries_the_user_as_cn_and_groups_as_o() -> None:
    ca = pki.CertificateAuthority.create("test-client-ca")
    cert = _load(ca.issue_client(user="alice", groups=("devs", "ops")).cert_pem)

    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == ["alice"]
    groups = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
    assert groups == ["devs", "ops"]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    cert.verify_directly_issued_by(ca.certificate)


def test_a_ca_written_to_disk_loads_back_and_keeps_issuing(tmp_path: Path) -> None:
    ca = pki.CertificateAuthority.create("test-ca")
    ca.write(cert_path=tmp_path / "ca.crt", key_path=tmp_path / "ca.key")

    loaded = pki.CertificateAuthority.load(
        cert_path=tmp_path / "ca.crt", key_path=tmp_path / "ca.key"
    )

    assert (tmp_path / "ca.key").stat().st_mode & 0o077 == 0
    assert isinstance(loaded.key, ec.EllipticCurvePrivateKey)
    assert loaded.certificate == ca.certificate
    _load(loaded.issue_client(user="bob").cert_pem).verify_directly_issued_by(ca.certificate)
