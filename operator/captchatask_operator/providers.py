"""Provider checks: read the key Secret, check the account, write the ``Ready`` condition.

A check runs when a provider appears or its spec changes, every ``recheckSeconds`` while it is
Ready and every ``--provider-retry-seconds`` while it is not (so a fixed Secret is noticed
quickly: each check re-reads the Secret and notices a changed key by its resourceVersion). A
configuration error seen by a submission or a poll marks the provider not Ready at once
(:meth:`ProviderChecks.mark_not_ready`). Readiness changes re-decide every task of the provider
(parking or releasing them). The verdicts themselves are pure (:func:`policy.provider_verdict`).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import logging
from collections.abc import Mapping
from typing import Any

from captchatask import kube, model
from captchatask.decision import set_condition
from captchatask.events import EventType, ObjectRef
from captchatask.provider.client import ProviderClient
from captchatask.provider.codes import Dialect
from captchatask.provider.errors import ProviderError
from captchatask_operator import policy
from captchatask_operator.actions import Deps, EngineActions, ProviderState
from captchatask_operator.schedule import Kind

logger = logging.getLogger(__name__)

ProviderKey = tuple[str, str]


class ProviderChecks:
    """The provider part of the engine (one check per provider at a time)."""

    def __init__(self, engine: EngineActions, deps: Deps) -> None:
        self.engine = engine
        self.deps = deps
        self._checking: set[ProviderKey] = set()

    def clear(self) -> None:
        """Forget running checks (the engine became a standby)."""
        self._checking.clear()

    def start(self, key: ProviderKey) -> None:
        """Start a check of one provider unless one is already running (timer entry)."""
        if key not in self._checking:
            self._checking.add(key)
            self.engine.spawn(self._check(key))

    def mark_not_ready(self, state: ProviderState, verdict: policy.ProviderVerdict) -> None:
        """A request just failed with a configuration error: stop submitting, re-check soon."""
        engine = self.engine
        if state.ready:
            state.ready = False
            state.reason = verdict.reason
            state.message = verdict.message
            self.deps.metrics.provider_ready.labels(*state.spec.key).set(0)
        engine.schedule_at(
            Kind.PROVIDER,
            state.spec.key,
            self.deps.clock() + dt.timedelta(seconds=self.deps.settings.provider_retry_seconds),
        )

    async def _check(self, key: ProviderKey) -> None:
        """Read the key Secret, check the account, write the provider status, reschedule."""
        engine = self.engine
        try:
            state = engine.providers.get(key)
            if state is None:
                return
            verdict = await self._probe(state)
            await self.apply_verdict(state, verdict)
        except kube.KubeError as exc:
            logger.warning("provider check of %s/%s postponed: %s", *key, exc)
            engine.schedule_at(Kind.PROVIDER, key, self.deps.clock() + policy.API_RETRY)
        finally:
            self._checking.discard(key)

    async def _probe(self, state: ProviderState) -> policy.ProviderVerdict:
        spec = state.spec
        state.threads = None
        state.balance = None
        if spec.public_url is not None and self.deps.signer is None:
            return policy.ProviderVerdict(
                False,
                policy.ProviderReason.PINGBACK_KEY_MISSING,
                "spec.pingback.publicURL is set but the operator has no pingback key file",
            )
        try:
            secret = await self.deps.client.get(kube.SECRETS, spec.namespace, spec.secret_name)
        except kube.ApiError as exc:
            if exc.not_found:
                return policy.ProviderVerdict(
                    False,
                    policy.ProviderReason.SECRET_NOT_FOUND,
                    f"Secret {spec.secret_name!r} not found",
                )
            raise
        api_key = secret_value(secret, spec.secret_key)
        if not api_key:
            return policy.ProviderVerdict(
                False,
                policy.ProviderReason.SECRET_KEY_MISSING,
                f"Secret {spec.secret_name!r} has no key {spec.secret_key!r}",
            )
        version = f"{secret.get('metadata', {}).get('resourceVersion', '')}/{spec.secret_key}"
        if (
            state.client is None
            or state.key_version != version
            or state.client_generation != spec.generation
        ):
            state.client = ProviderClient(
                session=self.deps.http,
                base_url=spec.base_url,
                api_key=api_key,
                dialect=spec.dialect,
                timeout=self.deps.settings.provider_timeout,
                transport_retries=self.deps.settings.provider_transport_retries,
                observer=self.deps.metrics.observer(*spec.key),
                bulk_results=None if spec.polling.bulk else False,
            )
            state.key_version = version
            state.client_generation = spec.generation
        try:
            if spec.dialect is Dialect.CAPTCHAAI:
                state.threads = await state.client.threads_info()
                return policy.provider_verdict(spec.dialect, threads=state.threads)
            state.balance = await state.client.get_balance()
            return policy.provider_verdict(spec.dialect, balance=state.balance)
        except ProviderError as exc:
            return policy.provider_verdict(spec.dialect, error=exc.classification)

    async def apply_verdict(self, state: ProviderState, verdict: policy.ProviderVerdict) -> None:
        """Record a check's verdict: status, Events, re-decide tasks on a change, reschedule."""
        engine = self.engine
        spec = state.spec
        if verdict.transient:
            state.transient_failures += 1
            if not policy.declares_unreachable(
                state.transient_failures,
                unreachable_after=self.deps.settings.provider_unreachable_after,
            ):
                await self._keep_readiness(state, verdict)
                return
        else:
            state.transient_failures = 0
        was_ready = state.ready
        first_check = not state.checked
        state.checked = True
        state.ready = verdict.ready
        state.reason = verdict.reason
        state.message = verdict.message
        self.deps.metrics.provider_ready.labels(*spec.key).set(1 if verdict.ready else 0)
        now = self.deps.clock()
        status = _status(state, verdict, in_flight=engine.in_flight(spec.key), now=now)
        # Everything the verdict changes in memory happens before the status write, which can
        # fail: the next check sees no change, so tasks not re-decided now never would be.
        provider_ref = ObjectRef(model.PROVIDER_KIND, spec.namespace, spec.name, spec.uid)
        if verdict.ready and not was_ready:
            self.deps.events.emit(provider_ref, EventType.NORMAL, "Ready", verdict.message)
        elif not verdict.ready and (
            was_ready or first_check or state.error_code != verdict.error_code
        ):
            self.deps.events.emit(
                provider_ref, EventType.WARNING, str(verdict.reason), verdict.message
            )
        if was_ready != verdict.ready or first_check:
            engine.reconsider_provider_tasks(spec.key)
            engine.pump(spec.key)
        state.error_code = verdict.error_code
        wait = spec.recheck_seconds if verdict.ready else self.deps.settings.provider_retry_seconds
        engine.schedule_at(Kind.PROVIDER, spec.key, now + dt.timedelta(seconds=wait))
        try:
            body = await self.deps.client.patch(
                kube.PROVIDERS,
                spec.namespace,
                spec.name,
                {"status": status},
                subresource="status",
            )
        except kube.ApiError as exc:
            if not exc.not_found:
                raise  # the caller re-checks soon, and that check writes the status
        else:
            engine.store_provider(body)

    async def _keep_readiness(self, state: ProviderState, verdict: policy.ProviderVerdict) -> None:
        """A transient check failure: keep the last known readiness, re-check soon (BUG-1).

        A short burst of nginx 502 pages (or a dropped connection) says nothing about the
        account, and ``in.php`` may well work meanwhile: marking the provider not Ready here
        would park every task until the next check. Only ``lastError`` is written (the
        ``Ready`` condition is left as it is); tasks are not reconsidered. Submitted tasks'
        polls back off on their own (``PollScheduler``), and a provider not checked yet keeps
        its tasks waiting (not parked) until a check gets an answer.
        """
        engine = self.engine
        spec = state.spec
        now = self.deps.clock()
        logger.warning(
            "provider check of %s/%s failed transiently (%d in a row, Unreachable after %d): %s",
            spec.namespace,
            spec.name,
            state.transient_failures,
            self.deps.settings.provider_unreachable_after,
            verdict.message,
        )
        last_error = {
            "code": verdict.error_code or verdict.reason,
            "message": verdict.message[:1024],
            "at": model.format_time(now),
        }
        wait = policy.transient_recheck_delay(
            state.transient_failures, cap=self.deps.settings.provider_retry_seconds
        )
        engine.schedule_at(Kind.PROVIDER, spec.key, now + dt.timedelta(seconds=wait))
        try:  # best effort: the re-check is scheduled either way
            await self.deps.client.patch(
                kube.PROVIDERS,
                spec.namespace,
                spec.name,
                {"status": {"lastError": last_error}},
                subresource="status",
            )
        except kube.KubeError as exc:
            logger.debug("lastError of %s/%s not written: %s", spec.namespace, spec.name, exc)


