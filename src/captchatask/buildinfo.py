"""``captchatask_build_info``: the one series both components export to say which version runs.

It lives here, below both components, so the operator and the receiver cannot drift apart in
its name, help or labels: dashboards and upgrade checks join on it across both.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge

from captchatask.version import __version__

__all__ = ["register_build_info"]


def register_build_info(registry: CollectorRegistry) -> Gauge:
    """Register ``captchatask_build_info{version}`` (always 1) on ``registry`` and return it."""
    gauge = Gauge(
        "captchatask_build_info",
        "Always 1; the running captchatask version, for dashboards and upgrade checks.",
        ["version"],
        registry=registry,
    )
    gauge.labels(__version__).set(1)
    return gauge
