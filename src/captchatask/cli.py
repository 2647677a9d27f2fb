"""The ``captchatask`` command: one entry point, one subcommand per component.

Each subcommand's implementation lives with its component and is imported only when chosen, so
``captchatask sidecar`` never imports kopf and ``captchatask --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Final

from captchatask.version import __version__

# name -> (module, function, one-line help). Each function takes the remaining argv, returns
# the exit status, and owns its own argparse (so `captchatask <name> --help` is complete).
SUBCOMMANDS: Final[dict[str, tuple[str, str, str]]] = {
    "operator": ("captchatask_operator.cli", "main", "run the kopf operator"),
    "sidecar": ("captchatask_sidecar.cli", "main", "run the pingback sidecar / receiver"),
    "emulator": ("captchatask.emulator.cli", "main", "run the CaptchaAI-compatible emulator"),
    "testbed": ("captchatask.testbed", "cli_main", "start/stop a local etcd + kube-apiserver"),
    "dlq": ("captchatask.dlq", "main", "list, show, redrive and purge dead letters"),
    "demo": ("captchatask.demo", "main", "run the whole system locally, with faults"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="captchatask",
        description="Durable CAPTCHA-solver results on Kubernetes: operator, sidecar and tools.",
    )
    parser.add_argument("--version", action="version", version=f"captchatask {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (_module, _func, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _load(name: str) -> Callable[[list[str]], int]:
    module_name, func_name, _help = SUBCOMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name in ("kopf", "cryptography"):
            sys.exit(
                f"captchatask {name}: the optional dependency {exc.name!r} is not installed; "
                f"install captchatask[{'operator' if exc.name == 'kopf' else 'testbed'}]"
            )
        raise
    func: Callable[[list[str]], int] = getattr(module, func_name)
    return func


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``captchatask <command> [args...]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not args or args[0] not in SUBCOMMANDS:
        parser.parse_args(args or ["--help"])
        return 2
    return _load(args[0])(args[1:])


def kubectl_plugin(argv: Sequence[str] | None = None) -> int:
    """``kubectl captchatask ...``: the same commands, found by kubectl as a plugin."""
    return main(argv)


if __name__ == "__main__":
    sys.exit(main())
