"""Exceptions raised by the provider client, one subclass per verdict.

Every exception carries the :class:`~captchatask.provider.codes.Classification` that caused
it, so a caller can read the documented wait (``exc.classification.wait_seconds``) without
parsing messages. Messages are built only from the code and the fixed reason of the
classification table: they never contain request data such as the API key.
"""

from __future__ import annotations

from captchatask.provider.codes import Classification, Verdict

__all__ = [
    "ConfigError",
    "ProviderError",
    "RetryLaterError",
    "SubmitAmbiguousError",
    "TaskFailedError",
    "UnknownReplyError",
    "error_for",
]


class ProviderError(Exception):
    """A solver-API request failed; ``classification`` says how to react."""

    def __init__(self, classification: Classification) -> None:
        super().__init__(
            f"{classification.verdict.value}: {classification.code}: {classification.reason}"
        )
        self.classification = classification

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.classification!r})"


class RetryLaterError(ProviderError):
    """Transient failure: repeat the request after ``classification.wait_seconds``."""


class SubmitAmbiguousError(RetryLaterError):
    """An ``in.php`` failed after its request may have reached the provider.

    The provider may have created (and will bill, solve and report) a task whose id we never
    learned: repeating the request could create a second one. The client never repeats it;
    the caller waits for the task's pingback before it submits again (see
    :func:`captchatask.provider.client.ProviderClient.submit`).
    """


class UnknownReplyError(RetryLaterError):
    """An undocumented code: retried like a transient failure, but counted separately."""


class TaskFailedError(ProviderError):
    """Permanent for this task or this request's input; a new task may be submitted."""


class ConfigError(ProviderError):
    """Account or configuration problem: stop submitting and surface it."""


_BY_VERDICT: dict[Verdict, type[ProviderError]] = {
    Verdict.RETRY_LATER: RetryLaterError,
    Verdict.UNKNOWN: UnknownReplyError,
    Verdict.TASK_FAILED: TaskFailedError,
    Verdict.CONFIG_ERROR: ConfigError,
    # A not-ready reply where an answer was required (e.g. submit) is transient as well.
    Verdict.NOT_READY: RetryLaterError,
}


def error_for(classification: Classification) -> ProviderError:
    """Return the exception matching a classification's verdict."""
    return _BY_VERDICT[classification.verdict](classification)
