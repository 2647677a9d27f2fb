"""The ``captchatask`` command: one entry point, one subcommand per component.

Each subcommand's implementation lives with its component and is imported only when chosen, so
``captchatask sidecar`` never imports kopf and ``captchatask --help`` is instant.

Two audiences, two entry points. ``captchatask`` carries everything: the components a Deployment
runs (``operator``, ``sidecar``), the local tools (``emulator``, ``testbed``, ``demo``) and the
user commands. ``kubectl captchatask`` (the ``kubectl-captchatask`` executable kubectl finds as a
plugin) carries only the user commands (``dlq``, ``tasks``, ``providers``): a person at a
kubectl prompt has no use for ``operator``, and its help says ``kubectl captchatask`` so the
printed usage can be pasted back. The user commands accept kubectl's flags before the command
name too (``captchatask -n demo dlq list``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Final, Protocol

from captchatask import cliopts, completion
from captchatask.commands import SUBCOMMANDS, USER_COMMANDS
from captchatask.version import __version__

#: The hidden command the completion scripts and kubectl call.
COMPLETE: Final = "__complete"


class UserCommand(Protocol):
    """A user command's entry point: argv and the program name its help should show."""

    def __call__(self, argv: Sequence[str], *, prog: str) -> int:
        """Run the command; return its exit status."""


def _parser(prog: str, *, user_only: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Dead letters, tasks and provider health of CaptchaTask, as a kubectl plugin."
            if user_only
            else "Durable CAPTCHA-solver results on Kubernetes: operator, sidecar and tools."
        ),
        epilog=(
            "kubectl's -n, -A, --context, --kubeconfig and -o work before or after any verb."
            if user_only
            else "kubectl's -n, -A, --context, --kubeconfig and -o work before or after the verb "
            f"of {', '.join(USER_COMMANDS)}."
        ),
    )
    parser.add_argument("--version", action="version", version=f"{prog} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    commands = dict(USER_COMMANDS)
    if not user_only:
        commands = {**SUBCOMMANDS, **USER_COMMANDS}
    for name, (_module, _func, help_text) in commands.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not user_only:
        sub.add_parser("completion", help="print a bash or zsh completion script", add_help=False)
    return parser


def _load(table: dict[str, tuple[str, str, str]], name: str) -> Callable[..., int]:
    module_name, func_name, _help = table[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name in ("kopf", "cryptography"):
            sys.exit(
                f"captchatask {name}: the optional dependency {exc.name!r} is not installed; "
                f"install captchatask[{'operator' if exc.name == 'kopf' else 'testbed'}]"
            )
        raise
    func: Callable[..., int] = getattr(module, func_name)
    return func


def _completion(argv: Sequence[str], prog: str) -> int:
    parser = argparse.ArgumentParser(
        prog=f"{prog} completion",
        description="Print a completion script. bash: source <(captchatask completion bash); "
        "zsh: source <(captchatask completion zsh), after compinit.",
    )
    parser.add_argument("shell", choices=["bash", "zsh"])
    args = parser.parse_args(list(argv))
    sys.stdout.write(completion.script(args.shell, prog))
    return 0


def _complete(words: Sequence[str], *, user_only: bool) -> int:
    root = completion.tree(user_only=user_only)
    result = completion.complete(list(words) or [""], root, completion.cluster_lookup)
    sys.stdout.write(result.render())
    return 0


def dispatch(argv: Sequence[str], *, prog: str, user_only: bool) -> int:
    """Route ``argv`` to a command; kubectl flags before the command name are passed on."""
    args = list(argv)
    if args[:1] == [COMPLETE]:
        return _complete(args[1:], user_only=user_only)
    leading, rest = cliopts.hoist(args)
    parser = _parser(prog, user_only=user_only)
    name = rest[0] if rest else None
    if name in USER_COMMANDS:
        command: UserCommand = _load(USER_COMMANDS, name)
        return command([*leading, *rest[1:]], prog=f"{prog} {name}")
    if not user_only and name in SUBCOMMANDS and not leading:
        return _load(SUBCOMMANDS, name)(rest[1:])
    if not user_only and name == "completion" and not leading:
        return _completion(rest[1:], prog)
    if leading and name is not None and name in {*SUBCOMMANDS, "completion"}:
        parser.error(f"{' '.join(leading)}: kubectl flags apply to {', '.join(USER_COMMANDS)}")
    parser.parse_args(rest or ["--help"])
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``captchatask <command> [args...]``."""
    return dispatch(sys.argv[1:] if argv is None else argv, prog="captchatask", user_only=False)


def kubectl_plugin(argv: Sequence[str] | None = None) -> int:
    """``kubectl captchatask ...``: the user commands only, with help that says so."""
    args = sys.argv[1:] if argv is None else argv
    return dispatch(args, prog="kubectl captchatask", user_only=True)


def kubectl_complete(argv: Sequence[str] | None = None) -> int:
    """``kubectl_complete-captchatask``: what kubectl 1.26+ runs to complete the plugin."""
    return _complete(sys.argv[1:] if argv is None else argv, user_only=True)


if __name__ == "__main__":
    sys.exit(main())
