"""The command line as kubectl users type it: flags anywhere, the plugin's verbs, completion.

Parsing and completion are pure and run here without a cluster; the shells are the real bash
and zsh (completion scripts are code too). Commands against the API server are in
``test_cli_cluster.py``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from captchatask import cliopts, completion, dlq, listing
from captchatask.commands import SUBCOMMANDS, USER_COMMANDS

Parse = Callable[[list[str]], argparse.Namespace]

#: (command, verb and its positional words, parser): every user command line.
COMMAND_LINES: list[tuple[str, list[str], Parse]] = [
    ("dlq", ["list"], dlq.parse),
    ("dlq", ["show", "letter-1"], dlq.parse),
    ("dlq", ["redrive", "letter-1"], dlq.parse),
    ("dlq", ["purge", "letter-1"], dlq.parse),
    ("tasks", ["list"], listing.parse_tasks),
    ("tasks", ["show", "task-1"], listing.parse_tasks),
    ("providers", ["status"], listing.parse_providers),
    ("providers", ["status", "default"], listing.parse_providers),
]
FLAGS = ["-n", "demo", "--context", "ctx", "--kubeconfig", "/k/config", "-o", "yaml"]


def _where(flags: list[str], verb: list[str], where: str) -> list[str]:
    if where == "before-command":
        leading, rest = cliopts.hoist([*flags, "cmd", *verb])
        assert rest[0] == "cmd"
        return [*leading, *rest[1:]]
    if where == "before-verb":
        return [*flags, *verb]
    return [*verb, *flags]


@pytest.mark.parametrize("where", ["before-command", "before-verb", "after-verb"])
@pytest.mark.parametrize(("command", "verb", "parse"), COMMAND_LINES)
def test_kubectl_flags_are_accepted_before_the_command_before_the_verb_and_after_it(
    command: str, verb: list[str], parse: Parse, where: str
) -> None:
    args = parse(_where(FLAGS, verb, where))
    assert (args.namespace, args.context, args.kubeconfig, args.output) == (
        "demo",
        "ctx",
        "/k/config",
        "yaml",
    ), command
    assert args.all_namespaces is False


@pytest.mark.parametrize(("command", "verb", "parse"), COMMAND_LINES)
def test_a_flag_after_the_verb_is_not_overwritten_by_the_verbs_default(
    command: str, verb: list[str], parse: Parse
) -> None:
    args = parse(["--namespace=outer", *verb])
    assert args.namespace == "outer", command
    args = parse(["-n", "outer", *verb, "-n", "inner"])
    assert args.namespace == "inner", command


def test_all_namespaces_works_after_the_verb_of_listings() -> None:
    assert dlq.parse(["list", "-A"]).all_namespaces is True
    assert listing.parse_tasks(["-A", "list", "-o", "wide"]).all_namespaces is True
    assert listing.parse_providers(["status", "-A"]).all_namespaces is True


def test_naming_an_object_across_all_namespaces_is_refused_like_kubectl(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        dlq.parse(["show", "letter-1", "-A"])
    assert exit_info.value.code == 2
    assert "use -n instead of -A" in capsys.readouterr().err


def test_a_bare_dry_run_means_client_and_server_is_accepted() -> None:
    assert dlq.parse(["redrive", "x", "--dry-run"]).dry_run == "client"
    assert dlq.parse(["purge", "--dry-run", "x"]).names == ["x"]
    assert dlq.parse(["purge", "--all-expired", "--dry-run=server"]).dry_run == "server"
    assert dlq.parse(["redrive", "x"]).dry_run == "none"


def test_hoist_stops_at_the_first_word_and_keeps_equals_forms() -> None:
    assert cliopts.hoist(["-n", "a", "--context=c", "-A", "dlq", "list", "-n", "b"]) == (
        ["-n", "a", "--context=c", "-A"],
        ["dlq", "list", "-n", "b"],
    )
    assert cliopts.hoist(["--bogus", "dlq"]) == ([], ["--bogus", "dlq"])


def _run_cli(*argv: str, entry: str = "captchatask") -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / entry
    return subprocess.run(
        [str(script), *argv], capture_output=True, text=True, check=False, timeout=60
    )


def test_kubectl_plugin_offers_only_the_user_commands_and_names_itself() -> None:
    result = _run_cli("--help", entry="kubectl-captchatask")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: kubectl captchatask ")
    for name in ("dlq", "tasks", "providers"):
        assert name in result.stdout
    for hidden in ("operator", "sidecar", "demo", "emulator", "testbed"):
        assert hidden not in result.stdout
    refused = _run_cli("operator", entry="kubectl-captchatask")
    assert refused.returncode == 2
    assert "invalid choice: 'operator'" in refused.stderr
    verb_help = _run_cli("dlq", "redrive", "--help", entry="kubectl-captchatask")
    assert verb_help.stdout.startswith("usage: kubectl captchatask dlq redrive ")
    assert "--dry-run" in verb_help.stdout


def test_the_full_command_still_carries_the_components_and_refuses_kubectl_flags_on_them() -> None:
    result = _run_cli("--help")
    for name in ("operator", "sidecar", "dlq", "tasks", "providers", "completion"):
        assert name in result.stdout
    refused = _run_cli("-n", "x", "operator")
    assert refused.returncode == 2
    assert "kubectl flags apply to dlq, tasks, providers" in refused.stderr


@pytest.mark.parametrize("entry", ["captchatask", "kubectl-captchatask"])
def test_the_help_names_exactly_the_commands_that_take_kubectl_flags(entry: str) -> None:
    """What `--help` says about kubectl's flags holds for every command it offers."""
    helped = _run_cli("--help", entry=entry)
    epilog = " ".join(helped.stdout.split("\n\n")[-1].split())
    assert epilog.startswith("kubectl's -n, -A, --context, --kubeconfig and -o work")
    offered = {*USER_COMMANDS} | ({*SUBCOMMANDS} if entry == "captchatask" else set())
    for name in sorted(offered):
        promised = "any verb" in epilog or re.search(rf"\b{name}\b", epilog) is not None
        result = _run_cli("-n", "x", name, "--help", entry=entry)
        assert (result.returncode == 0) == promised, (name, epilog, result.stderr)


