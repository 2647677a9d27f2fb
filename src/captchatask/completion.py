"""Shell completion for ``captchatask`` and ``kubectl captchatask``: one engine, three front-ends.

The engine (:func:`complete`) walks the same argparse parsers the commands use, so completion
cannot drift from the flags: a verb or option added to a command completes without touching
this module. Values that live in the cluster complete from the cluster, like kubectl's: ``-n``
offers namespaces, ``--context`` the kubeconfig's contexts, and a dead letter, task or provider
name the objects of the target namespace (read with the flags already typed, bounded by a short
timeout, silent on any error: completion must never print a stack trace into a prompt).

Front-ends, all calling the hidden ``__complete`` command and reading cobra's protocol (one
candidate per line, then ``:<directive>``):

* ``captchatask completion bash`` / ``zsh`` print scripts to ``source``;
* ``kubectl_complete-captchatask`` is what kubectl (1.26 and later) runs to complete a plugin.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from captchatask import commands

#: Cobra's directives: 0 = default (shell may fall back to files), 4 = no file completion.
DIRECTIVE_DEFAULT: Final = 0
DIRECTIVE_NO_FILES: Final = 4
#: Completion waits this long for the API server at most.
LOOKUP_TIMEOUT_SECONDS: Final = 3.0

#: What a positional argument names, per command path.
POSITIONAL_KINDS: Final[Mapping[tuple[str, ...], str]] = {
    ("dlq", "show"): "deadletters",
    ("dlq", "redrive"): "deadletters",
    ("dlq", "purge"): "deadletters",
    ("tasks", "show"): "tasks",
    ("providers", "status"): "providers",
}


@dataclass
class Node:
    """One command level: its options (flag -> choices or None; absent: takes no value)."""

    children: dict[str, Node] = field(default_factory=dict)
    options: dict[str, tuple[str, ...] | None] = field(default_factory=dict)
    switches: set[str] = field(default_factory=set)
    path: tuple[str, ...] = ()

    @classmethod
    def from_parser(cls, parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Node:
        """Read an argparse tree (its ``_actions`` are the only record of what it accepts)."""
        node = cls(path=path)
        for action in parser._actions:  # argparse has no public walk
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    node.children[name] = cls.from_parser(sub, (*path, name))
            elif action.option_strings:
                if action.nargs == 0:
                    node.switches.update(action.option_strings)
                else:
                    choices = tuple(str(c) for c in action.choices) if action.choices else None
                    for flag in action.option_strings:
                        node.options[flag] = choices
        return node


def tree(*, user_only: bool) -> Node:
    """The command tree: user commands in full, the component commands by name only."""
    from captchatask import cliopts, dlq, listing  # noqa: PLC0415 - only when completing

    # Before the command name only kubectl's flags are accepted (cli.dispatch hoists them).
    root = Node()
    for flags, takes_value in cliopts.GLOBAL_FLAGS:
        for flag in flags:
            if takes_value:
                root.options[flag] = cliopts.OUTPUTS if flag in ("-o", "--output") else None
            else:
                root.switches.add(flag)
    root.children["dlq"] = Node.from_parser(dlq.build_parser("dlq"), ("dlq",))
    root.children["tasks"] = Node.from_parser(
        listing.build_tasks_parser("tasks"),
        ("tasks",),
    )
    root.children["providers"] = Node.from_parser(
        listing.build_providers_parser("providers"),
        ("providers",),
    )
    if not user_only:
        for name in commands.SUBCOMMANDS:
            root.children.setdefault(name, Node(path=(name,)))
        shells = {shell: Node(path=("completion", shell)) for shell in ("bash", "zsh")}
        root.children["completion"] = Node(children=shells, path=("completion",))
    return root


Lookup = Callable[[str, Mapping[str, str]], list[str]]


@dataclass(frozen=True)
class Completion:
    """Candidates and a cobra directive."""

    candidates: list[str]
    directive: int = DIRECTIVE_NO_FILES

    def render(self) -> str:
        """Cobra's wire format."""
        return "".join(f"{c}\n" for c in self.candidates) + f":{self.directive}\n"


_FLAG_KEYS: Final = {
    "-n": "namespace",
    "--namespace": "namespace",
    "--context": "context",
    "--kubeconfig": "kubeconfig",
}


