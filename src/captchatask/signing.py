"""Pingback URL signing: an unguessable, stateless, per-task-instance token in the URL path.

Solver pingbacks are unauthenticated (provider-api.md §3), so anyone who knows our URL scheme
could post a forged answer. Each task's pingback URL therefore carries
``HMAC-SHA256(key, namespace | name | uid)`` in its path:

* the sidecar verifies it from the path alone, in constant time, before it reads anything or
  calls any API, so forged requests cost nothing;
* the uid binds the token to one task *instance*: a task deleted and recreated under the same name
  gets a new uid, and its predecessor's pingback is recognised as such (a dead letter), never
  applied to the newcomer;
* everything is in the path, because 2captcha keeps only the first query parameter of a pingback
  URL on GET submits and CaptchaAI appends ``?id=&code=`` to whatever URL it was given.

Keys come from a Secret generated once at install. Several keys may be configured: the first
signs, all verify, which is how a key is rotated without losing in-flight pingbacks.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from captchatask.model import TaskRef

#: Path prefix of every pingback URL; the sidecar routes on it.
PINGBACK_PREFIX: Final = "/v1/pingback"
#: 144 bits of MAC: far beyond guessing, and a 24-character URL-safe path segment.
TOKEN_BYTES: Final = 18
#: A key shorter than this is a configuration mistake (HMAC keys should match the hash size).
MIN_KEY_BYTES: Final = 32
_DOMAIN: Final = b"captchatask.dev/pingback/v1"
# The shapes of the four path segments (bare patterns, used with fullmatch). Kubernetes names:
# DNS-1123 labels (namespace) and subdomains (object names); uids are UUIDs.
_NAMESPACE_PATTERN: Final = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
_NAME_PATTERN: Final = r"[a-z0-9](?:[-a-z0-9.]{0,251}[a-z0-9])?"
_UID_PATTERN: Final = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_TOKEN_PATTERN: Final = r"[A-Za-z0-9_-]{24}"  # noqa: S105 - a shape, not a secret
_TOKEN_RE: Final = re.compile(_TOKEN_PATTERN)
# All four segments joined by "/" in one match: no pattern matches a "/", so this holds exactly
# when each segment has its shape (a segment containing "/" adds a fifth part and fails).
_PARTS_RE: Final = re.compile(
    "/".join((_NAMESPACE_PATTERN, _NAME_PATTERN, _UID_PATTERN, _TOKEN_PATTERN))
)
_SEPARATOR: Final = b"\n"


class SigningKeyError(ValueError):
    """The configured signing key is missing or too weak."""


@dataclass(frozen=True, slots=True)
class PingbackPath:
    """The parts of a pingback path, shape-checked but not yet authenticated."""

    ref: TaskRef
    token: str


class PingbackSigner:
    """Signs and verifies pingback tokens with one active key and optional retired keys.

    Parameters
    ----------
    keys
        Raw key bytes; ``keys[0]`` signs, every key verifies.
    """

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise SigningKeyError("no pingback signing key configured")
        for key in keys:
            if len(key) < MIN_KEY_BYTES:
                raise SigningKeyError(
                    f"pingback signing keys must be at least {MIN_KEY_BYTES} bytes"
                )
        # One keyed HMAC per key, built once: a verification copies it (the key schedule is
        # already done) instead of keying a new HMAC on every pingback.
        self._macs = tuple(hmac.new(key, _DOMAIN + _SEPARATOR, hashlib.sha256) for key in keys)

    def __repr__(self) -> str:
        return f"PingbackSigner(keys=<{len(self._macs)} redacted>)"

    @staticmethod
    def _mac(keyed: hmac.HMAC, namespace: str, name: str, uid: str) -> str:
        mac = keyed.copy()
        mac.update(_SEPARATOR.join((namespace.encode(), name.encode(), uid.encode())))
        return base64.urlsafe_b64encode(mac.digest()[:TOKEN_BYTES]).decode("ascii")

    def token(self, ref: TaskRef) -> str:
        """Return the token for one task instance (deterministic: safe to recompute)."""
        return self._mac(self._macs[0], ref.namespace, ref.name, ref.uid)

    def verify(self, ref: TaskRef, token: str) -> bool:
        """Check a token against every key, in constant time per key."""
        return self.verify_parts(ref.namespace, ref.name, ref.uid, token)

    def verify_parts(self, namespace: str, name: str, uid: str, token: str) -> bool:
        """:meth:`verify` from the path segments, before any object is built for them."""
        if not _TOKEN_RE.fullmatch(token):
            return False
        ok = False
        for keyed in self._macs:
            # No early exit: the time taken does not tell which key matched.
            ok |= hmac.compare_digest(self._mac(keyed, namespace, name, uid), token)
        return ok

    def path(self, ref: TaskRef) -> str:
        """Return the signed path ``/v1/pingback/<ns>/<name>/<uid>/<token>``."""
        return f"{PINGBACK_PREFIX}/{ref.namespace}/{ref.name}/{ref.uid}/{self.token(ref)}"

    def url(self, public_base_url: str, ref: TaskRef) -> str:
        """Return the full pingback URL under a receiver's public base URL."""
        return public_base_url.rstrip("/") + self.path(ref)


def path_parts_ok(namespace: str, name: str, uid: str, token: str) -> bool:
    """Whether the four path segments have the shapes of a pingback path (one regex match).

    This runs before the MAC check, so it must be cheap and must not depend on any state.
    """
    return _PARTS_RE.fullmatch(f"{namespace}/{name}/{uid}/{token}") is not None


def parse_path_parts(namespace: str, name: str, uid: str, token: str) -> PingbackPath | None:
    """Shape-check the four path segments; ``None`` for anything that cannot be ours.

    This runs before the MAC check, so it must be cheap and must not depend on any state.
    """
    if not path_parts_ok(namespace, name, uid, token):
        return None
    return PingbackPath(ref=TaskRef(namespace=namespace, name=name, uid=uid), token=token)


def load_keys(path: Path) -> list[bytes]:
    """Read signing keys from a file (one per line; the Secret is mounted as such a file).

    Each line is the key material itself (the chart generates 48 random alphanumerics); blank
    lines are ignored. The first line signs.
    """
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    keys = [line.encode() for line in lines if line]
    if not keys:
        raise SigningKeyError(f"the pingback key file {path.name!r} is empty")
    return keys
