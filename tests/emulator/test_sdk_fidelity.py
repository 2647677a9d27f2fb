"""Fidelity: clients nobody here wrote solve against the emulator.

* The official ``captchaai`` SDK (1.0.1) points at the emulator through its ``base_url``
  argument. Its first-poll waits (10-15 s) live in the SDK's registry table, the SDK's own
  extension point ("adding a type = adding a row"); the test swaps in rows with zero initial
  wait, and sets the ``jitter_max`` field of the client's Config dataclass to 0 (the
  constructor does not expose it). The HTTP layer is untouched.
* ``2captcha-python`` hard-codes ``https://{server}/``, so the emulator serves TLS on loopback
  with a throw-away self-signed certificate, trusted through ``REQUESTS_CA_BUNDLE``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import gc
import ipaddress
import ssl
from pathlib import Path

import captchaai
import pytest
from captchaai.core import registry
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twocaptcha import TwoCaptcha
from twocaptcha.api import ApiException

from captchatask.emulator.config import DEFAULT_API_KEY, EmulatorConfig
from captchatask.emulator.server import RunningEmulator, run_emulator

SITEKEY = "6LeIxAcTAAAAAJcZVRqyHh71UMIEGNQ_MXjiZKhI"
PAGE = "https://example.com/"
QUICK = EmulatorConfig(seed=9, solve_time_scale=0.0005)  # v2: 10-30 ms


@pytest.fixture
def fast_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("recaptcha_v2", "turnstile"):
        row = registry.REGISTRY[name]
        monkeypatch.setitem(
            registry.REGISTRY, name, dataclasses.replace(row, initial_wait=0.0, poll_interval=0.005)
        )


async def sdk_client(
    emulator: RunningEmulator, key: str = DEFAULT_API_KEY
) -> captchaai.AsyncCaptchaAI:
    client = await captchaai.AsyncCaptchaAI.create(api_key=key, base_url=emulator.base_url)
    client._config = dataclasses.replace(client._config, jitter_max=0.0)
    return client


@pytest.mark.usefixtures("fast_sdk")
async def test_captchaai_sdk_solves_recaptcha_v2_and_turnstile() -> None:
    async with run_emulator(QUICK) as emulator:
        client = await sdk_client(emulator)
        try:
            assert await client.threads_info() == {"threads": 50, "working_threads": 0}
            v2 = await client.recaptcha_v2(SITEKEY, PAGE)
            turnstile = await client.turnstile("0x4AAAAAAAB", PAGE)
        finally:
            await client.aclose()
        for result, kind in ((v2, "recaptcha_v2"), (turnstile, "turnstile")):
            task = emulator.task(str(result.task_id))
            assert task.kind == kind
            assert result.solution == task.token
            assert task.res_calls >= 1


@pytest.mark.usefixtures("fast_sdk")
async def test_captchaai_sdk_raises_unsolvable() -> None:
    config = EmulatorConfig(solve_time_scale=0.0, unsolvable_rate=1.0)
    async with run_emulator(config) as emulator:
        client = await sdk_client(emulator)
        try:
            with pytest.raises(captchaai.UnsolvableError):
                await client.recaptcha_v2(SITEKEY, PAGE)
        finally:
            await client.aclose()


# AsyncCaptchaAI.create() never closes its httpx client when the key check fails; collect the
# leaked socket here so its ResourceWarning is attributed to this test and not a later one.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_captchaai_sdk_rejects_a_wrong_key_at_startup() -> None:
    async with run_emulator(QUICK) as emulator:
        with pytest.raises(captchaai.InvalidKeyError):
            await sdk_client(emulator, key="z" * 32)
        assert emulator.summary()["reply_codes"] == {"ERROR_KEY_DOES_NOT_EXIST": 1}
    gc.collect()


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_2captcha_sdk_over_tls_solves_reports_and_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    config = EmulatorConfig(seed=3, solve_time_scale=0.0)
    async with run_emulator(config, ssl_context=context) as emulator:
        server = f"127.0.0.1:{emulator.port}"
        # pollingInterval < 1 becomes int(...) == 0 inside the SDK: no real sleeping.
        solver = TwoCaptcha(DEFAULT_API_KEY, server=server, pollingInterval=0.001)
        result = await asyncio.to_thread(solver.recaptcha, sitekey=SITEKEY, url=PAGE)
        task = emulator.task(result["captchaId"])
        assert result["code"] == task.token
        assert await asyncio.to_thread(solver.balance) == pytest.approx(
            config.balance - config.price
        )
        assert (
            await asyncio.to_thread(solver.report, result["captchaId"], False)
            == "OK_REPORT_RECORDED"
        )
        assert task.reported == "bad"

        wrong = TwoCaptcha("w" * 32, server=server, pollingInterval=0.001)
        with pytest.raises(ApiException, match="ERROR_KEY_DOES_NOT_EXIST"):
            await asyncio.to_thread(wrong.recaptcha, sitekey=SITEKEY, url=PAGE)

    unsolvable = dataclasses.replace(config, unsolvable_rate=1.0)
    async with run_emulator(unsolvable, ssl_context=context) as emulator:
        solver = TwoCaptcha(
            DEFAULT_API_KEY, server=f"127.0.0.1:{emulator.port}", pollingInterval=0.001
        )
        with pytest.raises(ApiException, match="ERROR_CAPTCHA_UNSOLVABLE"):
            await asyncio.to_thread(solver.turnstile, sitekey="0x4AAAAAAAB", url=PAGE)
