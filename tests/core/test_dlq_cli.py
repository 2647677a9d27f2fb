"""``captchatask dlq`` against the real API server, and its rate limiter with a fake clock."""

import datetime as dt
import io
import itertools
import json

import pytest

from captchatask import dlq, model, testbed
from captchatask.deadletters import LetterView

LETTER = """apiVersion: captchatask.dev/v1alpha1
kind: CaptchaDeadLetter
metadata:
  name: {name}
  labels: {{team: {team}}}
spec:
  reason: TaskNotFound
  message: task not found
  taskRef: {{name: {task}, uid: 00000000-0000-4000-8000-00000000000{i}}}
  providerTaskId: "90000000{i}"
  payload: {{code: 03AF-answer-token-{i}-abcdefghijklmnop, source: get}}
  receivedAt: "2026-11-28T00:00:0{i}Z"
"""


def make_letters(kubectl: testbed.Kubectl, namespace: str) -> None:
    docs = [
        LETTER.format(name=f"letter-{i}", team="a" if i < 3 else "b", task=f"t{i}", i=i)
        for i in range(5)
    ]
    kubectl("apply", "-n", namespace, "-f", "-", input="---\n".join(docs))
    # One letter already expired, as the operator would leave it.
    kubectl(
        "patch",
        "cdl",
        "letter-4",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status": {"phase": "Expired", "attempts": 12, "message": "gave up"}}',
    )


def run(kube_env: dict[str, str], *argv: str, answer: bool = False) -> tuple[int, str]:
    out = io.StringIO()
    code = dlq.run_for_test(["--kubeconfig", kube_env["KUBECONFIG"], *argv], out=out, answer=answer)
    return code, out.getvalue()


def test_list_shows_reason_attempts_and_age(
    kubectl: testbed.Kubectl, kube_env: dict[str, str], namespace: str
) -> None:
    make_letters(kubectl, namespace)
    code, out = run(kube_env, "-n", namespace, "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "NAME",
        "PHASE",
        "REASON",
        "TASK",
        "PROVIDER-TASK",
        "ATTEMPTS",
        "AGE",
        "MESSAGE",
    ]
    assert [line.split()[0] for line in lines[1:]] == [f"letter-{i}" for i in range(5)]
    assert lines[5].split()[1] == "Expired"
    assert lines[5].split()[5] == "12"
    code, out = run(kube_env, "-n", namespace, "list", "--phase", "Expired", "-o", "json")
    listed = json.loads(out)
    # kubectl's shape: a List whose items carry their apiVersion and kind.
    assert (listed["apiVersion"], listed["kind"]) == ("v1", "List")
    assert [item["metadata"]["name"] for item in listed["items"]] == ["letter-4"]
    assert listed["items"][0]["kind"] == "CaptchaDeadLetter"


def test_show_previews_the_payload_and_yaml_shows_it_whole(
    kubectl: testbed.Kubectl, kube_env: dict[str, str], namespace: str
) -> None:
    make_letters(kubectl, namespace)
    code, out = run(kube_env, "-n", namespace, "show", "letter-1")
    assert code == 0
    assert "Reason:         TaskNotFound: task not found" in out
    assert "03AF-answer-toke..." in out
    assert "abcdefghijklmnop" not in out
    code, out = run(kube_env, "-n", namespace, "show", "letter-1", "-o", "yaml")
    assert "03AF-answer-token-1-abcdefghijklmnop" in out


def test_redrive_by_selector_resets_only_the_selected_letters(
    kubectl: testbed.Kubectl, kube_env: dict[str, str], namespace: str
) -> None:
    make_letters(kubectl, namespace)
    code, out = run(kube_env, "-n", namespace, "redrive", "-l", "team=b", "--rate", "20")
    assert code == 0, out
    assert "2 dead letter(s) redriven" in out
    items = json.loads(kubectl("get", "cdl", "-n", namespace, "-o", "json").stdout)["items"]
    by_name = {item["metadata"]["name"]: item for item in items}
    for name in ("letter-3", "letter-4"):
        status = by_name[name]["status"]
        assert status["phase"] == "Pending"
        assert status["attempts"] == 0
        # The provider task id is kept: the requeue loop matches on it.
        assert by_name[name]["spec"]["providerTaskId"] == f"90000000{name[-1]}"
    assert "status" not in by_name["letter-0"]


def test_redrive_all_expired_paces_writes_at_the_given_rate(
    kubectl: testbed.Kubectl, kube_env: dict[str, str], namespace: str
) -> None:
    make_letters(kubectl, namespace)
    for i in range(3):
        kubectl(
            "patch",
            "cdl",
            f"letter-{i}",
            "-n",
            namespace,
            "--subresource=status",
            "--type=merge",
            "-p",
            '{"status": {"phase": "Expired"}}',
        )
    code, _ = run(kube_env, "-n", namespace, "redrive", "--all-expired", "--rate", "4")
    assert code == 0
    items = json.loads(kubectl("get", "cdl", "-n", namespace, "-o", "json").stdout)["items"]
    parsed = [model.parse_time(item.get("status", {}).get("redrivenAt")) for item in items]
    stamps = sorted(stamp for stamp in parsed if stamp is not None)
    assert len(stamps) == 4
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(stamps)]
    # 4 per second: consecutive redrives are at least a quarter second apart.
    assert all(gap >= 0.24 for gap in gaps), gaps


def test_purge_asks_and_deletes_only_when_confirmed(
    kubectl: testbed.Kubectl, kube_env: dict[str, str], namespace: str
) -> None:
    make_letters(kubectl, namespace)
    code, out = run(kube_env, "-n", namespace, "purge", "--all-expired", answer=False)
    assert code == 1
    assert "nothing deleted" in out
    assert "letter-4" in kubectl("get", "cdl", "-n", namespace, "-o", "name").stdout
    code, out = run(kube_env, "-n", namespace, "purge", "--all-expired", answer=True)
    assert code == 0
    remaining = kubectl("get", "cdl", "-n", namespace, "-o", "name").stdout.split()
    assert len(remaining) == 4
    assert all("letter-4" not in name for name in remaining)


async def test_rate_limited_sleeps_one_interval_between_actions() -> None:
    slept: list[float] = []
    done: list[str] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    async def action(item: str) -> None:
        done.append(item)

    await dlq.rate_limited(["a", "b", "c"], action, rate=2.0, sleep=fake_sleep)
    assert done == ["a", "b", "c"]
    assert slept == [0.5, 0.5]


def test_render_table_is_aligned_and_names_the_namespace_when_listing_all() -> None:
    now = dt.datetime(2026, 11, 28, 1, 0, tzinfo=dt.UTC)
    letter = LetterView.from_body(
        {
            "metadata": {"name": "x", "namespace": "shop"},
            "spec": {"reason": "TaskRecreated", "receivedAt": "2026-11-28T00:00:00Z"},
        }
    )
    header, row = dlq.render_table([letter], now, all_namespaces=True).splitlines()
    assert header.startswith("NAMESPACE")
    assert row.split() == ["shop", "x", "Pending", "TaskRecreated", "-", "-", "0", "1h"]
    assert header.index("AGE") == row.index("1h")


@pytest.mark.parametrize("argv", [["redrive"], ["purge", "-y"]])
def test_change_verbs_need_a_target(kube_env: dict[str, str], argv: list[str]) -> None:
    code, out = run(kube_env, *argv)
    assert code == 2
    assert "--all-expired" in out
