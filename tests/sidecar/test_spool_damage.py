"""Damaged spool records: counted, their bytes kept in the quarantine, a torn tail left alone.

A record the spool acknowledged and that later fails its checksum (or does not decode) is a
result the disk no longer holds: these tests flip bytes in real segment files and check that
the damage is counted in the sidecar's registry, that a copy of the damaged frame is kept beside
the spool, and that every other record still replays. A torn tail (the end of the newest
segment, cut by a crash before its write returned, so never acknowledged) is not damage.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
from prometheus_client import CollectorRegistry
from tests.sidecar import records

from captchatask.decision import Result
from captchatask.model import DeliveredBy, Phase, TaskRef
from captchatask_sidecar.metrics import Metrics
from captchatask_sidecar.quarantine import QUARANTINE_DIR
from captchatask_sidecar.spool import Spool
from captchatask_sidecar.spoolformat import SpoolRecord, frame

if TYPE_CHECKING:
    from tests.sidecar.conftest import Cluster, SidecarFactory

DAMAGED = "captchatask_spool_damaged_records_total"
DAMAGED_BYTES = "captchatask_spool_damaged_bytes_total"
NOT_KEPT = "captchatask_spool_quarantine_full_total"


record = records.numbered


def framed(index: int) -> bytes:
    return frame(record(index).encode())


def flip(path: Path, position: int) -> None:
    """Invert one byte of a file in place, as a disk returning other bytes would."""
    with path.open("r+b") as file:
        file.seek(position)
        byte = file.read(1)
        file.seek(position)
        file.write(bytes([byte[0] ^ 0xFF]))


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def three_records(directory: Path) -> Path:
    """Spool records 0, 1 and 2 (acknowledged, durable), close the spool, return its segment."""
    spool = Spool(directory)
    spool.open()
    for index in range(3):
        await spool.append(record(index))
    await spool.close()
    (segment,) = spool.segment_files()
    return segment


def quarantined(directory: Path) -> list[bytes]:
    return [path.read_bytes() for path in sorted((directory / QUARANTINE_DIR).glob("*"))]


async def test_a_damaged_acknowledged_record_is_counted_kept_and_the_others_replay(
    tmp_path: Path,
) -> None:
    segment = await three_records(tmp_path)
    original = segment.read_bytes()
    flip(segment, len(framed(0)) + 20)  # inside the second record's payload
    damaged_frame = segment.read_bytes()[len(framed(0)) : len(framed(0)) + len(framed(1))]
    assert damaged_frame != original[len(framed(0)) : len(framed(0)) + len(framed(1))]

    registry = CollectorRegistry()
    reopened = Spool(tmp_path, on_damage=Metrics(registry).spool_damaged)
    assert reopened.open() == 2
    assert reopened.records() == [record(0), record(2)]
    assert sample(registry, DAMAGED, stage="recovery") == 1
    assert sample(registry, DAMAGED_BYTES, stage="recovery") == len(damaged_frame)
    assert sample(registry, DAMAGED, stage="readback") == 0
    assert quarantined(tmp_path) == [damaged_frame]
    await reopened.close()

    # The quarantine is not a segment: the next start replays the same two, keeps one copy.
    again = Spool(tmp_path, on_damage=Metrics(CollectorRegistry()).spool_damaged)
    assert again.open() == 2
    assert quarantined(tmp_path) == [damaged_frame]
    await again.close()


async def test_damage_to_the_last_record_of_an_older_segment_is_counted(tmp_path: Path) -> None:
    # Only the newest segment can end in a write cut by a crash: every older one was complete
    # when the sidecar moved on, so an invalid frame at its end is damage, not a torn tail.
    older = framed(0) + framed(1)
    (tmp_path / "spool-000000000001.log").write_bytes(older)
    (tmp_path / "spool-000000000002.log").write_bytes(framed(2))
    flip(tmp_path / "spool-000000000001.log", len(older) - 3)

    registry = CollectorRegistry()
    spool = Spool(tmp_path, on_damage=Metrics(registry).spool_damaged)
    assert spool.open() == 2
    assert spool.records() == [record(0), record(2)]
    assert sample(registry, DAMAGED, stage="recovery") == 1
    assert len(quarantined(tmp_path)) == 1
    await spool.close()


async def test_a_frame_with_a_valid_checksum_that_does_not_decode_is_damage(
    tmp_path: Path,
) -> None:
    # A foreign writer's frame: magic, length and CRC-32 hold, the payload is no record.
    foreign = frame(b"\x02" + b"not a spool record")
    (tmp_path / "spool-000000000001.log").write_bytes(framed(0) + foreign + framed(1))

    registry = CollectorRegistry()
    spool = Spool(tmp_path, on_damage=Metrics(registry).spool_damaged)
    assert spool.open() == 2
    assert spool.records() == [record(0), record(1)]
    assert sample(registry, DAMAGED, stage="recovery") == 1
    assert quarantined(tmp_path) == [foreign]
    await spool.close()


async def test_a_torn_tail_is_not_damage_not_even_after_the_next_restart(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.open()
    await spool.append(record(1))
    await spool.close()
    (segment,) = spool.segment_files()
    whole = framed(2)
    with segment.open("ab") as handle:
        handle.write(whole[: len(whole) // 2])  # a crash in the middle of a write

    registry = CollectorRegistry()
    reopened = Spool(tmp_path, on_damage=Metrics(registry).spool_damaged)
    assert reopened.open() == 1
    await reopened.append(record(3))  # into a newer segment: the torn one is now older
    await reopened.close()
    assert sample(registry, DAMAGED, stage="recovery") == 0

    registry = CollectorRegistry()
    again = Spool(tmp_path, on_damage=Metrics(registry).spool_damaged)
    assert again.open() == 2
    assert again.records() == [record(1), record(3)]
    assert sample(registry, DAMAGED, stage="recovery") == 0
    assert quarantined(tmp_path) == []
    await again.close()


async def test_a_record_damaged_after_startup_is_counted_at_read_back_and_kept(
    tmp_path: Path,
) -> None:
    registry = CollectorRegistry()
    spool = Spool(tmp_path, on_damage=Metrics(registry).spool_damaged)
    spool.open()
    for index in range(3):
        await spool.append(record(index))
    (segment,) = spool.segment_files()
    flip(segment, len(framed(0)) + 20)
    damaged_frame = segment.read_bytes()[len(framed(0)) : len(framed(0)) + len(framed(1))]

    entries = await spool.due(0.0, limit=10)
    assert [entry.record for entry in entries] == [record(0), record(2)]
    assert sample(registry, DAMAGED, stage="readback") == 1
    assert sample(registry, DAMAGED_BYTES, stage="readback") == len(damaged_frame)
    assert sample(registry, DAMAGED, stage="recovery") == 0
    assert quarantined(tmp_path) == [damaged_frame]
    await spool.close()


async def test_a_full_quarantine_still_counts_the_damage_and_what_it_could_not_keep(
    tmp_path: Path,
) -> None:
    segment = await three_records(tmp_path)
    flip(segment, 20)
    flip(segment, len(framed(0)) + 20)

    registry = CollectorRegistry()
    # Room for one damaged frame, not two: the first is kept, the second only counted.
    reopened = Spool(
        tmp_path, on_damage=Metrics(registry).spool_damaged, quarantine_bytes=len(framed(0)) + 1
    )
    assert reopened.open() == 1
    assert reopened.records() == [record(2)]
    assert sample(registry, DAMAGED, stage="recovery") == 2
    assert sample(registry, NOT_KEPT) == 1
    assert len(quarantined(tmp_path)) == 1
    await reopened.close()


async def test_the_receiver_exports_the_damage_it_found_at_startup_and_replays_the_rest(
    sidecar: SidecarFactory,
    cluster: Cluster,
    namespace: str,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    first = await cluster.submitted(namespace, "intact-first", "881")
    second = await cluster.submitted(namespace, "intact-second", "882")
    spool_dir = tmp_path / "damaged-spool"
    spool_dir.mkdir()

    def acknowledged(ref: TaskRef, task_id: str) -> bytes:
        return frame(
            SpoolRecord(
                ref=ref,
                result=Result.solved(
                    token=f"tok-{task_id}",
                    delivered_by=DeliveredBy.PINGBACK,
                    provider_task_id=task_id,
                ),
                received_at=1_800_000_000.0,
                received_by="previous-pod",
                source="get",
            ).encode()
        )

    lost = bytearray(acknowledged(TaskRef(namespace, "lost", "uid-lost"), "883"))
    lost[len(lost) // 2] ^= 0xFF  # the disk returns other bytes than were written
    (spool_dir / "spool-000000000001.log").write_bytes(
        acknowledged(first.ref, "881") + bytes(lost) + acknowledged(second.ref, "882")
    )
    process = sidecar(kubeconfig=cluster.kubeconfig, namespace=namespace, spool_dir=spool_dir)

    async def both_solved() -> bool:
        views = [await cluster.task(namespace, name) for name in ("intact-first", "intact-second")]
        return all(view is not None and view.phase is Phase.SOLVED for view in views)

    await cluster.wait_for(both_solved, what="the intact records to be replayed")
    samples = await process.metrics(http)
    assert samples[(DAMAGED, ("recovery",))] == 1
    assert samples[(DAMAGED, ("readback",))] == 0
    assert samples[(DAMAGED_BYTES, ("recovery",))] == len(lost)
    assert quarantined(spool_dir) == [bytes(lost)]
    assert "tok-" not in process.log_text()  # a damaged frame's bytes are kept, never logged