def complete(words: Sequence[str], root: Node, lookup: Lookup) -> Completion:
    """Complete the last of ``words`` (the words after the program name; the last may be "")."""
    current = words[-1] if words else ""
    node = root
    flags: dict[str, str] = {}
    pending: str | None = None
    for word in words[:-1]:
        if pending is not None:
            if pending in _FLAG_KEYS:
                flags[_FLAG_KEYS[pending]] = word
            pending = None
        elif word.startswith("-"):
            name, eq, value = word.partition("=")
            if name in node.options and not eq:
                pending = name
            elif eq and name in _FLAG_KEYS:
                flags[_FLAG_KEYS[name]] = value
        elif word in node.children:
            node = node.children[word]
    if pending is not None:
        return _value(pending, node.options.get(pending), current, flags, lookup)
    if current.startswith("-"):
        name, eq, _ = current.partition("=")
        if eq and name in node.options:
            values = _value(name, node.options[name], "", flags, lookup)
            return Completion(
                [f"{name}={v}" for v in values.candidates if f"{name}={v}".startswith(current)],
                values.directive,
            )
        flags_here = sorted({*node.options, *node.switches})
        return Completion([f for f in flags_here if f.startswith(current)])
    if node.children:
        return Completion([c for c in node.children if c.startswith(current)])
    kind = POSITIONAL_KINDS.get(node.path)
    if kind is None:
        return Completion([])
    return Completion([n for n in lookup(kind, flags) if n.startswith(current)])


def _value(
    flag: str,
    choices: tuple[str, ...] | None,
    current: str,
    flags: Mapping[str, str],
    lookup: Lookup,
) -> Completion:
    if flag == "--kubeconfig":
        return Completion([], DIRECTIVE_DEFAULT)
    if choices is not None:
        return Completion([c for c in choices if c.startswith(current)])
    if flag in ("-n", "--namespace", "--context"):
        kind = "namespaces" if flag != "--context" else "contexts"
        return Completion([n for n in lookup(kind, flags) if n.startswith(current)])
    return Completion([])


def cluster_lookup(kind: str, flags: Mapping[str, str]) -> list[str]:
    """Names from the kubeconfig or the API server; an empty list on any failure."""
    try:
        if kind == "contexts":
            return _contexts(flags.get("kubeconfig"))
        return asyncio.run(asyncio.wait_for(_names(kind, flags), timeout=LOOKUP_TIMEOUT_SECONDS))
    except Exception:  # noqa: BLE001 - completion must stay silent whatever goes wrong
        return []


def _contexts(kubeconfig: str | None) -> list[str]:
    from kubernetes.config import kube_config  # noqa: PLC0415 - heavy import, only when asked

    paths = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
    merged = kube_config.KubeConfigMerger(paths).config  # type: ignore[no-untyped-call]
    return [str(c.value.get("name")) for c in merged.value.get("contexts") or ()]


async def _names(kind: str, flags: Mapping[str, str]) -> list[str]:
    import aiohttp  # noqa: PLC0415 - only when completing from the cluster

    from captchatask import kube  # noqa: PLC0415

    resource = {
        "namespaces": kube.NAMESPACES,
        "deadletters": kube.DEAD_LETTERS,
        "tasks": kube.TASKS,
        "providers": kube.PROVIDERS,
    }[kind]
    config = await asyncio.to_thread(
        kube.load_config, flags.get("kubeconfig"), context=flags.get("context")
    )
    namespace = flags.get("namespace") or config.namespace
    async with aiohttp.ClientSession(connector=kube.connector(config)) as session:
        body = await kube.KubeClient(config, session).list(
            resource, namespace, timeout=LOOKUP_TIMEOUT_SECONDS
        )
    return sorted(str(item["metadata"]["name"]) for item in body.get("items", []))


BASH: Final = """\
# bash completion for {prog}; load with: source <({prog} completion bash)
_{func}() {{
    local IFS=$'\\n' line
    local -a reply=()
    while read -r line; do
        if [[ $line == :* ]]; then
            # Directive 0 with no candidates: let bash complete file names (--kubeconfig).
            [[ $line == :0 && ${{#reply[@]}} -eq 0 ]] && compopt -o default
            break
        fi
        reply+=("$line")
    done < <({prog} __complete "${{COMP_WORDS[@]:1:$COMP_CWORD}}" 2>/dev/null)
    COMPREPLY=("${{reply[@]}}")
}}
complete -F _{func} {prog}
"""

ZSH: Final = """\
#compdef {prog}
# zsh completion for {prog}; load with: source <({prog} completion zsh)
_{func}() {{
    local -a lines candidates
    lines=("${{(@f)$({prog} __complete "${{(@)words[2,CURRENT]}}" 2>/dev/null)}}")
    candidates=(${{lines:#:*}})
    if (( ${{#candidates}} )); then
        compadd -Q -- "${{candidates[@]}}"
    elif [[ ${{lines[-1]}} == :0 ]]; then
        _files
    fi
}}
if (( $+functions[compdef] )); then
    compdef _{func} {prog}
fi
"""


def script(shell: str, prog: str = "captchatask") -> str:
    """The completion script for ``shell`` (``bash`` or ``zsh``)."""
    template = {"bash": BASH, "zsh": ZSH}[shell]
    return template.format(prog=prog, func=prog.replace("-", "_"))


__all__: Final[list[str]] = [
    "Completion",
    "Node",
    "cluster_lookup",
    "complete",
    "script",
    "tree",
]
