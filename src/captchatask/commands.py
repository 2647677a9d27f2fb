"""The command table of ``captchatask``: each name, the module and function that run it, its help.

A table of strings, not of functions, so that reading it imports nothing: :mod:`captchatask.cli`
imports the chosen module only when its command runs (``captchatask sidecar`` never imports
kopf), and :mod:`captchatask.completion` completes command names without importing the CLI
that uses it.
"""

from __future__ import annotations

from typing import Final

# name -> (module, function, one-line help). Each function takes the remaining argv, returns
# the exit status, and owns its own argparse (so `captchatask <name> --help` is complete).
SUBCOMMANDS: Final[dict[str, tuple[str, str, str]]] = {
    "operator": ("captchatask_operator.cli", "main", "run the kopf operator"),
    "sidecar": ("captchatask_sidecar.cli", "main", "run the pingback sidecar / receiver"),
    "emulator": ("captchatask.emulator.cli", "main", "run the CaptchaAI-compatible emulator"),
    "testbed": ("captchatask.testbed", "cli_main", "start/stop a local etcd + kube-apiserver"),
    "demo": ("captchatask.demo", "main", "run the whole system locally, with faults"),
}
#: The user commands, shared with ``kubectl captchatask``; their functions also take ``prog``.
USER_COMMANDS: Final[dict[str, tuple[str, str, str]]] = {
    "dlq": ("captchatask.dlq", "main", "list, show, redrive and purge dead letters"),
    "tasks": ("captchatask.listing", "tasks_main", "list and show CaptchaTasks"),
    "providers": ("captchatask.listing", "providers_main", "provider health (providers status)"),
}