def test_a_missing_kubeconfig_is_one_line_on_stderr_and_status_one(tmp_path: Path) -> None:
    result = _run_cli("dlq", "list", "-n", "demo", "--kubeconfig", str(tmp_path / "none"))
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: no kubeconfig found (looked at {tmp_path / 'none'})"


# -- completion ---------------------------------------------------------------------------


def fake_lookup(kind: str, flags: Mapping[str, str]) -> list[str]:
    names = {
        "namespaces": ["default", "demo", "payments"],
        "contexts": ["kind-a", "prod"],
        "deadletters": [f"letter-{flags.get('namespace', 'none')}", "other"],
        "tasks": ["task-1"],
        "providers": ["default"],
    }
    return names[kind]


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        ([""], ["dlq", "tasks", "providers"]),
        (["dlq", ""], ["list", "show", "redrive", "purge"]),
        (["dlq", "re"], ["redrive"]),
        (["-n", "demo", "dlq", "p"], ["purge"]),
        (["dlq", "list", "-o", ""], ["json", "yaml", "name", "wide"]),
        (["dlq", "list", "--phase", "E"], ["Expired"]),
        (["dlq", "purge", "--dry-run=s"], ["--dry-run=server"]),
        (["dlq", "list", "-n", "d"], ["default", "demo"]),
        (["--context", ""], ["kind-a", "prod"]),
        (["dlq", "show", "-n", "payments", "l"], ["letter-payments"]),
        (["-n", "demo", "dlq", "redrive", ""], ["letter-demo", "other"]),
        (["tasks", "show", ""], ["task-1"]),
        (["providers", "status", "-o", "wide", ""], ["default"]),
        (["providers", ""], ["status"]),
    ],
)
def test_completion_follows_the_parsers_and_asks_the_cluster_for_names(
    words: list[str], expected: list[str]
) -> None:
    result = completion.complete(words, completion.tree(user_only=True), fake_lookup)
    assert result.candidates == expected
    assert result.directive == completion.DIRECTIVE_NO_FILES


def test_completion_of_flags_lists_the_global_ones_on_every_verb() -> None:
    root = completion.tree(user_only=True)
    flags = completion.complete(["tasks", "list", "--"], root, fake_lookup).candidates
    for flag in ("--namespace", "--all-namespaces", "--context", "--kubeconfig", "--output"):
        assert flag in flags
    kubeconfig = completion.complete(["dlq", "--kubeconfig", ""], root, fake_lookup)
    assert kubeconfig == completion.Completion([], completion.DIRECTIVE_DEFAULT)


def test_the_full_command_completes_its_component_commands_too() -> None:
    root = completion.tree(user_only=False)
    result = completion.complete([""], root, fake_lookup)
    assert {"operator", "sidecar", "demo", "completion", "dlq"} <= set(result.candidates)
    assert completion.complete(["completion", ""], root, fake_lookup).candidates == ["bash", "zsh"]


def _shell_env() -> dict[str, str]:
    # The scripts call `captchatask __complete`; the venv's console script must be on PATH.
    # No kubeconfig: cluster lookups fail silently and complete nothing.
    bin_dir = str(Path(sys.executable).parent)
    return {"PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "KUBECONFIG": "/nonexistent"}


def _shell(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(
            f"{name} is not installed: `make testtools` installs it (as root), "
            f"or apt-get install {name}",
            pytrace=False,
        )
    return found


def test_bash_completion_script_fills_compreply_from_the_engine() -> None:
    bash = _shell("bash")
    program = r"""
source <(captchatask completion bash)
complete -p captchatask
COMP_WORDS=(captchatask dlq list -o "")
COMP_CWORD=4
_captchatask
printf '%s\n' "${COMPREPLY[@]}"
COMP_WORDS=(captchatask -n demo d)
COMP_CWORD=3
_captchatask
printf '%s\n' "${COMPREPLY[@]}"
"""
    result = subprocess.run(
        [bash, "--norc", "-c", program],
        capture_output=True,
        text=True,
        env=_shell_env(),
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "complete -F _captchatask captchatask"
    assert lines[1:] == ["json", "yaml", "name", "wide", "dlq", "demo"]


def test_zsh_completion_script_hands_the_engines_candidates_to_compadd() -> None:
    zsh = _shell("zsh")
    # compadd only exists inside a completion widget; a stand-in prints what it was given.
    program = r"""
compadd() { shift 2; print -l -- "$@" }
source <(captchatask completion zsh)
words=(captchatask tasks "")
CURRENT=3
_captchatask
words=(captchatask dlq redrive --dry-run "")
CURRENT=5
_captchatask
"""
    result = subprocess.run(
        [zsh, "-f", "-c", program],
        capture_output=True,
        text=True,
        env=_shell_env(),
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["list", "show", "none", "client", "server"]
