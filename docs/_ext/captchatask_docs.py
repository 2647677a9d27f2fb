"""Generate the reference pages of the documentation site from the files they describe.

The API reference comes from the CRD schemas in ``charts/captchatask/crds/``, the CLI reference
from the argparse parsers the commands really use, the alert pages' headers from
``charts/captchatask/files/prometheus-rules.yaml``, and the benchmark and chaos figures from
``bench/results/*.json``. Nothing here is typed twice: a field, flag, alert or figure that changes
in its source changes on the site at the next build, and a page can never describe a field that
no longer exists.

Sphinx runs :func:`generate` when the builder starts (``builder-inited``), before it reads any
page; the pages pull the generated Markdown in with MyST's ``{include}``. It can also be run by
hand to look at the output: ``python docs/_ext/captchatask_docs.py OUTDIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import yaml

ROOT: Final = Path(__file__).resolve().parents[2]
CRD_DIR: Final = ROOT / "charts" / "captchatask" / "crds"
RULES_FILE: Final = ROOT / "charts" / "captchatask" / "files" / "prometheus-rules.yaml"
RESULTS_DIR: Final = ROOT / "bench" / "results"
#: Where the generated Markdown goes, inside the Sphinx source tree (ignored by git).
GENERATED: Final = ROOT / "docs" / "_generated"
#: The published site. Alert ``runbook_url``s point here; tests/test_docs.py holds them to it.
SITE_URL: Final = "https://captchatask.github.io/captchatask/"
#: The path of an alert's runbook below :data:`SITE_URL` (dirhtml: one directory per page).
RUNBOOK_PATH: Final = "runbooks/{slug}/"

_CRD_ORDER: Final = ("CaptchaTask", "CaptchaProvider", "CaptchaDeadLetter")
_HIDDEN_TOP: Final = frozenset({"apiVersion", "kind", "metadata"})


def runbook_url(alert: str) -> str:
    """The stable URL of an alert's runbook page on the published site."""
    return SITE_URL + RUNBOOK_PATH.format(slug=alert.lower())


# --- Markdown helpers -------------------------------------------------------------------------


def _escape(text: str) -> str:
    """Escape text for a Markdown table cell; `code spans` are kept as they are."""
    parts = re.split(r"(`[^`]*`)", " ".join(str(text).split()))
    out = []
    for part in parts:
        if part.startswith("`") and part.endswith("`") and len(part) > 1:
            out.append(part.replace("|", "\\|"))
        else:
            out.append(re.sub(r"([\\|*_<>\[\]])", r"\\\1", part))
    return "".join(out)


def _code(text: str) -> str:
    """A code span that survives any backticks and pipes inside it."""
    text = str(text).replace("|", "\\|")
    fence = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# --- CRDs -------------------------------------------------------------------------------------


def _type_of(schema: dict[str, Any]) -> str:
    kind = schema.get("type", "any")
    if schema.get("format") == "date-time":
        return "time"
    if kind == "array":
        return f"[]{_type_of(schema.get('items', {}))}"
    if schema.get("x-kubernetes-int-or-string"):
        return "int or string"
    return str(kind)


def _constraints(schema: dict[str, Any]) -> str:
    found = []
    if "enum" in schema:
        found.append(" \\| ".join(_code(v) for v in schema["enum"]))
    for low, high, unit in (
        ("minimum", "maximum", ""),
        ("minLength", "maxLength", " chars"),
        ("minItems", "maxItems", " items"),
    ):
        if low in schema and high in schema:
            found.append(f"{schema[low]} to {schema[high]}{unit}")
        elif high in schema:
            found.append(f"≤ {schema[high]}{unit}")
        elif low in schema:
            found.append(f"≥ {schema[low]}{unit}")
    if "pattern" in schema:
        found.append(f"pattern {_code(schema['pattern'])}")
    return "; ".join(found)


def _fields(
    schema: dict[str, Any], path: str, required: bool
) -> Iterator[tuple[str, dict[str, Any], bool]]:
    yield path, schema, required
    needed = set(schema.get("required", ()))
    for name, child in schema.get("properties", {}).items():
        yield from _fields(child, f"{path}.{name}" if path else name, name in needed)
    items = schema.get("items")
    if isinstance(items, dict) and "properties" in items:
        needed = set(items.get("required", ()))
        for name, child in items["properties"].items():
            yield from _fields(child, f"{path}[].{name}", name in needed)


