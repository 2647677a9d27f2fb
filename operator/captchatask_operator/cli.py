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
import secrets
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import kopf
from prometheus_client import REGISTRY

from captchatask.signing import PingbackSigner, SigningKeyError, load_keys
from captchatask_operator import settings as settings_module
from captchatask_operator.handlers import Runtime, build_registry, configure_kopf

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: The variables that name this operator's pod (the chart sets the first by the downward API;
#: kopf itself reads the second).
POD_NAME_VARIABLES = ("CAPTCHATASK_POD_NAME", "POD_ID")


def peering_identity(environ: Mapping[str, str]) -> str:
    """Return this operator's identity among its peers: the pod name when known.

    kopf's own default calls :func:`getpass.getuser`, which raises ``KeyError`` when the
    process's uid has no passwd entry: the chart's ``runAsUser: 65532`` in an image without one,
    or any uid a platform assigns. With peering on, the operator then crashed at start, every
    time, in every pod. The pod name is also what a person reading the peering object wants to
    see; outside a pod, host, pid and a random suffix keep two processes apart.
    """
    for variable in POD_NAME_VARIABLES:
        if environ.get(variable):
            return environ[variable]
    return f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"


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
            # kopf's Identity is a NewType of str that kopf does not export.
            identity=cast("Any", peering_identity(os.environ)),
            peering_name=settings.peering if settings.peering_enabled else None,
            priority=settings.peering_priority,
            clusterwide=settings.all_namespaces,
            namespaces=list(settings.namespaces),
        )
    )
    return 0
