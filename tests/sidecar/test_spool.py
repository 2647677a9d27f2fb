"""The spool on a real directory: durable appends, replay, torn tails, group commit, compaction."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.sidecar import records

from captchatask.decision import Result
from captchatask.model import DeliveredBy, TaskRef
from captchatask_sidecar.spool import READ_AHEAD, Disk, Spool, SpoolWriteError
from captchatask_sidecar.spoolformat import HEADER, SpoolRecord, frame, scan

#: A hang guard, never a speed assertion: appends after which a record still unwritten is a bug.
HANG_GUARD_APPENDS = 100_000


def record(index: int) -> SpoolRecord:
    """A numbered record whose token is not ASCII (the encoding must keep it)."""
    return records.numbered(index, token=f"token-{index}-ü")


async def test_appended_records_survive_a_reopen_in_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.open()
    for index in range(3):
        await spool.append(record(index))
    await spool.close()

    reopened = Spool(tmp_path)
    assert reopened.open() == 3
    assert reopened.records() == [record(i) for i in range(3)]
    await reopened.close()


async def test_concurrent_appends_share_fsyncs(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.open()
    writes = 0
    original = spool._write

    def counting_write(data: bytes, segment: object) -> None:
        nonlocal writes
        writes += 1
        original(data, segment)  # type: ignore[arg-type]

    spool._write = counting_write  # type: ignore[method-assign]
    await asyncio.gather(*(spool.append(record(i)) for i in range(200)))
    assert spool.depth == 200
    assert writes < 200  # group commit: batches, not one fsync per record
    await spool.close()


class CountingDisk(Disk):
    """The real disk calls, counting the durable segment writes (each one a group commit)."""

    def __init__(self) -> None:
        self.syncs = 0

    def append(self, fd: int, data: bytes) -> None:
        super().append(fd, data)
        self.syncs += 1


async def test_appends_arriving_over_consecutive_loop_turns_share_one_segment_sync(
    tmp_path: Path,
) -> None:
    # Under load the handlers of a burst of pingbacks run over several turns of the event loop.
    # A batch written as soon as the first of them has appended costs an fdatasync and a thread
    # hop per handful of records; the flusher lets the loop catch up first.
    disk = CountingDisk()
    spool = Spool(tmp_path, disk=disk)
    spool.open()
    before = disk.syncs
    futures = []
    for index in range(20):
        futures.append(spool.append(record(index)))
        await asyncio.sleep(0)  # the next pingback's handler runs in the next turn
    await asyncio.gather(*futures)
    assert disk.syncs - before == 1
    assert [r.result.provider_task_id for r in spool.records()] == [str(i) for i in range(20)]
    await spool.close()


async def test_a_steady_stream_of_appends_does_not_hold_the_first_one_back(
    tmp_path: Path,
) -> None:
    # The loop never catches up when a record arrives on every turn: the batch is written
    # anyway once it is big enough, so nobody waits for the stream to pause.
    spool = Spool(tmp_path)
    spool.open()
    first = spool.append(record(0))
    appended = 1
    while not first.done():
        assert appended < HANG_GUARD_APPENDS, "the first record was never written"
        spool.append(record(appended))
        appended += 1
        await asyncio.sleep(0)
    await spool.settle()
    assert spool.depth == appended
    await spool.close()


async def test_a_torn_tail_is_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path)
    spool.open()
    await spool.append(record(1))
    await spool.append(record(2))
    await spool.close()
    (segment,) = spool.segment_files()
    whole = frame(record(3).encode())
    with segment.open("ab") as handle:
        handle.write(whole[: len(whole) // 2])  # a crash in the middle of a write

    reopened = Spool(tmp_path)
    with caplog.at_level(logging.WARNING, logger="captchatask_sidecar.spool"):
        assert reopened.open() == 2
    assert "discarded a torn tail" in caplog.text
    assert reopened.records() == [record(1), record(2)]
    await reopened.close()


def test_the_reader_resynchronises_after_a_corrupt_record() -> None:
    first, second, third = (frame(record(i).encode()) for i in range(3))
    corrupt = bytearray(second)
    corrupt[HEADER.size + 5] ^= 0xFF  # checksum no longer matches
    report = scan(first + bytes(corrupt) + third)
    assert report.records == [record(0), record(2)]
    assert report.skipped_bytes == len(second)


async def test_resolving_everything_compacts_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.open()
    entries = [spool.entry(await spool.append(record(i))) for i in range(5)]
    (first_segment,) = spool.segment_files()
    for entry in entries:
        spool.resolve(entry)
    assert spool.depth == 0
    await spool.settle()  # rotation and deletion are the cleaner thread's
    assert first_segment not in spool.segment_files()  # rotated and deleted
    assert all(path.stat().st_size == 0 for path in spool.segment_files())
    await spool.close()
    assert spool.segment_files() == []


async def test_replayed_segments_are_deleted_once_resolved(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.open()
    await spool.append(record(1))
    await spool.close()
    reopened = Spool(tmp_path)
    reopened.open()
    old = [p for p in reopened.segment_files() if p.stat().st_size]
    for entry in await reopened.due(time.monotonic(), limit=10):
        reopened.resolve(entry)
    await reopened.settle()
    assert not any(path.exists() for path in old)
    await reopened.close()


async def test_a_failed_write_raises_and_marks_the_spool_unwritable(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.open()
    await spool.append(record(1))
    assert spool._current is not None
    os.close(spool._current.fd)  # the volume goes away under the open segment
    with pytest.raises(SpoolWriteError):
        await spool.append(record(2))
    assert not spool.writable
    assert spool.depth == 1  # the failed record is not claimed
    spool._current.fd = -1
    await spool.close()


async def test_oldest_age_follows_the_oldest_pending_record(tmp_path: Path) -> None:
    now = [1_700_000_010.0]
    spool = Spool(tmp_path, clock=lambda: now[0])
    spool.open()
    assert spool.oldest_age() == 0.0
    first = spool.entry(await spool.append(record(1)))  # received at ...001
    await spool.append(record(5))
    assert spool.oldest_age() == pytest.approx(9.0)
    spool.resolve(first)
    assert spool.oldest_age() == pytest.approx(5.0)
    await spool.close()


def test_version_1_json_records_written_by_an_older_sidecar_are_still_read() -> None:
    # Byte for byte what the version 1 encoder (compact JSON, short keys) wrote.
    v1 = (
        '{"v":1,"ns":"ns","n":"task-7","u":"00000000-0000-4000-8000-000000000007","k":"solved",'
        '"d":"pingback","p":"7","at":1700000007.0,"by":"pod-a","s":"get","t":"token-7-ü"}'
    ).encode()
    failed = (
        b'{"v":1,"ns":"ns","n":"task-8","u":"00000000-0000-4000-8000-000000000008","k":"failed",'
        b'"d":"pingback","p":"8","at":1700000008.5,"by":"pod-a","s":"json",'
        b'"c":"ERROR_CAPTCHA_UNSOLVABLE","m":"unsolvable"}'
    )
    report = scan(frame(v1) + frame(failed) + frame(record(9).encode()))
    assert report.skipped_bytes == 0
    assert report.records[0] == record(7)
    assert report.records[1] == SpoolRecord(
        ref=TaskRef("ns", "task-8", "00000000-0000-4000-8000-000000000008"),
        result=Result.failed(
            code="ERROR_CAPTCHA_UNSOLVABLE",
            message="unsolvable",
            delivered_by=DeliveredBy.PINGBACK,
            provider_task_id="8",
        ),
        received_at=1_700_000_008.5,
        received_by="pod-a",
        source="json",
    )
    assert report.records[2] == record(9)


@pytest.mark.parametrize(
    "result",
    [
        Result.solved(token="t", delivered_by=DeliveredBy.PINGBACK, provider_task_id=None),
        Result.solved(
            token="ü" * 70_000,
            delivered_by=DeliveredBy.POLL,
            provider_task_id="12",
            user_agent="Mozilla/5.0",
        ),
        Result.failed(
            code="ERROR_X", message="", delivered_by=DeliveredBy.DEAD_LETTER, provider_task_id="1"
        ),
    ],
)
def test_every_field_round_trips_through_the_binary_layout(result: Result) -> None:
    original = SpoolRecord(
        ref=TaskRef("ns", "a.b-c", "00000000-0000-4000-8000-000000000001"),
        result=result,
        received_at=1_700_000_000.123456,
        received_by="pod-ü",
        source="spool",
    )
    assert SpoolRecord.decode(original.encode()) == original


@pytest.mark.parametrize(
    "damage",
    [
        lambda payload: payload[:-1],  # a field runs past the end
        lambda payload: payload + b"x",  # trailing bytes
        lambda payload: b"\x07" + payload[1:],  # unknown version
        lambda payload: payload[:5],  # shorter than the fixed head
    ],
)
def test_a_damaged_payload_with_a_valid_checksum_is_skipped(
    damage: Callable[[bytes], bytes],
) -> None:
    # A checksum only proves the bytes are the ones written; the decoder must still refuse
    # anything that is not a whole record (a bug or a foreign writer), not misread it.
    report = scan(frame(damage(record(1).encode())) + frame(record(2).encode()))
    assert report.records == [record(2)]
    assert report.skipped_at == [0]


async def test_the_drainer_view_tracks_in_flight_and_backed_off_entries(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.open()
    for index in range(3):
        await spool.append(record(index))
    now = time.monotonic()
    first, second = await spool.due(now, limit=2)
    assert [first.record, second.record] == [record(0), record(1)]
    first.in_flight = True
    second.next_attempt = now + 30
    (third,) = await spool.due(now, limit=5)  # the same objects come back, with their bookkeeping
    assert third.record == record(2)
    third.in_flight = True
    assert spool.next_due(now) == now + 30
    assert await spool.due(now + 31, limit=5) == [second]
    spool.resolve(first)
    spool.resolve(first)  # idempotent
    assert spool.depth == 2
    assert spool.records() == [record(1), record(2)]
    await spool.close()


def test_pending_results_are_kept_out_of_the_garbage_collector(tmp_path: Path) -> None:
    # A full collection must not walk the backlog: each pending result is one untracked tuple.
    spool = Spool(tmp_path)
    spool.open()
    segment = spool._current
    assert segment is not None
    for index in range(100):
        spool._add_pending(90, 1.0, segment, index * 100)
    gc.collect()
    assert not any(gc.is_tracked(value) for value in spool._pending.values())


class ReadBackCountingDisk(Disk):
    """Counts the read-backs the drainer's view costs (each one a hop to the reader thread)."""

    def __init__(self) -> None:
        self.read_backs: list[int] = []

    def read_back(self, wanted: list[tuple[int, Path, int, int]]) -> list[bytes | ValueError]:
        self.read_backs.append(len(wanted))
        return super().read_back(wanted)


async def test_the_drainer_reads_the_backlog_back_in_batches_not_one_result_at_a_time(
    tmp_path: Path,
) -> None:
    # The drainer is a closed loop: each replay that ends asks for one more. A read-back per
    # replay cost a thread hop each, on the event loop's CPU, at the API server's pace.
    disk = ReadBackCountingDisk()
    spool = Spool(tmp_path, disk=disk)
    spool.open()
    for index in range(100):
        await spool.append(record(index))
    now = time.monotonic()
    replayed = []
    for _ in range(100):
        (entry,) = await spool.due(now, limit=1)
        replayed.append(entry.record)
        spool.resolve(entry)
    assert replayed == [record(index) for index in range(100)]  # still oldest first, each once
    assert len(disk.read_backs) <= 100 // READ_AHEAD + 1
    assert max(disk.read_backs) <= READ_AHEAD
    assert await spool.due(now, limit=1) == []
    await spool.close()