def _field_rows(root: dict[str, Any]) -> list[list[str]]:
    rows = []
    for top, schema in root.get("properties", {}).items():
        if top in _HIDDEN_TOP:
            continue
        for path, field, required in _fields(schema, top, top in root.get("required", ())):
            default = field.get("default")
            rows.append(
                [
                    _code(path) + (" (required)" if required and path != top else ""),
                    _escape(_type_of(field)),
                    "" if default is None else _code(json.dumps(default)),
                    _constraints(field),
                    _escape(field.get("description", "")),
                ]
            )
    return rows


def _validations(root: dict[str, Any]) -> list[list[str]]:
    rows = []
    for top in ("spec", "status"):
        for path, field, _required in _fields(root.get("properties", {}).get(top, {}), top, False):
            for rule in field.get("x-kubernetes-validations", ()):
                message = rule.get("message") or rule.get("messageExpression", "")
                where = path + rule.get("fieldPath", "")
                rows.append([_code(where), _code(rule["rule"]), _escape(message)])
    return rows


def crd_reference(crd_dir: Path = CRD_DIR) -> str:
    """The API reference: one section per CRD, every field of its schema in one table."""
    crds = [yaml.safe_load(p.read_text(encoding="utf-8")) for p in sorted(crd_dir.glob("*.yaml"))]
    crds.sort(key=lambda c: _CRD_ORDER.index(c["spec"]["names"]["kind"]))
    out = []
    for crd in crds:
        spec = crd["spec"]
        names = spec["names"]
        for version in spec["versions"]:
            root = version["schema"]["openAPIV3Schema"]
            short = ", ".join(_code(s) for s in names.get("shortNames", ()))
            out.append(f"## {names['kind']}\n")
            out.append(f"{_escape(root.get('description', ''))}\n")
            out.append(
                _table(
                    ["", ""],
                    [
                        ["API version", _code(f"{spec['group']}/{version['name']}")],
                        ["scope", spec["scope"]],
                        ["plural / short names", f"{_code(names['plural'])}; {short}"],
                        ["categories", ", ".join(_code(c) for c in names.get("categories", ()))],
                        [
                            "status subresource",
                            "yes" if "status" in version.get("subresources", {}) else "no",
                        ],
                        [
                            "CRD file",
                            _code(f"charts/captchatask/crds/{crd['metadata']['name']}.yaml"),
                        ],
                    ],
                )
                + "\n"
            )
            out.append(f"### {names['kind']} fields\n")
            out.append(
                _table(["field", "type", "default", "allowed", "meaning"], _field_rows(root)) + "\n"
            )
            rules = _validations(root)
            if rules:
                out.append(f"### {names['kind']} validation rules\n")
                out.append(
                    "Checked by the API server (CEL) on every create and update; the message "
                    "names the field.\n"
                )
                out.append(_table(["field", "rule", "message"], rules) + "\n")
            columns = version.get("additionalPrinterColumns", ())
            if columns:
                out.append(f"### {names['kind']} columns of `kubectl get`\n")
                out.append(
                    _table(
                        ["column", "from", "shown"],
                        [
                            [
                                _escape(c["name"].upper()),
                                _code(c["jsonPath"]),
                                "with `-o wide`" if c.get("priority", 0) > 0 else "always",
                            ]
                            for c in columns
                        ],
                    )
                    + "\n"
                )
    return "\n".join(out)


# --- CLI --------------------------------------------------------------------------------------


