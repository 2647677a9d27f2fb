"""The local task API (``127.0.0.1:8081``): the app container's whole interface to the ledger.

The application needs no Kubernetes client, credentials or RBAC of its own:

``POST /v1/tasks``
    Create a ``CaptchaTask`` in the pod's namespace from a small JSON body (the task's spec
    fields, plus optional ``name``/``generateName``/``labels``); ``201`` with the task. The API
    server validates it strictly (unknown fields included): a rejection is a ``400`` carrying
    the API server's own message.
``GET /v1/tasks/{name}[?wait=<seconds>]``
    The task; with ``wait`` a long-poll that returns as soon as the task is ``Solved`` or
    ``Failed`` (backed by one shared watch, :mod:`.watch`), or the task as it is when the wait
    ends.
``POST /v1/tasks:reserve``
    Adoption, step 1 (the seed's pattern): create an ``external: true`` task and return its
    name and signed pingback URL; the app then submits to the provider itself with that URL.
``POST /v1/tasks:track``
    Adoption, step 2: ``{"name", "providerTaskId"}`` sets ``spec.providerTaskId`` so the
    operator's fallback polling covers the task. Without ``name`` it creates an adopted task
    directly from ``{"providerTaskId", "type", ...}`` (for apps that do not use pingbacks).
    A pingback that arrives before ``track`` is recorded on the task anyway (the ledger
    accepts a result for a task with no provider id yet), and ``track`` then agrees with it.

Every error is a problem document; API-server failures map to ``503`` (unreachable) or ``502``.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web
from aiohttp.typedefs import Handler

from captchatask import kube, model, signing
from captchatask.ledger import Ledger
from captchatask.model import TaskView
from captchatask_sidecar.errors import ProblemError, problem_middleware
from captchatask_sidecar.metrics import Metrics
from captchatask_sidecar.payload import PROVIDER_TASK_ID_RE
from captchatask_sidecar.watch import TaskHub

#: Name prefix of tasks created without an explicit name.
GENERATE_NAME: Final = "task-"
#: Keys of a create body that are metadata, not spec.
METADATA_KEYS: Final = frozenset({"name", "generateName", "labels"})
#: Records which receiver created a task (an annotation: pod names need not be label-safe).
CREATED_BY_ANNOTATION: Final = f"{model.GROUP}/created-by"
#: How long a provider's public pingback URL is cached.
PUBLIC_URL_CACHE_SECONDS: Final = 60.0
#: Optimistic-concurrency retries of ``track`` (status writes bump the resourceVersion too).
TRACK_ATTEMPTS: Final = 3
_NAME_RE: Final = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_LABEL_VALUE_RE: Final = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


def task_json(task: TaskView) -> dict[str, Any]:
    """The task as the app sees it: what it asked for and what came of it."""
    status = task.status
    solution = status.get("solution") if task.phase is model.Phase.SOLVED else None
    failure = status.get("failure") if task.phase is model.Phase.FAILED else None
    return {
        "name": task.ref.name,
        "namespace": task.ref.namespace,
        "uid": task.ref.uid,
        "type": task.task_type,
        "external": task.external,
        "providerTaskId": task.known_provider_task_id,
        "phase": str(task.phase) if task.phase else None,
        "done": bool(task.phase and task.phase.terminal),
        "deliveredBy": str(task.delivered_by) if task.delivered_by else None,
        "solution": dict(solution) if isinstance(solution, Mapping) else None,
        "failure": dict(failure) if isinstance(failure, Mapping) else None,
        "createdAt": model.format_time(task.created_at) if task.created_at else None,
        "finishedAt": model.format_time(task.finished_at) if task.finished_at else None,
    }


def api_problem(exc: kube.KubeError) -> ProblemError:
    """Map an API-server failure to the app-facing problem."""
    if not isinstance(exc, kube.ApiError):
        return ProblemError(503, "the Kubernetes API server is unavailable; retry")
    if exc.status in (400, 422):
        return ProblemError(400, exc.message[:1024], title="Invalid task")
    if exc.status in (404, 409):
        return ProblemError(exc.status, exc.message[:1024])
    return ProblemError(502, f"the API server refused the request ({exc.status} {exc.reason})")


def _name(value: object) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ProblemError(400, "name must be a Kubernetes object name")
    return value


def _provider_task_id(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        value = str(value)
    if not isinstance(value, str) or not PROVIDER_TASK_ID_RE.fullmatch(value):
        raise ProblemError(400, "providerTaskId must match ^[0-9A-Za-z_-]{1,64}$")
    return value


async def _json_object(request: web.Request) -> dict[str, Any]:
    """Read a bounded JSON object: refused by its declared size, cut off by time, parsed strictly.

    The local API listens on loopback only, but "only our own pod" is no reason to let one
    stuck or runaway client hold a connection and its buffers forever.
    """
    api = request.app[LOCAL_API]
    length = request.content_length
    if length is not None and length > api.max_body_bytes:
        raise ProblemError(413, "body too large")
    try:
        async with asyncio.timeout(api.read_timeout):
            raw = await request.read()
    except TimeoutError as exc:
        raise ProblemError(408, "request timeout") from exc
    except web.HTTPRequestEntityTooLarge as exc:
        raise ProblemError(413, "body too large") from exc
    except (web.RequestPayloadError, ValueError) as exc:  # e.g. a broken Content-Encoding
        raise ProblemError(400, "the body could not be read") from exc
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProblemError(400, "the body must be a JSON object") from exc
    if not isinstance(body, dict):
        raise ProblemError(400, "the body must be a JSON object")
    return body


@dataclass
class LocalApi:
    """The local API's dependencies and the operations behind its routes.

    Parameters
    ----------
    client
        The API client.
    ledger
        Reads tasks.
    hub
        The shared watch for long-polls.
    signer
        Signs pingback URLs for ``tasks:reserve``.
    metrics
        The sidecar's metrics.
    namespace
        The pod's namespace: every task lives there.
    provider
        The default CaptchaProvider (for its public pingback URL).
    public_url
        A configured public pingback base URL (wins over the provider's).
    created_by
        This receiver's name, annotated on created tasks.
    max_wait
        Upper bound of ``?wait=``.
    max_body_bytes
        Largest accepted request body.
    read_timeout
        Time allowed to send a request body.
    """

    client: kube.KubeClient
    ledger: Ledger
    hub: TaskHub
    signer: signing.PingbackSigner
    metrics: Metrics
    namespace: str
    provider: str
    public_url: str | None
    created_by: str
    max_wait: float
    max_body_bytes: int
    read_timeout: float
    _url_cache: dict[str, tuple[str, float]] = field(default_factory=dict)

    # -- operations ---------------------------------------------------------------------------

    async def create(
        self, body: dict[str, Any], *, extra_spec: Mapping[str, Any] | None = None
    ) -> TaskView:
        """Create a task from an app body (spec fields + optional metadata keys)."""
        spec = {k: v for k, v in body.items() if k not in METADATA_KEYS}
        spec.update(extra_spec or {})
        metadata: dict[str, Any] = {
            "namespace": self.namespace,
            "annotations": {CREATED_BY_ANNOTATION: self.created_by[:253]},
        }
        if "name" in body:
            metadata["name"] = _name(body["name"])
        else:
            prefix = body.get("generateName", GENERATE_NAME)
            if not isinstance(prefix, str) or not _NAME_RE.fullmatch(prefix.rstrip("-") or "x"):
                raise ProblemError(400, "generateName must be a name prefix")
            metadata["generateName"] = prefix[:200]
        labels = body.get("labels")
        if labels is not None:
            if not isinstance(labels, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
            ):
                raise ProblemError(400, "labels must map strings to strings")
            metadata["labels"] = dict(labels)
        ptid = spec.get("providerTaskId")
        if isinstance(ptid, str) and _LABEL_VALUE_RE.fullmatch(ptid):
            metadata.setdefault("labels", {})[model.PROVIDER_TASK_ID_LABEL] = ptid
        manifest = {
            "apiVersion": model.API_VERSION,
            "kind": model.TASK_KIND,
            "metadata": metadata,
            "spec": spec,
        }
        try:
            created = await self.client.request(
                "POST",
                kube.TASKS.path(self.namespace),
                body=manifest,
                params={"fieldValidation": "Strict"},
            )
        except kube.KubeError as exc:
            raise api_problem(exc) from exc
        return TaskView.from_body(created)

    async def get(self, name: str) -> TaskView:
        """Read one task (404 problem if absent)."""
        try:
            task = await self.ledger.get_task(self.namespace, name)
        except kube.KubeError as exc:
            raise api_problem(exc) from exc
        if task is None:
            raise ProblemError(404, f"task {name!r} not found")
        return task

    async def wait(self, name: str, seconds: float) -> TaskView:
        """Return the task once it is finished, or as it is after ``seconds``."""
        waiter = self.hub.subscribe(name)
        try:
            task = await self.get(name)
            if task.phase is not None and task.phase.terminal:
                return task
            waiter.uid = task.ref.uid
            try:
                async with asyncio.timeout(seconds):
                    while True:
                        view, deleted = await waiter.future
                        if view.ref.uid and view.ref.uid != task.ref.uid:
                            waiter.future = asyncio.get_running_loop().create_future()
                            continue
                        if deleted:
                            raise ProblemError(404, f"task {name!r} was deleted")
                        return view
            except TimeoutError:
                return await self.get(name)
        finally:
            self.hub.unsubscribe(waiter)

    async def pingback_base(self, provider: str) -> str:
        """The public base URL pingbacks are sent to (setting, else the provider's spec)."""
        if self.public_url:
            return self.public_url
        cached = self._url_cache.get(provider)
        if cached is not None and time.monotonic() - cached[1] < PUBLIC_URL_CACHE_SECONDS:
            return cached[0]
        try:
            body = await self.client.get(kube.PROVIDERS, self.namespace, provider)
        except kube.ApiError as exc:
            if exc.not_found:
                raise ProblemError(
                    422, f"CaptchaProvider {provider!r} not found in {self.namespace}"
                ) from exc
            raise api_problem(exc) from exc
        except kube.KubeError as exc:
            raise api_problem(exc) from exc
        url = ((body.get("spec") or {}).get("pingback") or {}).get("publicURL")
        if not isinstance(url, str) or not url:
            raise ProblemError(
                422,
                f"CaptchaProvider {provider!r} has no spec.pingback.publicURL "
                "(or set CAPTCHATASK_PUBLIC_URL on the sidecar)",
            )
        self._url_cache[provider] = (url, time.monotonic())
        return url

    async def track(self, name: str, provider_task_id: str) -> TaskView:
        """Set ``spec.providerTaskId`` on an external task; idempotent for the same id."""
        for _attempt in range(TRACK_ATTEMPTS):
            task = await self.get(name)
            known = task.known_provider_task_id
            if known and known != provider_task_id:
                raise ProblemError(409, f"task {name!r} already belongs to provider task {known!r}")
            if not task.external:
                raise ProblemError(409, f"task {name!r} is not external: the operator submits it")
            if task.spec_provider_task_id == provider_task_id:
                return task
            metadata: dict[str, Any] = {"resourceVersion": task.resource_version}
            if _LABEL_VALUE_RE.fullmatch(provider_task_id):
                metadata["labels"] = {model.PROVIDER_TASK_ID_LABEL: provider_task_id}
            try:
                body = await self.client.patch(
                    kube.TASKS,
                    self.namespace,
                    name,
                    {"metadata": metadata, "spec": {"providerTaskId": provider_task_id}},
                )
            except kube.ApiError as exc:
                if exc.status == 409:
                    continue
                raise api_problem(exc) from exc
            except kube.KubeError as exc:
                raise api_problem(exc) from exc
            return TaskView.from_body(body)
        raise ProblemError(409, f"task {name!r} keeps changing; retry")

    async def adopt(self, body: dict[str, Any], provider_task_id: str) -> tuple[TaskView, bool]:
        """Create an adopted task for a provider id (or find the one created before)."""
        selector = None
        if _LABEL_VALUE_RE.fullmatch(provider_task_id):
            selector = f"{model.PROVIDER_TASK_ID_LABEL}={provider_task_id}"
        if selector is not None:
            try:
                listing = await self.client.list(
                    kube.TASKS, self.namespace, label_selector=selector
                )
            except kube.KubeError as exc:
                raise api_problem(exc) from exc
            for item in listing.get("items") or []:
                existing = TaskView.from_body(item)
                if existing.spec_provider_task_id == provider_task_id:
                    return existing, False
        spec = {k: v for k, v in body.items() if k != "providerTaskId"}
        created = await self.create(
            spec, extra_spec={"external": True, "providerTaskId": provider_task_id}
        )
        return created, True


#: The application's :class:`LocalApi`.
LOCAL_API: Final = web.AppKey("local_api", LocalApi)


# -- handlers ---------------------------------------------------------------------------------


def _json(data: Mapping[str, Any], *, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(data, separators=(",", ":")).encode(),
        content_type="application/json",
    )


async def create_task(request: web.Request) -> web.Response:
    """``POST /v1/tasks``: create a task; not idempotent unless the body names it."""
    api = request.app[LOCAL_API]
    task = await api.create(await _json_object(request))
    return _json(task_json(task), status=201)


async def get_task(request: web.Request) -> web.Response:
    """``GET /v1/tasks/{name}[?wait=s]``: read, or long-poll until the task finishes."""
    api = request.app[LOCAL_API]
    name = request.match_info["name"]
    if not _NAME_RE.fullmatch(name):
        raise ProblemError(404, "no such task")
    raw_wait = request.query.get("wait")
    if raw_wait is None:
        return _json(task_json(await api.get(name)))
    try:
        seconds = float(raw_wait)
    except ValueError as exc:
        raise ProblemError(400, "wait must be a number of seconds") from exc
    if not 0 <= seconds < float("inf"):
        raise ProblemError(400, "wait must be a number of seconds")
    return _json(task_json(await api.wait(name, min(seconds, api.max_wait))))


async def reserve_task(request: web.Request) -> web.Response:
    """``POST /v1/tasks:reserve``: create an external task and return its signed pingback URL."""
    api = request.app[LOCAL_API]
    body = await _json_object(request)
    provider_ref = body.get("providerRef")
    provider = api.provider
    if isinstance(provider_ref, dict) and isinstance(provider_ref.get("name"), str):
        provider = provider_ref["name"]
    base = await api.pingback_base(provider)
    task = await api.create(body, extra_spec={"external": True})
    data = task_json(task)
    data["pingbackURL"] = api.signer.url(base, task.ref)
    return _json(data, status=201)


async def track_task(request: web.Request) -> web.Response:
    """``POST /v1/tasks:track``: register the provider task id of an adopted task."""
    api = request.app[LOCAL_API]
    body = await _json_object(request)
    provider_task_id = _provider_task_id(body.get("providerTaskId"))
    if "name" in body:
        unexpected = set(body) - {"name", "providerTaskId"}
        if unexpected:
            raise ProblemError(400, f"unexpected fields with name: {sorted(unexpected)}")
        task = await api.track(_name(body["name"]), provider_task_id)
        return _json(task_json(task))
    task, created = await api.adopt(body, provider_task_id)
    return _json(task_json(task), status=201 if created else 200)


@web.middleware
async def count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count requests by route template and status class (bounded label values)."""
    api = request.app[LOCAL_API]
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    response = await handler(request)
    api.metrics.local_requests.labels(route, f"{response.status // 100}xx").inc()
    return response


def create_local_app(api: LocalApi, *, max_body_bytes: int) -> web.Application:
    """Build the local API application; the shared task watch runs with it."""
    app = web.Application(
        middlewares=[count_requests, problem_middleware], client_max_size=max_body_bytes
    )
    app[LOCAL_API] = api
    app.router.add_routes(
        [
            web.post("/v1/tasks", create_task),
            web.post("/v1/tasks:reserve", reserve_task),
            web.post("/v1/tasks:track", track_task),
            web.get("/v1/tasks/{name}", get_task, allow_head=False),
        ]
    )

    async def run_watch(_app: web.Application) -> Any:
        task = asyncio.create_task(api.hub.run(), name="task-watch")
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    app.cleanup_ctx.append(run_watch)
    return app
