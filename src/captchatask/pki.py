"""Throw-away certificate authorities for the local control plane.

A real kube-apiserver needs three pieces of key material that a test run owns outright: a CA
that signs its TLS serving certificate (so clients can verify it instead of turning verification
off), a separate CA whose client certificates it accepts as identities (``CN`` is the user name,
``O`` the groups, exactly how envtest's ``tinyca`` models users), and a key pair that signs
service-account tokens. Keeping the serving and client CAs apart means a leaked client
certificate can never impersonate the server and vice versa, as in a real cluster.

Keys are ECDSA P-256: tiny, fast to generate (a whole PKI takes milliseconds) and accepted by
kube-apiserver for TLS, client authentication and service-account token signing (ES256).
Nothing here is meant to protect anything: the material lives on loopback for the life of a
test bed, which is why the validity is short and the keys are written unencrypted.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CERT_VALIDITY",
    "CertificateAuthority",
    "IssuedCertificate",
    "generate_signing_key",
    "private_key_pem",
    "public_key_pem",
]

#: How long generated certificates stay valid. envtest uses 7 days; a developer's
#: ``captchatask testbed up`` may stay running longer than a test session, so a month avoids a
#: surprising expiry while still keeping the throw-away material short-lived.
CERT_VALIDITY: Final = datetime.timedelta(days=30)

#: Backdate ``not_valid_before`` a little so a clock that is slightly behind still accepts the
#: certificate immediately after it was minted.
CLOCK_SKEW_ALLOWANCE: Final = datetime.timedelta(minutes=5)

#: The organisation written into every CA subject, so the certificates are recognisable.
CA_ORGANIZATION: Final = "captchatask-testbed"


def generate_signing_key() -> ec.EllipticCurvePrivateKey:
    """Return a fresh ECDSA P-256 private key.

    Returns
    -------
    ec.EllipticCurvePrivateKey
        A new key; P-256 is what every consumer here (Go's TLS stack, the service-account token
        signer) supports without configuration.
    """
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Serialise ``key`` as an unencrypted PKCS#8 PEM, the format Go's ``tls`` package reads.

    Parameters
    ----------
    key
        The key to serialise.

    Returns
    -------
    bytes
        The PEM text.
    """
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def public_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Serialise the public half of ``key`` (``--service-account-key-file`` accepts it).

    Parameters
    ----------
    key
        The private key whose public key is wanted.

    Returns
    -------
    bytes
        The SubjectPublicKeyInfo PEM text.
    """
    return key.public_key().public_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PublicFormat.SubjectPublicKeyInfo,
    )


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate together with its private key, both PEM encoded.

    Attributes
    ----------
    cert_pem
        The certificate.
    key_pem
        The unencrypted private key.
    """

    cert_pem: bytes
    key_pem: bytes

    def write(self, *, cert_path: Path, key_path: Path) -> None:
        """Write the certificate and key; the key file is readable by the owner only.

        Parameters
        ----------
        cert_path
            Where the certificate goes.
        key_path
            Where the private key goes (mode 0600).
        """
        cert_path.write_bytes(self.cert_pem)
        key_path.touch(mode=0o600)
        key_path.write_bytes(self.key_pem)


@dataclass(frozen=True)
class CertificateAuthority:
    """A self-signed CA that can issue serving and client certificates.

    Attributes
    ----------
    key
        The CA's private key.
    certificate
        The CA's self-signed certificate.
    """

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @classmethod
    def create(cls, common_name: str) -> CertificateAuthority:
        """Create a new CA named ``common_name``.

        Parameters
        ----------
        common_name
            The subject CN; it shows up in TLS errors, so it says what the CA is for.

        Returns
        -------
        CertificateAuthority
            The new CA.
        """
        key = generate_signing_key()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, CA_ORGANIZATION),
            ]
        )
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW_ALLOWANCE)
            .not_valid_after(now + CERT_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
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
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(key=key, certificate=certificate)

    @classmethod
    def load(cls, *, cert_path: Path, key_path: Path) -> CertificateAuthority:
        """Load a CA written earlier by :meth:`write`.

        Parameters
        ----------
        cert_path
            The CA certificate PEM.
        key_path
            The CA private key PEM.

        Returns
        -------
        CertificateAuthority
            The CA, able to issue more certificates (e.g. for a user added later).
        """
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TypeError(f"{key_path} does not hold an ECDSA private key")
        return cls(key=key, certificate=x509.load_pem_x509_certificate(cert_path.read_bytes()))

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate as PEM (what clients put in ``certificate-authority-data``)."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def write(self, *, cert_path: Path, key_path: Path) -> None:
        """Write the CA certificate and key (the key with mode 0600).

        Parameters
        ----------
        cert_path
            Where the certificate goes.
        key_path
            Where the private key goes.
        """
        IssuedCertificate(cert_pem=self.cert_pem, key_pem=private_key_pem(self.key)).write(
            cert_path=cert_path, key_path=key_path
        )

    def issue_serving(
        self, *, common_name: str, dns_names: tuple[str, ...], ip_addresses: tuple[str, ...]
    ) -> IssuedCertificate:
        """Issue a TLS server certificate for the given names.

        Parameters
        ----------
        common_name
            The subject CN (informational; clients verify the SANs).
        dns_names
            DNS subject alternative names, e.g. ``("localhost",)``.
        ip_addresses
            IP subject alternative names, e.g. ``("127.0.0.1",)``.

        Returns
        -------
        IssuedCertificate
            The certificate and its new key.
        """
        sans: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
        return self._issue(
            subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]),
            usage=ExtendedKeyUsageOID.SERVER_AUTH,
            sans=sans,
        )

    def issue_client(self, *, user: str, groups: tuple[str, ...] = ()) -> IssuedCertificate:
        """Issue a client certificate that kube-apiserver maps to ``user`` in ``groups``.

        Parameters
        ----------
        user
            The user name (subject CN).
        groups
            The groups (one subject O attribute each), e.g. ``("system:masters",)``.

        Returns
        -------
        IssuedCertificate
            The certificate and its new key.
        """
        attributes = [x509.NameAttribute(NameOID.COMMON_NAME, user)]
        attributes += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, group) for group in groups]
        return self._issue(
            subject=x509.Name(attributes), usage=ExtendedKeyUsageOID.CLIENT_AUTH, sans=[]
        )

    def _issue(
        self, *, subject: x509.Name, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName]
    ) -> IssuedCertificate:
        key = generate_signing_key()
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW_ALLOWANCE)
            .not_valid_after(now + CERT_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        certificate = builder.sign(self.key, hashes.SHA256())
        return IssuedCertificate(
            cert_pem=certificate.public_bytes(serialization.Encoding.PEM),
            key_pem=private_key_pem(key),
        )
