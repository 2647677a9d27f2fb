"""Exec credential plugins: the kubeconfig ``users[].user.exec`` stanza, as kubectl runs it.

EKS (``aws eks get-token``), GKE (``gke-gcloud-auth-plugin``), AKS (``kubelogin``) and most SSO
set-ups give kubectl no token at all: the kubeconfig names a program that prints an
``ExecCredential`` holding a short-lived bearer token and its ``expirationTimestamp``. The
``kubernetes`` package can run such a plugin once while loading the kubeconfig, but it logs and
carries on without credentials when the plugin fails, and nothing refreshes the token when it
expires, so a long ``dlq redrive`` (or an operator run from a laptop) would start failing with
401 after fifteen minutes. This module follows client-go's rules instead:

* the plugin runs when there is no cached token, or the cached one is past its expiry;
* a 401 from the API server invalidates the token that was sent, and the plugin runs again once
  (:meth:`ExecCredentials.refresh`), so a revoked or rotated token is replaced;
* ``KUBERNETES_EXEC_INFO`` tells the plugin the API version, that it is not interactive, and
  (``provideClusterInfo: true``) which cluster it is for;
* a relative command with a path separator is resolved against the kubeconfig's directory; a
  missing command reports the kubeconfig's ``installHint``.

Plugins that return a client certificate instead of a token are refused with a clear error:
the TLS context is built once per session, and no widely used plugin needs that form.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from captchatask import model

#: The ExecCredential API versions kubectl speaks; v1alpha1 is gone from client-go.
API_VERSIONS: Final = ("client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1")
#: How long a plugin may take (an SSO plugin may talk to a remote identity provider).
EXEC_TIMEOUT_SECONDS: Final = 60.0
#: Refresh this long before the stated expiry, so a request in flight does not carry a token
#: that expires on the way.
EXPIRY_MARGIN: Final = dt.timedelta(seconds=10)
#: Name of the cluster extension whose value is passed to the plugin as ``spec.cluster.config``.
CLUSTER_EXTENSION: Final = "client.authentication.k8s.io/exec"

Clock = Callable[[], dt.datetime]


class ExecCredentialError(Exception):
    """The plugin could not be run, failed, or printed something that is not a token."""


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class ExecPlugin:
    """One ``exec`` stanza, resolved against its kubeconfig (see :func:`from_kubeconfig`)."""

    command: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    api_version: str = API_VERSIONS[0]
    install_hint: str | None = None
    interactive_mode: str = "IfAvailable"
    #: ``spec.cluster`` of the ExecCredential, when the stanza asks for ``provideClusterInfo``.
    cluster: Mapping[str, Any] | None = field(default=None, hash=False, compare=False)

    @classmethod
    def from_kubeconfig(
        cls,
        stanza: Mapping[str, Any],
        *,
        base_dir: Path | None,
        cluster: Mapping[str, Any] | None,
    ) -> ExecPlugin:
        """Build from a kubeconfig ``exec`` mapping; ``cluster`` is the kubeconfig's cluster."""
        command = stanza.get("command")
        if not isinstance(command, str) or not command:
            raise ExecCredentialError("exec: the kubeconfig names no command")
        api_version = str(stanza.get("apiVersion", ""))
        if api_version not in API_VERSIONS:
            raise ExecCredentialError(
                f"exec: unsupported apiVersion {api_version!r}; "
                f"use one of {', '.join(API_VERSIONS)}"
            )
        # client-go: a relative path with a separator is relative to the kubeconfig's directory;
        # a bare name is looked up on PATH.
        if os.sep in command and not os.path.isabs(command) and base_dir is not None:
            command = str(base_dir / command)
        env = tuple(
            (str(item["name"]), str(item["value"]))
            for item in stanza.get("env") or ()
            if isinstance(item, Mapping) and "name" in item
        )
        return cls(
            command=command,
            args=tuple(str(arg) for arg in stanza.get("args") or ()),
            env=env,
            api_version=api_version,
            install_hint=stanza.get("installHint") or None,
            interactive_mode=str(stanza.get("interactiveMode") or "IfAvailable"),
            cluster=_cluster_info(cluster, base_dir) if stanza.get("provideClusterInfo") else None,
        )

    def exec_info(self) -> str:
        """The ``KUBERNETES_EXEC_INFO`` the plugin reads (never interactive: stdin is closed)."""
        spec: dict[str, Any] = {"interactive": False}
        if self.cluster is not None:
            spec["cluster"] = dict(self.cluster)
        return json.dumps({"apiVersion": self.api_version, "kind": "ExecCredential", "spec": spec})