class _Captured(Exception):
    """Raised instead of printing help, carrying the parser that was asked for it."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__(parser.prog)
        self.parser = parser


def capture_parser(run: Callable[[list[str]], object], argv: list[str]) -> argparse.ArgumentParser:
    """The parser a command builds when run with ``--help``, without running the command.

    Asking the command itself (rather than rebuilding its parser here) documents exactly the
    flags it accepts. ``CAPTCHATASK_*`` variables are hidden while it parses, so defaults read
    from the environment are the built-in ones.
    """

    def _raise(self: argparse.ArgumentParser, file: object = None) -> None:  # noqa: ARG001
        raise _Captured(self)

    saved_env = {k: v for k, v in os.environ.items() if k.startswith("CAPTCHATASK_")}
    original = argparse.ArgumentParser.print_help
    argparse.ArgumentParser.print_help = _raise  # type: ignore[method-assign]
    try:
        for key in saved_env:
            del os.environ[key]
        run([*argv, "--help"])
    except _Captured as captured:
        return captured.parser
    finally:
        argparse.ArgumentParser.print_help = original  # type: ignore[method-assign]
        os.environ.update(saved_env)
    raise RuntimeError(f"{argv}: --help did not reach an argparse parser")


def _usage(parser: argparse.ArgumentParser) -> str:
    with contextlib.redirect_stdout(io.StringIO()) as buffer:
        parser.print_usage(file=sys.stdout)
    return buffer.getvalue().strip()


def _option_rows(parser: argparse.ArgumentParser) -> list[list[str]]:
    formatter = parser._get_formatter()
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
            continue
        if action.help == argparse.SUPPRESS:
            continue
        if action.option_strings:
            name = ", ".join(_code(s) for s in action.option_strings)
            if action.nargs != 0:
                name += " " + _code(formatter._format_args(action, action.dest.upper()))
        else:
            name = _code(formatter._format_args(action, action.dest))
        default = action.default
        shown = (
            ""
            if default in (None, False, argparse.SUPPRESS)
            or (action.nargs == 0 and default is False)
            else _code(str(default))
        )
        choices = " \\| ".join(_code(c) for c in action.choices) if action.choices else ""
        help_text = formatter._expand_help(action) if action.help else ""
        rows.append([name, shown, choices, _escape(help_text)])
    return rows


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            found += [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return found


def _parser_section(parser: argparse.ArgumentParser, level: int, *, recurse: bool = True) -> str:
    out = [f"{'#' * level} `{parser.prog}`\n"]
    if parser.description:
        out.append(_escape(parser.description) + "\n")
    out.append(f"```text\n{_usage(parser)}\n```\n")
    rows = _option_rows(parser)
    if rows:
        out.append(_table(["argument", "default", "choices", "meaning"], rows) + "\n")
    if parser.epilog:
        out.append(_escape(parser.epilog) + "\n")
    subs = _subcommands(parser)
    if subs:
        out.append(
            _table(
                ["command", "what it does"],
                [[_code(f"{parser.prog} {n}"), _escape(h)] for n, h, _ in subs],
            )
            + "\n"
        )
        if recurse:
            out += [_parser_section(sub, level + 1) for _name, _help, sub in subs]
    return "\n".join(out)


def cli_reference() -> str:
    """The CLI reference: ``captchatask`` and every subcommand, from their own parsers."""
    from captchatask import cli, commands  # noqa: PLC0415 - imported by the build, not by this module

    # The top-level parser only dispatches: its subcommands are stubs, each documented below
    # from the parser the subcommand builds itself.
    out = [_parser_section(capture_parser(cli.main, []), 2, recurse=False)]
    names = [*commands.SUBCOMMANDS, *commands.USER_COMMANDS, "completion"]
    out += [_parser_section(capture_parser(cli.main, [name]), 2) for name in names]
    return "\n".join(out)


# --- Alerts -----------------------------------------------------------------------------------


def alert_rules(rules_file: Path = RULES_FILE) -> list[dict[str, Any]]:
    """Every alerting rule of the rules file the chart ships, in file order."""
    document = yaml.safe_load(rules_file.read_text(encoding="utf-8"))
    return [r for g in document["groups"] for r in g["rules"] if "alert" in r]


def alert_index(rules: Sequence[dict[str, Any]]) -> str:
    """The table of all alerts, each linking to its runbook page."""
    rows = [
        [
            f"{{doc}}`{r['alert']} </runbooks/{r['alert'].lower()}>`",
            r["labels"]["severity"],
            _escape(r["annotations"]["summary"]),
            r["for"],
        ]
        for r in rules
    ]
    return _table(["alert", "severity", "summary", "for"], rows) + "\n"


def _promql_language(expr: str) -> str:
    """``promql`` where Pygments can colour the expression, else ``text``.

    Pygments' PromQL lexer does not know recording-rule names (``a:b:c``) and a strict build
    turns its complaint into an error.
    """
    from pygments.lexers import PromQLLexer  # noqa: PLC0415
    from pygments.token import Error  # noqa: PLC0415

    tokens = PromQLLexer().get_tokens(expr)
    return "text" if any(kind is Error for kind, _value in tokens) else "promql"


def alert_header(rule: dict[str, Any]) -> str:
    """The facts at the top of an alert's runbook page, as the rules file states them."""
    return "\n".join(
        [
            _table(
                ["", ""],
                [
                    ["severity", rule["labels"]["severity"]],
                    ["fires after", _code(rule["for"])],
                    ["summary", _escape(rule["annotations"]["summary"])],
                    ["this page", _code(rule["annotations"]["runbook_url"])],
                ],
            ),
            "",
            f"```{_promql_language(rule['expr'])}\n{rule['expr'].strip()}\n```",
            "",
        ]
    )


