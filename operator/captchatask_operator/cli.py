"""``captchatask operator``: read settings once, then run kopf with our registry.

kopf is run programmatically (:func:`kopf.operator`) rather than through ``kopf run``, so the
settings, the registry and the peering mode are ours and explicit. Without ``--peering`` the
operator is always standalone: kopf's auto-detection of a ``default`` peering object would let
a stray object silently change how the operator behaves.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import kopf
from prometheus_client import REGISTRY

from captchatask.signing import PingbackSigner, SigningKeyError, load_keys
from captchatask_operator import settings as settings_module
from captchatask_operator.handlers import Runtime, build_registry, configure_kopf

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def main(argv: Sequence[str]) -> int:
    """Run the operator until SIGTERM/SIGINT; return the exit status."""
    settings = settings_module.parse(argv, os.environ)
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    if logging.getLogger().level > logging.DEBUG:
        # kopf logs every successful handler call at INFO: one line per watch event.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    signer: PingbackSigner | None = None
    if settings.pingback_key_file:
        try:
            signer = PingbackSigner(load_keys(Path(settings.pingback_key_file)))
        except (OSError, SigningKeyError) as exc:
            logging.getLogger(__name__).error("pingback key file unusable: %s", exc)  # noqa: TRY400
            return 2
    runtime = Runtime(settings, registry=REGISTRY, signer=signer)
    registry = build_registry(runtime)
    kopf_settings = kopf.OperatorSettings()
    configure_kopf(kopf_settings, settings)
    asyncio.run(
        kopf.operator(
            registry=registry,
            settings=kopf_settings,
            standalone=not settings.peering_enabled,
            peering_name=settings.peering if settings.peering_enabled else None,
            priority=settings.peering_priority,
            clusterwide=settings.all_namespaces,
            namespaces=list(settings.namespaces),
        )
    )
    return 0
