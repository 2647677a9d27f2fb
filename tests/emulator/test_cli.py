"""``captchatask emulator`` / ``python -m captchatask.emulator``: options and a real process."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import sys

import aiohttp
import pytest

from captchatask.emulator.cli import build_parser, config_from_args, main
from captchatask.emulator.config import (
    DEFAULT_API_KEY,
    BusyBehaviour,
    EmulatorConfig,
    Faults,
    PingbackStyle,
)


def test_help_documents_every_knob(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    renamed = {
        "pingback_errors": "--no-error-pingbacks",
        "api_keys": "--key",
        "busy": "--busy",
        "pingback_hosts": "--pingback-host",
    }
    not_flags = {"solve_times", "user_agent", "faults", "seed", "id_type"}
    for item in dataclasses.fields(Faults):
        assert renamed.get(item.name, "--" + item.name.replace("_", "-")) in text, item.name
    for item in dataclasses.fields(EmulatorConfig):
        if item.name not in not_flags:
            assert renamed.get(item.name, "--" + item.name.replace("_", "-")) in text, item.name
    for flag in (
        "--seed",
        "--id-type",
        "--solve-time",
        "--res-502-burst",
        "--tls-cert",
        "/_emulator/",
    ):
        assert flag in text


def test_arguments_map_to_the_frozen_config() -> None:
    args = build_parser().parse_args(
        [
            "--seed=3",
            "--key",
            "k" * 32,
            "--threads=2",
            "--busy=queue",
            "--solve-time",
            "turnstile=1:2",
            "--solve-time-scale=0.01",
            "--pingback-style=2c-post",
            "--pingback-delay=0.1:0.3",
            "--pingback-retries=2",
            "--no-error-pingbacks",
            "--res-502-rate=0.25",
            "--max-user-turn",
            "--pingback-host=rx.a.svc",
            "--pingback-host=rx.b.svc",
        ]
    )
    config = config_from_args(args)
    assert config.pingback_hosts == frozenset({"rx.a.svc", "rx.b.svc"})
    assert config.seed == 3
    assert config.api_keys == frozenset({"k" * 32})
    assert (config.threads, config.busy) == (2, BusyBehaviour.QUEUE)
    assert config.solve_range("turnstile") == pytest.approx((0.01, 0.02))
    assert config.max_user_turn is True
    assert config.faults.pingback_style is PingbackStyle.TWOC_POST
    assert config.faults.pingback_delay == (0.1, 0.3)
    assert (config.faults.pingback_retries, config.faults.pingback_errors) == (2, False)
    assert config.faults.res_502_rate == 0.25


def test_invalid_values_exit_with_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--unsolvable-rate=2"]) == 2
    assert "unsolvable_rate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--solve-time", "nonsense=1:2"])


async def test_python_dash_m_serves_until_sigterm() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "captchatask.emulator",
        "--port=0",
        "--seed=1",
        "--solve-time-scale=0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(20):
            line = (await process.stdout.readline()).decode()
        base_url = line.rsplit(" ", 1)[-1].strip()
        assert base_url.startswith("http://127.0.0.1:")
        async with aiohttp.ClientSession() as session:
            fields = {
                "key": DEFAULT_API_KEY,
                "method": "turnstile",
                "sitekey": "0x4AAAAAAAB",
                "pageurl": "https://a.b/",
            }
            async with session.post(f"{base_url}/in.php", data=fields) as response:
                assert (await response.text()).startswith("OK|")
            async with session.get(f"{base_url}/_emulator/summary") as response:
                assert (await response.json())["totals"]["tasks_created"] == 1
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            await process.wait()
    assert process.returncode == 0