def _status(
    state: ProviderState, verdict: policy.ProviderVerdict, *, in_flight: int, now: dt.datetime
) -> dict[str, Any]:
    """The provider status a check writes (pure)."""
    spec = state.spec
    status: dict[str, Any] = {
        "checkedAt": model.format_time(now),
        "observedGeneration": spec.generation,
        "inFlight": in_flight,
        "conditions": set_condition(
            spec.conditions,
            type_="Ready",
            status="True" if verdict.ready else "False",
            reason=verdict.reason,
            message=verdict.message,
            generation=spec.generation,
            now=now,
        ),
    }
    if state.threads is not None:
        status["threads"] = state.threads.threads
        status["workingThreads"] = state.threads.working_threads
    if state.balance is not None:
        status["balance"] = f"{state.balance:g}"
    if verdict.error_code is not None or not verdict.ready:
        status["lastError"] = {
            "code": verdict.error_code or verdict.reason,
            "message": verdict.message[:1024],
            "at": model.format_time(now),
        }
    return status


def secret_value(secret: Mapping[str, Any], key: str) -> str | None:
    """Decode one key of a Secret (``data`` is base64; ``stringData`` never comes back)."""
    data: Mapping[str, Any] = secret.get("data") or {}
    raw = data.get(key)
    if not isinstance(raw, str):
        return None
    try:
        value = base64.b64decode(raw, validate=True).decode("utf-8").strip()
    except (binascii.Error, UnicodeDecodeError):
        return None
    return value or None
