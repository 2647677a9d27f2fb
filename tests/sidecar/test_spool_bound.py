"""The spool's bound: refuse (503) and turn unready before the volume fills, never evict.

A result the receiver refuses with ``503`` is one the provider retries or the operator's fallback
poll recovers; a result it acknowledged and then lost with an evicted volume is gone. So the
spool is bounded in bytes and records below its volume's size, readiness turns false before the
bound, and a pingback that would cross it is answered ``503`` with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import errno
import secrets
import threading
import tracemalloc
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import pytest
from tests.sidecar import records

from captchatask.model import TaskRef
from captchatask_sidecar import settings as sidecar_settings
from captchatask_sidecar import spool as spool_module
from captchatask_sidecar.spool import Spool, SpoolFullError
from captchatask_sidecar.spoolformat import SpoolRecord, frame, read_payload

#: Hang guard for a blocked writer thread (never an assertion about speed).
PATIENCE_SECONDS = 60.0

if TYPE_CHECKING:
    from collections.abc import Callable

    from tests.sidecar.conftest import SidecarFactory

    UrlFor = Callable[[str, TaskRef], str]


def record(index: int, *, token_bytes: int = 16) -> SpoolRecord:
    """A numbered record whose size the token sets."""
    return records.numbered(index, token=f"{index:08d}" + "t" * token_bytes)


def framed_size(index: int, **kwargs: int) -> int:
    return len(frame(record(index, **kwargs).encode()))


async def test_an_append_past_the_record_bound_is_refused_and_nothing_is_written(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path, max_records=3)
    spool.open()
    for index in range(3):
        await spool.append(record(index))
    size = sum(path.stat().st_size for path in spool.segment_files())
    with pytest.raises(SpoolFullError) as refused:
        await spool.append(record(3))
    assert refused.value.reason == "records"
    assert spool.writable  # full is not broken: the volume is fine
    assert spool.depth == 3
    assert sum(path.stat().st_size for path in spool.segment_files()) == size
    await spool.close()
    reopened = Spool(tmp_path)
    assert reopened.open() == 3
    await reopened.close()


async def test_an_append_past_the_byte_bound_is_refused(tmp_path: Path) -> None:
    one = framed_size(0)
    spool = Spool(tmp_path, max_bytes=2 * one + one // 2)
    spool.open()
    await spool.append(record(0))
    await spool.append(record(1))
    assert spool.held_bytes == 2 * one
    with pytest.raises(SpoolFullError) as refused:
        await spool.append(record(2))
    assert refused.value.reason == "bytes"
    assert spool.depth == 2
    await spool.close()


async def test_concurrent_appends_cannot_overshoot_the_bound(tmp_path: Path) -> None:
    # Appends waiting for the same group commit are counted when admitted, not when written.
    spool = Spool(tmp_path, max_records=10)
    spool.open()

    async def one(index: int) -> int:
        return await spool.append(record(index))

    outcomes = await asyncio.gather(*(one(i) for i in range(25)), return_exceptions=True)
    refused = [o for o in outcomes if isinstance(o, SpoolFullError)]
    assert len(refused) == 15
    assert spool.depth == 10
    await spool.close()


async def test_a_batch_being_written_still_counts_against_the_bound(tmp_path: Path) -> None:
    # A slow disk: the first record's write blocks in the writer thread. While it is on its way
    # (neither buffered nor pending yet) it must still hold its place under the bound.
    spool = Spool(tmp_path, max_records=1)
    spool.open()
    release = threading.Event()
    entered = threading.Event()
    original = spool._write

    def slow_write(data: bytes, segment: object) -> None:
        entered.set()
        release.wait(PATIENCE_SECONDS)
        original(data, segment)  # type: ignore[arg-type]

    spool._write = slow_write  # type: ignore[method-assign]
    first = spool.append(record(0))
    await asyncio.to_thread(entered.wait, PATIENCE_SECONDS)
    try:
        with pytest.raises(SpoolFullError):
            spool.append(record(1))  # refused at once: the first still holds its place
    finally:
        release.set()
    await first
    assert spool.depth == 1
    await spool.close()


async def test_records_replayed_from_disk_count_against_the_bound(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.open()
    for index in range(4):
        await spool.append(record(index))
    await spool.close()
    reopened = Spool(tmp_path, max_records=4)
    reopened.open()
    assert reopened.fill() == 1.0
    with pytest.raises(SpoolFullError):
        await reopened.append(record(9))
    await reopened.close()


async def test_resolving_records_makes_room_again(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_records=2, max_bytes=10 * framed_size(0))
    spool.open()
    entries = [spool.entry(await spool.append(record(i))) for i in range(2)]
    assert spool.fill() == 1.0
    for entry in entries:
        spool.resolve(entry)
    await spool.settle()  # the cleaner deletes the drained segment and compacts the journal
    assert spool.depth == 0
    assert spool.held_bytes == 0  # the drained segment was deleted
    assert spool.fill() == 0.0
    await spool.append(record(5))
    await spool.close()


async def test_a_long_lived_segment_is_rotated_so_resolved_records_free_their_bytes(
    tmp_path: Path,
) -> None:
    # With one record stuck (refused by the API server, backing off), the records resolved
    # after it must not keep their bytes forever: the segment is rotated as it grows.
    one = framed_size(0)
    spool = Spool(tmp_path, max_bytes=40 * one)
    spool.open()
    stuck = spool.entry(await spool.append(record(0)))
    for index in range(1, 200):
        spool.resolve(spool.entry(await spool.append(record(index))))
        await spool.settle()  # the cleaner's rotation and deletion, before the next append
    assert spool.depth == 1
    assert spool.held_bytes < 20 * one
    assert stuck.record == record(0)
    await spool.close()


async def test_pending_payloads_stay_on_disk_not_in_memory(tmp_path: Path) -> None:
    # A backlog of large tokens must not live in the heap: the drainer reads them back.
    count, token_bytes = 200, 32 * 1024
    spool = Spool(tmp_path)
    spool.open()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for index in range(count):
            await spool.append(record(index, token_bytes=token_bytes))
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert after - before < count * token_bytes // 10
    entries = await spool.due(0.0, limit=3)
    assert [e.record for e in entries] == [record(i, token_bytes=token_bytes) for i in range(3)]
    await spool.close()

    reopened = Spool(tmp_path)
    tracemalloc.start()
    try:
        reopened.open()
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reopened.depth == count
    assert held < count * token_bytes // 10  # replay keeps offsets, not payloads
    assert peak < count * token_bytes // 2  # and streams the segment rather than reading it
    assert reopened.records()[-1] == record(count - 1, token_bytes=token_bytes)
    await reopened.close()


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--spool-max-bytes=100", "CAPTCHATASK_SPOOL_MAX_BYTES"),
        ("--spool-max-records=0", "CAPTCHATASK_SPOOL_MAX_RECORDS"),
        ("--spool-ready-fraction=1.5", "CAPTCHATASK_SPOOL_READY_FRACTION"),
    ],
)
def test_bad_bounds_are_refused_with_the_setting_named(
    tmp_path: Path, flag: str, message: str
) -> None:
    with pytest.raises(sidecar_settings.SettingsError, match=message):
        sidecar_settings.load([f"--pingback-key-file={tmp_path / 'k'}", flag], {})


def test_the_default_bounds_leave_room_below_the_default_volume() -> None:
    loaded = sidecar_settings.load(["--pingback-key-file=k"], {})
    assert 0 < loaded.spool_max_bytes < 256 * 1024 * 1024
    assert loaded.spool_max_records > 0
    assert 0 < loaded.spool_ready_fraction < 1


async def test_a_full_spool_turns_unready_first_then_answers_503_and_keeps_what_it_took(
    sidecar: SidecarFactory,
    unreachable: Path,
    http: aiohttp.ClientSession,
    url_for: UrlFor,
) -> None:
    # The API server is unreachable: every accepted pingback is spooled.
    process = sidecar(
        kubeconfig=unreachable,
        namespace="apps",
        flags={"spool-max-records": "10", "spool-ready-fraction": "0.5"},
    )
    answers: list[tuple[int, bool]] = []  # (pingback status, ready right after)
    retry_after: list[str] = []
    for index in range(14):
        ref = TaskRef("apps", f"bound-{index}", str(uuid.uuid4()))
        async with http.get(
            url_for(process.pingback_url, ref),
            params={"id": str(index), "code": secrets.token_urlsafe(64)},
        ) as response:
            status = response.status
            if status == 503:
                assert (await response.json())["detail"] == "spool full, retry later"
                retry_after.append(response.headers.get("Retry-After", ""))
        async with http.get(process.admin_url + "/readyz") as ready:
            answers.append((status, ready.status == 200))
            if ready.status != 200:
                assert "spool" in (await ready.json())["detail"]
    statuses = [status for status, _ in answers]
    assert statuses == [200] * 10 + [503] * 4
    assert [ready for _, ready in answers[:4]] == [True] * 4
    assert [ready for _, ready in answers[4:]] == [False] * 10  # unready before the bound
    assert all(value.isdigit() and int(value) > 0 for value in retry_after)
    metrics = await process.metrics(http)
    assert metrics[("captchatask_pingback_spool_depth", ())] == 10
    assert metrics[("captchatask_pingback_unavailable_total", ("spool_full",))] == 4
    assert metrics[("captchatask_spool_max_records", ())] == 10
    assert metrics[("captchatask_spool_max_bytes", ())] > 0
    spooled = sum(
        path.stat().st_size
        for path in (
            *process.spool_dir.glob("spool-*.log"),
            *process.spool_dir.glob("spool.resolved"),
        )
    )
    assert metrics[("captchatask_spool_bytes", ())] == spooled
    assert metrics[("captchatask_spool_write_errors_total", ())] == 0  # full is not broken


async def test_the_drainer_reads_payloads_back_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A slow disk must delay the replays that wait for it, never the loop every pingback is on.
    spool = Spool(tmp_path)
    spool.open()
    for index in range(3):
        await spool.append(record(index))
    readers: list[str] = []

    def recording(fd: int, offset: int, length: int) -> bytes:
        readers.append(threading.current_thread().name)
        return read_payload(fd, offset, length)

    monkeypatch.setattr(spool_module, "read_payload", recording)
    entries = await spool.due(0.0, limit=10)
    assert [entry.record for entry in entries] == [record(i) for i in range(3)]
    assert len(readers) == 3
    assert threading.main_thread().name not in readers
    await spool.close()


async def test_a_record_damaged_on_disk_is_dropped_not_retried_forever(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.open()
    for index in range(3):
        await spool.append(record(index))
    (segment,) = spool.segment_files()
    # Flip a byte inside the second record's payload (behind the first frame and its header).
    position = framed_size(0) + 20
    with segment.open("r+b") as file:
        file.seek(position)
        byte = file.read(1)
        file.seek(position)
        file.write(bytes([byte[0] ^ 0xFF]))
    entries = await spool.due(0.0, limit=10)
    assert [entry.record for entry in entries] == [record(0), record(2)]
    assert spool.depth == 2
    await spool.close()
    reopened = Spool(tmp_path)
    assert reopened.open() == 2  # neither replayed nor lost track of the others
    await reopened.close()


async def test_a_read_error_keeps_the_record_for_a_later_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An I/O error (EIO, too many open files) says nothing about the record: dropping it would
    # lose an acknowledged result. The pass fails (the supervised drainer retries it later).
    spool = Spool(tmp_path)
    spool.open()
    await spool.append(record(0))

    def failing(fd: int, offset: int, length: int) -> bytes:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(spool_module, "read_payload", failing)
    with pytest.raises(OSError, match="Input/output"):
        await spool.due(0.0, limit=10)
    assert spool.depth == 1
    monkeypatch.undo()
    assert [entry.record for entry in await spool.due(0.0, limit=10)] == [record(0)]
    await spool.close()
