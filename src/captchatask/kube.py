"""A small asynchronous Kubernetes REST client for our three resources, Events and Secrets.

Why not the generated clients: the sync ``kubernetes`` client would have to run in a thread pool
on the pingback hot path, and its model (de)serialisation costs more than the request itself;
``kubernetes_asyncio`` is a second large generated client. We need a handful of verbs on a
handful of resources, all JSON, so this module speaks REST over the component's one
``aiohttp.ClientSession``. The ``kubernetes`` package is still used for what it does best:
loading a kubeconfig or the in-cluster service-account configuration, once, at startup
(:func:`load_config`), except for exec credential plugins, which this client runs itself so
their short-lived tokens are refreshed (:mod:`captchatask.credentials`).

Errors are typed so callers can tell "the API server answered no" (:class:`ApiError` with the
HTTP status) from "the API server did not answer" (:class:`KubeUnavailable`), which is the
sidecar's cue to spool instead.

"Come back later" answers are retried here, the way client-go does it, so every component and
the CLI behave alike: a ``429`` (the API server's "storage is (re)initializing" while a new
CRD's watch cache fills, or API Priority and Fairness shedding load) and a ``5xx`` that carries
``Retry-After`` are retried after the time the server asked for (the ``Retry-After`` header, or
``details.retryAfterSeconds`` in the Status body), or after an exponential back-off when a 429
names none, at most :attr:`RetryPolicy.max_retries` times; then :class:`TooManyRequests` says
so. The operator's kopf watches use kopf's own client, configured from the same policy
(:meth:`RetryPolicy.kopf_backoffs`).
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Self
from urllib.parse import quote

import aiohttp

from captchatask import credentials, model

#: Service-account tokens are rotated by the kubelet; re-read the file this often.
TOKEN_REFRESH_SECONDS: Final = 60.0
#: Default per-request budget. Callers on the hot path pass a tighter one.
DEFAULT_TIMEOUT_SECONDS: Final = 10.0

JSON_PATCH: Final = "application/json-patch+json"
#: The API server's message when a JSON patch does not apply (e.g. a failed ``test`` op).
PATCH_NOT_APPLICABLE: Final = "the server rejected our request due to an error in our request"
MERGE_PATCH: Final = "application/merge-patch+json"
#: Query of a server-side dry run: every check runs, nothing is persisted.
DRY_RUN_PARAMS: Final = {"dryRun": "All"}

#: Answers that mean "come back later" when the server says when (client-go's ``checkWait``).
HTTP_TOO_MANY_REQUESTS: Final = 429
HTTP_SERVER_ERROR: Final = 500


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How "come back later" answers are retried: client-go's rule with a back-off floor.

    client-go retries a 429 or 5xx that carries ``Retry-After`` up to 10 times, waiting what the
    server asked. We do the same, cap one wait at ``max_wait`` (a confused server cannot park a
    component for an hour), back off exponentially on a 429 that names no time, and give up
    early when the next wait would pass ``budget`` (the sidecar's hot path spools instead of
    waiting out a second when its budget is half of one).
    """

    max_retries: int = 10
    backoff_base: float = 0.5
    backoff_cap: float = 8.0
    max_wait: float = 30.0
    #: Total seconds the retries of one request may wait; ``None``: only ``max_retries`` bounds.
    budget: float | None = None

    def delay(self, retry: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_wait)
        return min(self.backoff_base * 2.0 ** (retry - 1), self.backoff_cap)

    def kopf_backoffs(self) -> tuple[float, ...]:
        """The same schedule as kopf's ``networking.error_backoffs`` (one entry per retry)."""
        return tuple(self.delay(retry, None) for retry in range(1, self.max_retries + 1))


#: What every client uses unless it asks for less (10 retries, like client-go).
DEFAULT_RETRY: Final = RetryPolicy()


@dataclass(frozen=True, slots=True)
class Resource:
    """One API resource: where it lives in the URL space."""

    group: str
    version: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None, name: str | None = None) -> str:
        """Return the collection or object path, URL-escaped."""
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        if self.namespaced and namespace is not None:
            base += f"/namespaces/{quote(namespace, safe='')}"
        base += f"/{self.plural}"
        if name is not None:
            base += f"/{quote(name, safe='')}"
        return base


