"""``captchatask sidecar``: parse settings, configure logging, serve until SIGTERM.

Exit status: 0 after a graceful shutdown, 2 for a configuration error (the message names the
env var or flag), 1 when startup fails (unreadable key file, port in use, no kubeconfig).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Final

from prometheus_client import REGISTRY

from captchatask.kube import KubeError
from captchatask.signing import SigningKeyError
from captchatask_sidecar.accesslog import install_log_filters
from captchatask_sidecar.server import serve
from captchatask_sidecar.settings import Settings, SettingsError, load

LOG_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
EXIT_STARTUP_FAILED: Final = 1
EXIT_BAD_CONFIG: Final = 2


async def _run(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await serve(settings, registry=REGISTRY, stop=stop)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sidecar; see the module docstring for the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        settings = load(args, os.environ)
    except SettingsError as exc:
        print(f"captchatask sidecar: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    logging.basicConfig(level=settings.log_level, format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    install_log_filters()
    try:
        asyncio.run(_run(settings))
    except (OSError, SigningKeyError, KubeError, SettingsError) as exc:
        logging.getLogger("captchatask_sidecar").error("startup failed: %s", exc)  # noqa: TRY400
        return EXIT_STARTUP_FAILED
    except Exception as exc:  # the kubernetes package raises its own ConfigException
        if type(exc).__name__ != "ConfigException":
            raise
        logging.getLogger("captchatask_sidecar").error("no Kubernetes configuration: %s", exc)  # noqa: TRY400
        return EXIT_STARTUP_FAILED
    return 0