def _cluster_info(cluster: Mapping[str, Any] | None, base_dir: Path | None) -> dict[str, Any]:
    """Translate a kubeconfig cluster into ExecCredential's ``spec.cluster`` (client-go's names)."""
    cluster = cluster or {}
    info: dict[str, Any] = {"server": cluster.get("server", "")}
    for key in ("tls-server-name", "insecure-skip-tls-verify", "proxy-url", "disable-compression"):
        if key in cluster:
            info[key] = cluster[key]
    if cluster.get("certificate-authority-data"):
        info["certificate-authority-data"] = cluster["certificate-authority-data"]
    elif cluster.get("certificate-authority"):
        ca = Path(str(cluster["certificate-authority"]))
        if not ca.is_absolute() and base_dir is not None:
            ca = base_dir / ca
        info["certificate-authority-data"] = base64.b64encode(ca.read_bytes()).decode()
    for extension in cluster.get("extensions") or ():
        if isinstance(extension, Mapping) and extension.get("name") == CLUSTER_EXTENSION:
            info["config"] = extension.get("extension")
    return info


class ExecCredentials:
    """The token of one plugin, cached until it expires or the API server rejects it.

    Parameters
    ----------
    plugin
        What to run.
    clock
        Injectable "now" (tests move it past the expiry instead of waiting).
    """

    def __init__(self, plugin: ExecPlugin, *, clock: Clock = _utc_now) -> None:
        self.plugin = plugin
        self._clock = clock
        self._token: str | None = None
        self._expiry: dt.datetime | None = None
        self._lock = asyncio.Lock()
        #: How many times the plugin ran (for the CLI's ``-v`` and for tests).
        self.runs = 0

    def _fresh(self) -> bool:
        if self._token is None:
            return False
        return self._expiry is None or self._clock() < self._expiry - EXPIRY_MARGIN

    async def token(self) -> str:
        """Return a valid token, running the plugin only when needed (one run at a time)."""
        async with self._lock:
            if not self._fresh():
                await self._run()
            assert self._token is not None
            return self._token

    async def refresh(self, rejected: str | None) -> str:
        """The API server refused ``rejected``: get a new token unless another request did."""
        async with self._lock:
            if self._token is None or self._token == rejected or not self._fresh():
                await self._run()
            assert self._token is not None
            return self._token

    async def _run(self) -> None:
        plugin = self.plugin
        if plugin.interactive_mode == "Always":
            raise ExecCredentialError(
                f"exec: {plugin.command} needs an interactive terminal (interactiveMode: Always); "
                "run it once with kubectl, or use a non-interactive mode"
            )
        env = {**os.environ, **dict(plugin.env), "KUBERNETES_EXEC_INFO": plugin.exec_info()}
        try:
            process = await asyncio.create_subprocess_exec(
                plugin.command,
                *plugin.args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
            )
        except (FileNotFoundError, PermissionError) as exc:
            hint = f"\n{plugin.install_hint}" if plugin.install_hint else ""
            raise ExecCredentialError(
                f"exec: executable {plugin.command} could not be run: {exc.strerror}{hint}"
            ) from exc
        try:
            stdout, stderr = await asyncio.wait_for(
                process.communicate(), timeout=EXEC_TIMEOUT_SECONDS
            )
        except TimeoutError as exc:
            process.kill()
            await process.wait()
            raise ExecCredentialError(
                f"exec: {plugin.command} did not finish in {EXEC_TIMEOUT_SECONDS:.0f}s"
            ) from exc
        self.runs += 1
        if process.returncode != 0:
            detail = stderr.decode("utf-8", "replace").strip()[:500]
            raise ExecCredentialError(
                f"exec: {plugin.command} exited with status {process.returncode}: {detail}"
            )
        self._token, self._expiry = parse_credential(stdout, api_version=plugin.api_version)


def parse_credential(raw: bytes, *, api_version: str) -> tuple[str, dt.datetime | None]:
    """Return (token, expiry) from a plugin's stdout; reject anything else with a reason."""
    try:
        decoded = json.loads(raw)
    except ValueError as exc:
        raise ExecCredentialError(f"exec: the plugin printed no JSON: {exc}") from exc
    if not isinstance(decoded, dict) or decoded.get("kind") != "ExecCredential":
        raise ExecCredentialError("exec: the plugin did not print an ExecCredential")
    if decoded.get("apiVersion") != api_version:
        raise ExecCredentialError(
            f"exec: the plugin answered {decoded.get('apiVersion')!r}, asked for {api_version!r}"
        )
    status = decoded.get("status")
    if not isinstance(status, dict):
        raise ExecCredentialError("exec: the ExecCredential has no status")
    token = status.get("token")
    if not isinstance(token, str) or not token:
        if status.get("clientCertificateData"):
            raise ExecCredentialError(
                "exec: plugins that return client certificates are not supported; "
                "only token-returning plugins (EKS, GKE, AKS, OIDC) are"
            )
        raise ExecCredentialError("exec: the ExecCredential has no status.token")
    expiry = model.parse_time(status.get("expirationTimestamp"))
    return token, expiry


__all__: Final[list[str]] = [
    "ExecCredentialError",
    "ExecCredentials",
    "ExecPlugin",
    "parse_credential",
]
