"""The secrets scan: neither the solver API key nor the pingback HMAC key may leak anywhere.

Where a key could leak: a log line (every component's log, and the control plane's), a
Kubernetes Event, the status (or any field) of a task, provider or dead letter, and the
metrics. Each secret is searched verbatim, base64-encoded (how a careless dump of a Secret
would show it) and by its first half (a truncated leak is still a leak).
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

#: A prefix this long of a random key is never found by chance.
MIN_FRAGMENT: Final = 12


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
