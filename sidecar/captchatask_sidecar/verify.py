"""Optional verify-by-poll: confirm a pingback's answer with ``res.php`` before recording it.

Off by default. The signed URL already proves the pingback is addressed to one of our tasks;
this adds "and the provider really issued this answer", at the cost of one ``res.php`` call per
pingback and read access to the provider's key Secret (the only reason the sidecar would need
``get secrets``). The provider's answer is authoritative: when it differs from the pingback's,
the provider's is recorded. If the provider cannot confirm (not ready, unreachable), nothing is
written and the sender gets an error; the operator's fallback polling then settles the task.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from dataclasses import dataclass
from typing import Any, Final

import aiohttp

from captchatask import kube
from captchatask.decision import Result, ResultKind
from captchatask.model import DeliveredBy, TaskRef
from captchatask.provider import codes
from captchatask.provider.client import ProviderClient
from captchatask.provider.errors import ProviderError
from captchatask.provider.replies import Solution

logger = logging.getLogger(__name__)

#: A provider's key and URL are re-read this often (a rotated key Secret is picked up).
PROVIDER_CACHE_SECONDS: Final = 300.0
#: Total time for one confirmation call; the provider sent the pingback, so it is up.
VERIFY_TIMEOUT_SECONDS: Final = 5.0
DEFAULT_SECRET_KEY: Final = "apiKey"  # noqa: S105 - the CRD default key name, not a secret


class VerifyUnavailableError(Exception):
    """The provider (or its configuration) could not be reached to confirm."""


class NotConfirmedError(Exception):
    """The provider does not (yet) report a result for this task."""


@dataclass(frozen=True, slots=True)
class _Cached:
    client: ProviderClient
    loaded_at: float


class Verifier:
    """Confirms results with the provider named by ``provider`` in the task's namespace.

    Parameters
    ----------
    kube_client
        The API client (reads the CaptchaProvider and its key Secret).
    session
        An HTTP session for the provider (owned by the caller).
    provider
        The CaptchaProvider's name.
    """

    def __init__(
        self, *, kube_client: kube.KubeClient, session: aiohttp.ClientSession, provider: str
    ) -> None:
        self.kube_client = kube_client
        self.session = session
        self.provider = provider
        self._cache: dict[str, _Cached] = {}

    async def _client(self, namespace: str) -> ProviderClient:
        cached = self._cache.get(namespace)
        if cached is not None and time.monotonic() - cached.loaded_at < PROVIDER_CACHE_SECONDS:
            return cached.client
        try:
            provider = await self.kube_client.get(kube.PROVIDERS, namespace, self.provider)
            spec: dict[str, Any] = provider.get("spec") or {}
            ref: dict[str, Any] = spec.get("apiKeySecretRef") or {}
            secret = await self.kube_client.get(kube.SECRETS, namespace, str(ref.get("name", "")))
        except kube.KubeError as exc:
            raise VerifyUnavailableError("provider configuration unavailable") from exc
        raw = (secret.get("data") or {}).get(str(ref.get("key") or DEFAULT_SECRET_KEY))
        try:
            api_key = base64.b64decode(str(raw), validate=True).decode().strip()
        except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
            raise VerifyUnavailableError("provider key Secret is malformed") from exc
        client = ProviderClient(
            session=self.session,
            base_url=str(spec.get("baseURL") or "https://ocr.captchaai.com"),
            api_key=api_key,
            dialect=codes.Dialect(str(spec.get("dialect") or "captchaai")),
            timeout=VERIFY_TIMEOUT_SECONDS,
            transport_retries=0,
            max_inline_wait=0.0,
        )
        self._cache[namespace] = _Cached(client=client, loaded_at=time.monotonic())
        return client

    async def confirm(self, ref: TaskRef, result: Result) -> Result:
        """Return the result to record: the provider's own answer for this task id.

        Raises
        ------
        NotConfirmedError
            The provider says the task is not finished (or does not know it).
        VerifyUnavailableError
            The provider or its configuration could not be reached.
        """
        task_id = result.provider_task_id
        if not task_id:
            raise NotConfirmedError("no provider task id")
        client = await self._client(ref.namespace)
        try:
            polled = await client.get_result(task_id)
        except ProviderError as exc:
            raise VerifyUnavailableError("provider did not confirm") from exc
        if isinstance(polled, Solution):
            if result.kind is not ResultKind.SOLVED or polled.token != result.token:
                logger.warning(
                    "pingback for %s/%s differs from res.php; recording the provider's answer",
                    ref.namespace,
                    ref.name,
                )
            return Result.solved(
                token=polled.token,
                delivered_by=DeliveredBy.PINGBACK,
                provider_task_id=task_id,
                user_agent=polled.user_agent or result.user_agent,
            )
        if polled.verdict is codes.Verdict.TASK_FAILED:
            return Result.failed(
                code=polled.code,
                message=polled.reason,
                delivered_by=DeliveredBy.PINGBACK,
                provider_task_id=task_id,
            )
        raise NotConfirmedError(str(polled.verdict))
