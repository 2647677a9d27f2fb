"""captchatask: the shared domain of the operator and the pingback sidecar.

This package holds what both components need and nothing that only one of them does: the
``CaptchaTask`` model and its state machine, the ledger (compare-and-set status writes), the
solver API client, pingback signing, the small asynchronous Kubernetes client, and the
``captchatask`` command line. The operator lives in ``captchatask_operator`` and the sidecar in
``captchatask_sidecar``; neither imports the other.
"""

from captchatask.version import __version__

__all__ = ["__version__"]
