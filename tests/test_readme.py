"""The README is product: every alert's runbook link lands on a heading that exists."""

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def github_anchor(heading: str) -> str:
    """The anchor GitHub derives from a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_every_runbook_url_points_at_a_readme_heading() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    anchors = {github_anchor(h) for h in re.findall(r"^#{2,4} (.+)$", readme, flags=re.M)}
    rules = yaml.safe_load(
        (REPO / "charts/captchatask/files/prometheus-rules.yaml").read_text(encoding="utf-8")
    )
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    assert alerts
    for alert in alerts:
        url = alert["annotations"]["runbook_url"]
        assert url.startswith("https://github.com/captchatask/captchatask/blob/main/README.md#")
        assert url.split("#", 1)[1] in anchors, f"{alert['alert']}: no heading for {url}"


def test_the_readme_gives_the_two_quickstart_commands() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    quickstart = readme[readme.index("## Quickstart") :]
    assert "make demo" in quickstart.split("\n## ", 1)[0]
    assert "make test" in quickstart.split("\n## ", 1)[0]