TASKS: Final = Resource(model.GROUP, model.VERSION, model.TASK_PLURAL)
PROVIDERS: Final = Resource(model.GROUP, model.VERSION, model.PROVIDER_PLURAL)
DEAD_LETTERS: Final = Resource(model.GROUP, model.VERSION, model.DEAD_LETTER_PLURAL)
EVENTS: Final = Resource("", "v1", "events")
SECRETS: Final = Resource("", "v1", "secrets")
NAMESPACES: Final = Resource("", "v1", "namespaces", namespaced=False)


class KubeError(Exception):
    """Base of the errors of this client."""


class ConfigError(KubeError):
    """The kubeconfig is missing, malformed, or names a context/user that does not exist."""


class KubeUnavailable(KubeError):
    """The API server could not be reached or did not answer in time."""


class TooManyRequests(KubeUnavailable):
    """The API server kept asking us to come back later; the retries are used up.

    A :class:`KubeUnavailable`: callers that spool or postpone on an absent API server do the
    same for a server that is there but not ready.
    """

    def __init__(self, what: str, status: int, detail: str, attempts: int) -> None:
        super().__init__(
            f"{what}: the API server answered HTTP {status} ({detail}) to {attempts} "
            f"attempt(s) and asked to retry later; giving up"
        )
        self.status = status
        self.detail = detail
        self.attempts = attempts


class ApiError(KubeError):
    """The API server answered with an error status."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def not_found(self) -> bool:
        """The object (or its namespace) does not exist."""
        return self.status == 404

    @property
    def conflict(self) -> bool:
        """Optimistic-concurrency failure: a stale resourceVersion or a failed JSON-patch test."""
        if self.status == 409:
            return True
        # A JSON patch that cannot be applied (a failed "test" op above all) comes back as a
        # bare 422 with this generic message and no field causes; schema rejections name fields.
        return self.status == 422 and self.message == PATCH_NOT_APPLICABLE


@dataclass(frozen=True, slots=True)
class KubeConfig:
    """Connection settings, loaded once at startup; see :func:`load_config`."""

    server: str
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    token: str | None = field(default=None, repr=False)
    token_file: str | None = None
    verify: bool = True
    namespace: str = "default"
    #: An exec credential plugin (EKS/GKE style) that supplies the token instead.
    exec_plugin: credentials.ExecPlugin | None = None


def encode_body(body: object) -> str:
    """A request body as sent: compact JSON (no spaces; :mod:`bench.ceiling` sends the same)."""
    return json.dumps(body, separators=(",", ":"))


def load_config(kubeconfig: str | None = None, *, context: str | None = None) -> KubeConfig:
    """Load in-cluster config when running in a pod, else the kubeconfig (``KUBECONFIG``).

    This is a one-off, blocking file read at startup, done with the official ``kubernetes``
    package so every kubeconfig shape it understands (certificate data, files, tokens, several
    files in ``KUBECONFIG``) works. An ``exec`` user is not run here: it is kept as an
    :class:`~captchatask.credentials.ExecPlugin` that :class:`KubeClient` runs when it needs a
    token. ``namespace`` is the chosen context's (``--context``), as kubectl does.
    """
    from kubernetes import client as k8s_client  # noqa: PLC0415 - heavy import, startup only

    configuration = k8s_client.Configuration()
    namespace = "default"
    token_file: str | None = None
    exec_plugin: credentials.ExecPlugin | None = None
    sa_dir = Path("/var/run/secrets/kubernetes.io/serviceaccount")
    if kubeconfig is None and context is None and (sa_dir / "token").exists():
        from kubernetes import config as k8s_config  # noqa: PLC0415

        # The kubernetes package ships no type information; these calls are its only use.
        k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        token_file = str(sa_dir / "token")
        namespace = (sa_dir / "namespace").read_text(encoding="utf-8").strip() or namespace
    else:
        namespace, exec_plugin = _load_kubeconfig(kubeconfig, context, configuration)
    auth = configuration.api_key.get("authorization") or configuration.api_key.get("BearerToken")
    token = None
    if auth:
        token = auth.split(" ", 1)[1] if auth.lower().startswith("bearer ") else auth
    return KubeConfig(
        server=str(configuration.host).rstrip("/"),
        ca_file=configuration.ssl_ca_cert,
        cert_file=configuration.cert_file,
        key_file=configuration.key_file,
        token=token,
        token_file=token_file,
        verify=bool(configuration.verify_ssl),
        namespace=namespace,
        exec_plugin=exec_plugin,
    )


def _named(entries: object, name: object) -> Any:
    """The ConfigNode of ``name`` in a merged kubeconfig list (contexts, users, clusters)."""
    for entry in entries if isinstance(entries, list) else ():
        if entry.value.get("name") == name:
            return entry
    return None


def _load_kubeconfig(
    kubeconfig: str | None, context: str | None, configuration: Any
) -> tuple[str, credentials.ExecPlugin | None]:
    """Fill ``configuration`` from a kubeconfig; return the context's namespace and exec plugin."""
    # The kubernetes package ships no type information; hence the ignores below.
    from kubernetes.config import kube_config  # noqa: PLC0415 - heavy import, startup only
    from kubernetes.config.config_exception import ConfigException  # noqa: PLC0415

    paths = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
    merger = kube_config.KubeConfigMerger(paths)  # type: ignore[no-untyped-call]
    merged = merger.config
    if merged is None:
        raise ConfigError(f"no kubeconfig found (looked at {paths})")
    context_name = context or merged.value.get("current-context")
    context_node = _named(merged.value.get("contexts"), context_name)
    if context_node is None:
        raise ConfigError(f"context {context_name!r} does not exist in the kubeconfig")
    ctx: dict[str, Any] = context_node.value.get("context") or {}
    namespace = str(ctx.get("namespace") or "default")
    exec_plugin = None
    users = merged.value.get("users")
    user_node = _named(users, ctx.get("user"))
    user = (user_node.value.get("user") or {}) if user_node is not None else {}
    if "exec" in user:
        cluster_node = _named(merged.value.get("clusters"), ctx.get("cluster"))
        base_dir = Path(user_node.path).resolve().parent if user_node.path else None
        try:
            exec_plugin = credentials.ExecPlugin.from_kubeconfig(
                user["exec"],
                base_dir=base_dir,
                cluster=cluster_node.value.get("cluster") if cluster_node is not None else None,
            )
        except (OSError, credentials.ExecCredentialError) as exc:
            raise ConfigError(str(exc)) from exc
        # Hand the loader the same user without its exec stanza, so the plugin is not run
        # (and its failure not swallowed) here; KubeClient runs it when it needs a token.
        stripped = {**user_node.value, "user": {k: v for k, v in user.items() if k != "exec"}}
        users[users.index(user_node)] = kube_config.ConfigNode(  # type: ignore[no-untyped-call]
            user_node.name, stripped, user_node.path
        )
    try:
        loader = kube_config.KubeConfigLoader(  # type: ignore[no-untyped-call]
            config_dict=merged, active_context=context_name, config_base_path=None
        )
        loader.load_and_set(configuration)  # type: ignore[no-untyped-call]
    except ConfigException as exc:
        raise ConfigError(str(exc)) from exc
    return namespace, exec_plugin


