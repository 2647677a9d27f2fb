"""The typed ``web.AppKey``s of the sidecar's three applications (and nothing else).

The value types are imported for the type checker only: the modules that define them import
this one, so a runtime import would be circular.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from aiohttp import web

if TYPE_CHECKING:
    from captchatask_sidecar.admin import Health  # noqa: F401 - used in AppKey[...] strings
    from captchatask_sidecar.local_api import LocalApi  # noqa: F401
    from captchatask_sidecar.pingback import PingbackReceiver  # noqa: F401

PINGBACK: Final = web.AppKey["PingbackReceiver"]("pingback")
LOCAL_API: Final = web.AppKey["LocalApi"]("local_api")
HEALTH: Final = web.AppKey["Health"]("health")
