"""The spool on a real directory: durable appends, replay, torn tails, group commit, compaction."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from captchatask.ledger import Result
from captchatask.model import DeliveredBy, TaskRef
from captchatask_sidecar.spool import HEADER, Spool, SpoolRecord, SpoolWriteError, frame, scan


def record(index: int) -> SpoolRecord:
    return SpoolRecord(
        ref=TaskRef("ns", f"task-{index}", f"00000000-0000-4000-8000-{index:012d}"),
        result=Result.solved(
            token=f"token-{index}-ü", delivered_by=DeliveredBy.PINGBACK, provider_task_id=str(index)
        ),
        received_at=1_700_000_000.0 + index,
        received_by="pod-a",
        source="get",
    )


async def test_appended_records_survive_a_reopen_in_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.open()
    for index in range(3):
        await spool.append(record(index))
    await spool.close()

    reopened = Spool(tmp_path)
    assert reopened.open() == 3
    assert [entry.record for entry in reopened.pending.values()] == [record(i) for i in range(3)]
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
    assert "torn or corrupt" in caplog.text
    assert [e.record for e in reopened.pending.values()] == [record(1), record(2)]
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
    entries = [await spool.append(record(i)) for i in range(5)]
    (first_segment,) = spool.segment_files()
    for entry in entries:
        spool.resolve(entry)
    assert spool.depth == 0
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
    for entry in list(reopened.pending.values()):
        reopened.resolve(entry)
    assert not any(path.exists() for path in old)
    await reopened.close()


async def test_a_failed_write_raises_and_marks_the_spool_unwritable(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.open()
    await spool.append(record(1))
    os.close(spool._fd)  # the volume goes away under the open segment
    with pytest.raises(SpoolWriteError):
        await spool.append(record(2))
    assert not spool.writable
    assert spool.depth == 1  # the failed record is not claimed
    spool._fd = -1
    await spool.close()


async def test_oldest_age_follows_the_oldest_pending_record(tmp_path: Path) -> None:
    now = [1_700_000_010.0]
    spool = Spool(tmp_path, clock=lambda: now[0])
    spool.open()
    assert spool.oldest_age() == 0.0
    first = await spool.append(record(1))  # received at ...001
    await spool.append(record(5))
    assert spool.oldest_age() == pytest.approx(9.0)
    spool.resolve(first)
    assert spool.oldest_age() == pytest.approx(5.0)
    await spool.close()