def ssl_context(config: KubeConfig) -> ssl.SSLContext | bool:
    """Build the TLS context for the API server (CA trust plus client certificate)."""
    if not config.server.startswith("https"):
        return False
    ctx = ssl.create_default_context(cafile=config.ca_file)
    if not config.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if config.cert_file and config.key_file:
        ctx.load_cert_chain(config.cert_file, config.key_file)
    return ctx


def connector(config: KubeConfig, *, limit: int = 100) -> aiohttp.TCPConnector:
    """A connector for the component's API-server session (keep-alive, bounded pool)."""
    return aiohttp.TCPConnector(ssl=ssl_context(config), limit=limit)


class KubeClient:
    """REST verbs on our resources over one shared session (owned by the caller).

    Parameters
    ----------
    config
        Where and how to connect.
    session
        The caller's session, created with :func:`connector` and closed by the caller.
    retry
        How "come back later" answers are retried (:data:`DEFAULT_RETRY`).
    """

    def __init__(
        self,
        config: KubeConfig,
        session: aiohttp.ClientSession,
        *,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        self.config = config
        self._session = session
        self.retry = retry
        self._token = config.token
        self._token_read_at = 0.0
        self.exec_credentials = (
            credentials.ExecCredentials(config.exec_plugin) if config.exec_plugin else None
        )

    def with_retry(self, **changes: Any) -> Self:
        """A client on the same session whose retry policy has ``changes`` (e.g. ``budget``)."""
        clone = type(self)(self.config, self._session, retry=replace(self.retry, **changes))
        clone._token, clone._token_read_at = self._token, self._token_read_at
        # One plugin cache for both: a token renewed by one is the other's too.
        clone.exec_credentials = self.exec_credentials
        return clone

    async def _bearer(self) -> str | None:
        if self.exec_credentials is not None:
            try:
                return await self.exec_credentials.token()
            except credentials.ExecCredentialError as exc:
                raise ConfigError(str(exc)) from exc
        return self._service_account_token()

    def _service_account_token(self) -> str | None:
        # A tiny file in tmpfs, re-read once a minute: not worth a thread hop.
        if self.config.token_file:
            now = time.monotonic()
            if now - self._token_read_at > TOKEN_REFRESH_SECONDS:
                self._token = Path(self.config.token_file).read_text(encoding="utf-8").strip()
                self._token_read_at = now
        return self._token

    async def _rejected(self, headers: Mapping[str, str]) -> bool:
        """A 401 arrived: renew an exec token; tell whether retrying can help."""
        if self.exec_credentials is None:
            return False
        sent = headers.get("Authorization", "").removeprefix("Bearer ") or None
        try:
            await self.exec_credentials.refresh(sent)
        except credentials.ExecCredentialError as exc:
            raise ConfigError(str(exc)) from exc
        return True

    async def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        token = await self._bearer()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: object = None,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> dict[str, Any]:
        """Send one request and decode the JSON answer; raise typed errors.

        "Come back later" answers are retried by :attr:`retry` (see the module docstring).
        """
        data = None if body is None else encode_body(body)
        waited = 0.0
        retry = 0
        while True:
            status, decoded, retry_after = await self._send(
                method, path, data=data, params=params, content_type=content_type, timeout=timeout
            )
            if not _come_back_later(status, retry_after):
                return _decode(method, path, status, decoded)
            retry += 1
            delay = self.retry.delay(retry, retry_after)
            budget = self.retry.budget
            if retry > self.retry.max_retries or (budget is not None and waited + delay > budget):
                raise TooManyRequests(f"{method} {path}", status, _detail(decoded), retry)
            await asyncio.sleep(delay)
            waited += delay

    async def _send(
        self,
        method: str,
        path: str,
        *,
        data: str | None,
        params: Mapping[str, str] | None,
        content_type: str,
        timeout: float,
    ) -> tuple[int, Any, float | None]:
        """One exchange: (status, decoded body, the Retry-After the server asked for).

        A 401 with an exec credential plugin renews the token and retries once (client-go does
        the same): the token may have been revoked or rotated before its stated expiry.
        """
        for attempt in (1, 2):
            headers = await self._headers(content_type if data is not None else None)
            try:
                async with self._session.request(
                    method,
                    self.config.server + path,
                    data=data,
                    params=params,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=timeout),
                ) as response:
                    raw = await response.read()
                    status = response.status
                    header = response.headers.get("Retry-After")
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                raise KubeUnavailable(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
            if not (status == 401 and attempt == 1 and await self._rejected(headers)):
                break
        decoded: Any
        try:
            decoded = json.loads(raw) if raw else {}
        except ValueError:
            decoded = {"message": raw[:200].decode("utf-8", "replace")}
        return status, decoded, _retry_after(header, decoded) if status >= 400 else None

    async def get(
        self, resource: Resource, namespace: str | None, name: str, **kw: Any
    ) -> dict[str, Any]:
        """GET one object."""
        return await self.request("GET", resource.path(namespace, name), **kw)

    async def list(
        self,
        resource: Resource,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> dict[str, Any]:
        """LIST a collection, in one namespace or (``namespace=None``) all of them."""
        params: dict[str, str] = {}
        if label_selector:
            params["labelSelector"] = label_selector
        if field_selector:
            params["fieldSelector"] = field_selector
        return await self.request(
            "GET", resource.path(namespace), params=params or None, timeout=timeout
        )

    async def create(
        self, resource: Resource, namespace: str | None, body: Mapping[str, Any], **kw: Any
    ) -> dict[str, Any]:
        """POST a new object."""
        return await self.request("POST", resource.path(namespace), body=body, **kw)

    async def patch(
        self,
        resource: Resource,
        namespace: str | None,
        name: str,
        body: object,
        *,
        patch_type: str = MERGE_PATCH,
        subresource: str | None = None,
        dry_run: bool = False,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> dict[str, Any]:
        """PATCH an object or its subresource (``status``); ``dry_run`` only validates it."""
        path = resource.path(namespace, name)
        if subresource:
            path += f"/{subresource}"
        return await self.request(
            "PATCH",
            path,
            body=body,
            content_type=patch_type,
            params=DRY_RUN_PARAMS if dry_run else None,
            timeout=timeout,
        )

    async def delete(
        self,
        resource: Resource,
        namespace: str | None,
        name: str,
        *,
        uid: str | None = None,
        resource_version: str | None = None,
        dry_run: bool = False,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> dict[str, Any]:
        """DELETE an object, optionally only if it is still the same instance/version.

        ``dry_run`` asks the API server to run every check (RBAC, preconditions, admission)
        and persist nothing, like ``kubectl delete --dry-run=server``.
        """
        preconditions: dict[str, str] = {}
        if uid:
            preconditions["uid"] = uid
        if resource_version:
            preconditions["resourceVersion"] = resource_version
        body: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if preconditions:
            body["preconditions"] = preconditions
        if dry_run:
            # With a DeleteOptions body the API server ignores the query's dryRun: say it here.
            body["dryRun"] = ["All"]
        return await self.request(
            "DELETE", resource.path(namespace, name), body=body, timeout=timeout
        )

    async def watch(
        self,
        resource: Resource,
        namespace: str | None = None,
        *,
        resource_version: str | None = None,
        field_selector: str | None = None,
        timeout_seconds: int = 60,
    ) -> AsyncIterator[dict[str, Any]]:
        """Stream watch events (``{"type": ..., "object": ...}``) until the server closes.

        The caller re-lists/re-watches; bookmarks are requested so a restart is cheap.
        """
        params = {
            "watch": "1",
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
        }
        if resource_version:
            params["resourceVersion"] = resource_version
        if field_selector:
            params["fieldSelector"] = field_selector
        try:
            async with self._session.get(
                self.config.server + resource.path(namespace),
                params=params,
                headers=(headers := await self._headers()),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=DEFAULT_TIMEOUT_SECONDS),
            ) as response:
                if response.status == 401:
                    # Renew an exec token for the caller's next watch; this one is lost.
                    await self._rejected(headers)
                if response.status >= 400:
                    raw = await response.read()
                    raise ApiError(
                        response.status, "WatchFailed", raw[:200].decode("utf-8", "replace")
                    )
                async for line in response.content:
                    if line.strip():
                        yield json.loads(line)
        except (aiohttp.ClientError, OSError) as exc:
            raise KubeUnavailable(f"watch {resource.plural}: {type(exc).__name__}") from exc


def _retry_after(header: str | None, decoded: object) -> float | None:
    """Seconds the server asked us to wait: the header, else the Status body's details."""
    if header:
        try:
            return max(float(header), 0.0)
        except ValueError:
            pass  # an HTTP date: no API server sends one; fall back to the body or back-off
    details = decoded.get("details") if isinstance(decoded, dict) else None
    seconds = details.get("retryAfterSeconds") if isinstance(details, dict) else None
    if isinstance(seconds, int | float) and not isinstance(seconds, bool):
        return max(float(seconds), 0.0)
    return None


def _come_back_later(status: int, retry_after: float | None) -> bool:
    """client-go's rule: any 429, and a 5xx that says when to come back."""
    if status == HTTP_TOO_MANY_REQUESTS:
        return True
    return status >= HTTP_SERVER_ERROR and retry_after is not None


def _detail(decoded: object) -> str:
    if not isinstance(decoded, dict):
        return "no details"
    reason = str(decoded.get("reason", "")).strip()
    message = str(decoded.get("message", "")).strip()
    return ": ".join(part for part in (reason, message) if part) or "no details"


def _decode(method: str, path: str, status: int, decoded: Any) -> dict[str, Any]:
    """Turn a final answer into the decoded object or a typed error."""
    if status >= 400:
        if status in (429, 500, 502, 503, 504) and not isinstance(decoded, dict):
            raise KubeUnavailable(f"{method} {path}: HTTP {status}")
        message = str(decoded.get("message", "")) if isinstance(decoded, dict) else ""
        reason = str(decoded.get("reason", "")) if isinstance(decoded, dict) else ""
        if status in (429, 503, 504):
            raise KubeUnavailable(f"{method} {path}: HTTP {status} {reason}: {message}")
        raise ApiError(status, reason, message)
    if not isinstance(decoded, dict):
        raise ApiError(status, "BadResponse", "the API server answered with a non-object")
    return decoded
