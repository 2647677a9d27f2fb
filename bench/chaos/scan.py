"""The secrets scan: no key, pingback token or solution token may leak where it does not belong.

Where a key could leak: a log line (every component's log, and the control plane's), a
Kubernetes Event, the status (or any field) of a task, provider or dead letter, and the
metrics. Each key is searched verbatim, base64-encoded (how a careless dump of a Secret
would show it) and by its first half (a truncated leak is still a leak).

Tokens (:func:`find_token_leaks`) are per task: the signed path token of every pingback URL
(whoever holds it can post a result for the task) and every solution token (what the user pays
for). They belong in the task's status, a dead letter's payload and the spool, so only logs,
Events and metrics are searched for them, verbatim and percent-encoded (how a URL in an access
log carries them). A token shorter than :data:`MIN_TOKEN` is skipped: it could match by chance.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote

#: A prefix this long of a random key is never found by chance.
MIN_FRAGMENT: Final = 12
#: Shortest token searched for (shorter ones, like a test's "tok", occur in ordinary words).
MIN_TOKEN: Final = 12


@dataclass(frozen=True, slots=True)
class Leak:
    """One secret found in one source (the secret itself is never printed)."""

    secret: str
    source: str
    form: str

    def describe(self) -> str:
        """Human line for the report."""
        return f"{self.secret} ({self.form}) in {self.source}"


def needles(secret: str) -> dict[str, str]:
    """The forms a secret is searched in."""
    forms = {
        "verbatim": secret,
        "base64": base64.b64encode(secret.encode()).decode().rstrip("="),
    }
    if len(secret) >= 2 * MIN_FRAGMENT:
        forms["first half"] = secret[: len(secret) // 2]
    return forms


def find_leaks(secrets: Mapping[str, str], sources: Iterable[tuple[str, str]]) -> list[Leak]:
    """Search every ``(source name, text)`` for every named secret in every form."""
    patterns = [
        (name, form, needle) for name, s in secrets.items() for form, needle in needles(s).items()
    ]
    leaks: list[Leak] = []
    for source, text in sources:
        leaks.extend(
            Leak(secret=name, source=source, form=form)
            for name, form, needle in patterns
            if needle and needle in text
        )
    return leaks


def token_needles(token: str) -> dict[str, str]:
    """The forms a pingback or solution token is searched in (empty if it is too short)."""
    if len(token) < MIN_TOKEN:
        return {}
    forms = {"verbatim": token}
    encoded = quote(token, safe="")
    if encoded != token:
        forms["percent-encoded"] = encoded
    return forms


def find_token_leaks(
    tokens: Mapping[str, Iterable[str]], sources: Iterable[tuple[str, str]]
) -> list[Leak]:
    """Search every source for every token of every kind (``{"solution token": [...]}``).

    One :class:`Leak` per kind, form and source (the token itself is never reported).
    """
    patterns = {
        (kind, form, needle)
        for kind, values in tokens.items()
        for token in values
        for form, needle in token_needles(token).items()
    }
    leaks: set[Leak] = set()
    for source, text in sources:
        leaks.update(
            Leak(secret=kind, source=source, form=form)
            for kind, form, needle in patterns
            if needle in text
        )
    return sorted(leaks, key=lambda leak: (leak.source, leak.secret, leak.form))