# --- Benchmarks and chaos ---------------------------------------------------------------------


def benchmark_tables(results_file: Path) -> str:
    """The benchmark tables of one results document (``bench.report`` renders them)."""
    from bench import report  # noqa: PLC0415

    results = json.loads(results_file.read_text(encoding="utf-8"))
    return report.render(results)


def readme_benchmarks(results_file: Path) -> str:
    """The README's benchmark block: every target of one results document (``bench.report``)."""
    if str(ROOT) not in sys.path:  # bench/ is a directory of the checkout, not an installed package
        sys.path.insert(0, str(ROOT))
    from bench import report  # noqa: PLC0415

    return report.readme_block(json.loads(results_file.read_text(encoding="utf-8")))


def chaos_figures(results_file: Path) -> str:
    """One chaos run: how to replay it, its verdict and its table (``bench.chaos.report``)."""
    from bench.chaos import report  # noqa: PLC0415

    if not results_file.exists():
        return f"Not recorded yet: `{results_file.name}` is written by `make chaos`.\n"
    doc = json.loads(results_file.read_text(encoding="utf-8"))
    verdict = "passed" if doc["passed"] and not doc["violations"] else "FAILED"
    lines = [
        f"Profile `{doc['profile']}`, seed {doc['seed']}, recorded {doc['recorded_at']}: "
        f"**{verdict}** ({len(doc['violations'])} violations). Replay: `{doc['replay']}`.",
        "",
        "```text",
        report.table(doc["figures"], dialect=doc.get("dialect", "captchaai")),
        "```",
        "",
        "Fault timeline:",
        "",
        "```text",
        *doc["fault_timeline"],
        "```",
        "",
    ]
    return "\n".join(lines)


def chaos_summary(results_file: Path) -> str:
    """The one-line figures a summary quotes (the README's guarantees paragraph)."""
    doc = json.loads(results_file.read_text(encoding="utf-8"))
    f = doc["figures"]
    faults = f["faults"]
    outage = f["timings"]["apiserver_outage_seconds"]
    return (
        f"{f['tasks']:,} tasks, {faults['pingbacks_dropped']} pingbacks dropped, "
        f"{faults['pingbacks_duplicated']} duplicated, a {outage:.0f} s API-server outage, "
        f"{faults['sidecar_sigkills']} sidecar and {faults['operator_sigkills']} operator "
        f"SIGKILLs: lost {f['lost']}, recorded twice {f['duplicates_recorded']}, "
        f"submitted twice {f['submitted_twice']}, secret leaks {f['secret_leaks']}"
    )


# --- Build hook -------------------------------------------------------------------------------


def _write(path: Path, text: str) -> None:
    """Write only on change, so Sphinx rebuilds only the pages whose sources changed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")


def generate(out: Path = GENERATED) -> list[Path]:
    """Write every generated fragment into ``out``; return the files written."""
    if str(ROOT) not in sys.path:  # bench/ is a directory of the checkout, not an installed package
        sys.path.insert(0, str(ROOT))
    files: dict[str, str] = {
        "api.md": crd_reference(),
        "cli.md": cli_reference(),
        "benchmarks.md": benchmark_tables(RESULTS_DIR / "full.json"),
        "chaos-full.md": chaos_figures(RESULTS_DIR / "chaos-full.json"),
        "chaos-ci.md": chaos_figures(RESULTS_DIR / "chaos-ci.json"),
        "chaos-full-2captcha.md": chaos_figures(RESULTS_DIR / "chaos-full-2captcha.json"),
        "chaos-summary.md": chaos_summary(RESULTS_DIR / "chaos-full.json") + ".\n",
    }
    rules = alert_rules()
    files["alerts.md"] = alert_index(rules)
    for rule in rules:
        files[f"alerts/{rule['alert'].lower()}.md"] = alert_header(rule)
    for name, text in files.items():
        _write(out / name, text)
    return [out / name for name in files]


def _on_builder_inited(app: Any) -> None:
    generate(Path(app.srcdir) / "_generated")


def setup(app: Any) -> dict[str, Any]:
    """Sphinx entry point."""
    app.connect("builder-inited", _on_builder_inited)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}


if __name__ == "__main__":
    for written in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else GENERATED):
        print(written)
