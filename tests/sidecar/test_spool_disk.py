"""The spool against a slow, a recording and a crashing disk.

A :class:`~captchatask_sidecar.spool.Disk` subclass stands in for the volume's blocking calls
(the real calls still run: the files are real): one blocks a call until the test lets it go,
one records the order of syncs against the acknowledgements, one takes a snapshot of the
directory at the instant of a call, which is exactly what a SIGKILL at that instant leaves.

* A slow disk must not stall the event loop: pingbacks are answered while a segment deletion or
  a segment creation hangs.
* The ``200`` of a spooled pingback comes only after the ``fdatasync`` of the segment holding
  its record and the directory sync that made the segment itself durable.
* A resolved record is never replayed after a restart or a crash, even when its segment file
  comes back (an unlink that a power cut undid).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import shutil
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry
from tests.sidecar import records

from captchatask import kube, signing, testbed
from captchatask.ledger import Ledger
from captchatask.model import TaskRef
from captchatask.provider.codes import Dialect
from captchatask_sidecar.metrics import Metrics
from captchatask_sidecar.pingback import OUTCOME_HEADER, PingbackReceiver, create_pingback_app
from captchatask_sidecar.recorder import Recorder
from captchatask_sidecar.spool import JOURNAL_NAME, Disk, Spool
from captchatask_sidecar.spoolformat import SpoolRecord, read_journal, scan

NAMESPACE = "apps"
#: A hang guard, never a speed assertion: how long a blocked disk call waits to be released.
HANG_GUARD_SECONDS = 5.0

AiohttpClient = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]


def ref(index: int) -> TaskRef:
    return records.numbered_ref(index, NAMESPACE)


def record(index: int) -> SpoolRecord:
    return records.numbered(index, namespace=NAMESPACE)


class BlockingDisk(Disk):
    """Blocks one kind of call (once armed) until the test releases it."""

    def __init__(self, call: str) -> None:
        self.call = call
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()
        self.finished = threading.Event()
        self.on_loop_thread = False

    def _maybe_block(self, call: str) -> None:
        if not self.armed or call != self.call or self.entered.is_set():
            return
        self.entered.set()
        try:
            asyncio.get_running_loop()
            self.on_loop_thread = True
        except RuntimeError:
            pass
        self.release.wait(HANG_GUARD_SECONDS)

    def unlink(self, path: Path) -> None:
        self._maybe_block("unlink")
        super().unlink(path)
        if self.entered.is_set():
            self.finished.set()

    def sync_directory(self, directory: Path) -> None:
        self._maybe_block("sync_directory")
        super().sync_directory(directory)
        if self.entered.is_set():
            self.finished.set()


@dataclass
class RecordingDisk(Disk):
    """Logs every segment sync (a durable append), with the provider task ids the segment then
    holds, and every directory sync.

    Unlinks wait for :attr:`allow_unlinks`, so the directory syncs that follow a deletion cannot
    stand in for the one a new segment needs.
    """

    events: list[tuple[str, object]] = field(default_factory=list)
    allow_unlinks: threading.Event = field(default_factory=threading.Event)
    unlink_waiting: threading.Event = field(default_factory=threading.Event)
    _paths: dict[int, Path] = field(default_factory=dict)

    def create_segment(self, path: Path) -> int:
        fd = super().create_segment(path)
        self._paths[fd] = path
        self.events.append(("created", path.name))
        return fd

    def append(self, fd: int, data: bytes) -> None:
        # The default disk's append is durable when it returns (O_DSYNC): that is the sync.
        super().append(fd, data)
        path = self._paths[fd]
        ids = frozenset(r.result.provider_task_id for r in scan(path.read_bytes()).records)
        self.events.append(("data-synced", (path.name, ids)))

    def sync_directory(self, directory: Path) -> None:
        names = frozenset(p.name for p in directory.iterdir())
        super().sync_directory(directory)
        self.events.append(("dir-synced", names))

    def unlink(self, path: Path) -> None:
        self.unlink_waiting.set()
        self.allow_unlinks.wait(HANG_GUARD_SECONDS)
        super().unlink(path)


@dataclass
class Receiver:
    client: TestClient[web.Request, web.Application]
    spool: Spool
    signer: signing.PingbackSigner

    async def send(self, index: int) -> str:
        """One GET pingback; returns its outcome header (asserting a 200)."""
        async with self.client.get(
            self.signer.path(ref(index)), params={"id": str(index), "code": f"tok-{index}"}
        ) as response:
            assert response.status == 200, await response.text()
            return response.headers[OUTCOME_HEADER]


ReceiverFactory = Callable[[Disk], Awaitable[Receiver]]


@pytest.fixture
async def receiver(
    tmp_path: Path, aiohttp_client: AiohttpClient, signer: signing.PingbackSigner
) -> AsyncIterator[ReceiverFactory]:
    """An in-process pingback app whose API server is away (circuit open: every result spools)."""
    (closed_port,) = testbed.free_ports(1)
    config = kube.KubeConfig(server=f"https://127.0.0.1:{closed_port}", verify=False)
    spools: list[Spool] = []
    async with aiohttp.ClientSession(connector=kube.connector(config)) as session:

        async def make(disk: Disk) -> Receiver:
            metrics = Metrics(CollectorRegistry())
            metrics.serve([NAMESPACE])
            spool = Spool(tmp_path / "spool", disk=disk)
            spool.open()
            spools.append(spool)
            recorder = Recorder(
                ledger=Ledger(kube.KubeClient(config, session), timeout=0.5),
                spool=spool,
                metrics=metrics,
                budget=0.5,
                received_by="test",
            )
            recorder.api_available = False  # the API server is known to be away
            app = create_pingback_app(
                PingbackReceiver(
                    namespaces=frozenset({NAMESPACE}),
                    signer=signer,
                    recorder=recorder,
                    metrics=metrics,
                    dialect=Dialect.CAPTCHAAI,
                    max_body_bytes=4096,
                    read_timeout=0.5,
                )
            )
            return Receiver(client=await aiohttp_client(app), spool=spool, signer=signer)

        yield make
        for spool in spools:
            await spool.close()


# -- a slow disk ----------------------------------------------------------------------------------


@pytest.mark.parametrize("call", ["unlink", "sync_directory"])
async def test_a_pingback_is_answered_while_segment_maintenance_hangs_on_the_disk(
    receiver: ReceiverFactory, call: str
) -> None:
    # Resolving the only record of the current segment rotates it: a new segment is created
    # (and its directory entry synced) and the drained one deleted. Either call may take as long
    # as the disk wants; neither may hold up the event loop and the pingbacks on it.
    disk = BlockingDisk(call)
    pingbacks = await receiver(disk)
    assert await pingbacks.send(1) == "spooled"
    disk.armed = True
    (entry,) = await pingbacks.spool.due(time.monotonic(), limit=10)
    pingbacks.spool.resolve(entry)  # as the drainer does once the result is in the ledger
    assert await asyncio.to_thread(disk.entered.wait, HANG_GUARD_SECONDS)

    assert await pingbacks.send(2) == "spooled"
    stalled = disk.finished.is_set()  # the disk call had to end before the loop could answer
    disk.release.set()
    assert not stalled
    assert not disk.on_loop_thread


# -- sync before acknowledgement ------------------------------------------------------------------


async def test_a_spooled_pingback_is_answered_only_after_its_data_and_directory_syncs(
    receiver: ReceiverFactory,
) -> None:
    disk = RecordingDisk()
    pingbacks = await receiver(disk)

    async def send(index: int) -> None:
        assert await pingbacks.send(index) == "spooled"
        disk.events.append(("acked", str(index)))

    await asyncio.gather(*(send(i) for i in range(1, 41)))
    # Resolve everything: the segment rotates (the next acknowledgements go to a new file) and
    # the drained one is deleted once the test allows it.
    for entry in await pingbacks.spool.due(time.monotonic(), limit=100):
        pingbacks.spool.resolve(entry)
    assert await asyncio.to_thread(disk.unlink_waiting.wait, HANG_GUARD_SECONDS)
    await asyncio.gather(*(send(i) for i in range(41, 61)))
    disk.allow_unlinks.set()

    events = disk.events
    for index in range(1, 61):
        acked = events.index(("acked", str(index)))
        assert index <= 40 or ("created", "spool-000000000002.log") in events[:acked]
        synced = [
            value[0]  # type: ignore[index]
            for kind, value in events[:acked]
            if kind == "data-synced" and str(index) in value[1]  # type: ignore[index]
        ]
        assert synced, f"pingback {index} was acknowledged before any fdatasync held it"
        segment = synced[0]
        created = events.index(("created", segment))
        assert any(
            kind == "dir-synced" and segment in value  # type: ignore[operator]
            for kind, value in events[created:acked]
        ), f"pingback {index} was acknowledged before its segment's directory entry was synced"


def test_the_default_disk_makes_appended_data_durable_with_fdatasync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real = os.fdatasync

    def recording(fd: int) -> None:
        real(fd)
        synced.append(fd)

    monkeypatch.setattr(os, "fdatasync", recording)
    disk = Disk()
    fd = disk.create(tmp_path / "spool-000000000001.log")
    try:
        disk.sync(fd)
    finally:
        os.close(fd)
    assert synced == [fd]


def descriptors_of(path: Path) -> list[int]:
    """This process's open descriptors for ``path``."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone by now
            if Path(os.readlink(f"/proc/self/fd/{name}")) == path.resolve():
                found.append(int(name))
    return found


async def test_a_batch_of_appends_is_written_to_its_segment_durably_in_one_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The segment is opened with O_DSYNC: each write returns only once its data (and the file
    # size that makes it readable) is on the volume, as write + fdatasync did, in one system call
    # and one trip out of the interpreter per group commit instead of two.
    real_write, real_fdatasync = os.write, os.fdatasync
    written: list[int] = []
    synced: list[int] = []

    def recording_write(fd: int, data: bytes | memoryview) -> int:
        written.append(fd)
        return real_write(fd, data)

    def recording_fdatasync(fd: int) -> None:
        synced.append(fd)
        real_fdatasync(fd)

    monkeypatch.setattr(os, "write", recording_write)
    monkeypatch.setattr(os, "fdatasync", recording_fdatasync)
    spool = Spool(tmp_path / "spool")
    spool.open()
    (segment,) = spool.segment_files()
    (fd,) = descriptors_of(segment)  # the spool's, as the kernel sees it
    written.clear()
    await asyncio.gather(*(spool.append(record(index)) for index in range(10)))
    await spool.settle()
    assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DSYNC
    assert written.count(fd) == 1
    assert fd not in synced
    await spool.close()
    reopened = Spool(tmp_path / "spool")
    assert reopened.open() == 10
    await reopened.close()


# -- resolution survives a restart and a crash ----------------------------------------------------


async def test_a_record_resolved_before_a_restart_is_not_replayed(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.open()
    for index in (1, 2, 3):
        await spool.append(record(index))
    first, _second, third = await spool.due(time.monotonic(), limit=10)
    spool.resolve(first)
    spool.resolve(third)  # the segment keeps one unresolved record: it stays on disk
    await spool.close()

    reopened = Spool(tmp_path)
    assert reopened.open() == 1
    assert reopened.records() == [record(2)]
    await reopened.close()


class UnlinkUndoingDisk(Disk):
    """At the directory sync after an unlink, copies the directory with the unlink undone.

    That copy is the worst a power cut just before this sync can leave: the unlinked file is
    still (or again) there, byte for byte.
    """

    def __init__(self, directory: Path, snapshot: Path) -> None:
        self.directory = directory
        self.snapshot = snapshot
        self.unlinked: dict[str, bytes] = {}

    def unlink(self, path: Path) -> None:
        if path.exists():
            self.unlinked[path.name] = path.read_bytes()
        super().unlink(path)

    def sync_directory(self, directory: Path) -> None:
        if self.unlinked and not self.snapshot.exists():
            shutil.copytree(self.directory, self.snapshot)
            for name, data in self.unlinked.items():
                (self.snapshot / name).write_bytes(data)
        super().sync_directory(directory)


async def test_a_segment_whose_deletion_a_power_cut_undid_is_not_replayed(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "spool"
    spool = Spool(directory)
    spool.open()
    await spool.append(record(1))
    await spool.append(record(2))
    await spool.close()

    disk = UnlinkUndoingDisk(directory, tmp_path / "power-cut")
    reopened = Spool(directory, disk=disk)
    assert reopened.open() == 2
    for entry in await reopened.due(time.monotonic(), limit=10):
        reopened.resolve(entry)
    await reopened.close()
    assert disk.snapshot.exists(), "no directory sync followed the deletion of a segment"

    after_crash = Spool(disk.snapshot)
    assert after_crash.open() == 0
    assert after_crash.records() == []
    await after_crash.close()
    assert after_crash.segment_files() == []


class SnapshotDisk(Disk):
    """Copies the spool directory at the first unlink: what a SIGKILL right there leaves."""

    def __init__(self, directory: Path, snapshot: Path) -> None:
        self.directory = directory
        self.snapshot = snapshot
        self.armed = False

    def unlink(self, path: Path) -> None:
        if self.armed and not self.snapshot.exists():
            shutil.copytree(self.directory, self.snapshot)
        super().unlink(path)


async def test_a_crash_between_resolution_and_segment_removal_replays_nothing(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "spool"
    spool = Spool(directory)
    spool.open()
    for index in (1, 2):
        await spool.append(record(index))
    await spool.close()

    disk = SnapshotDisk(directory, tmp_path / "killed")
    reopened = Spool(directory, disk=disk)
    assert reopened.open() == 2
    disk.armed = True
    for entry in await reopened.due(time.monotonic(), limit=10):
        reopened.resolve(entry)  # both results are in the ledger; the segment goes next
    await reopened.close()
    assert disk.snapshot.exists()

    after_kill = Spool(disk.snapshot)
    assert after_kill.open() == 0
    await after_kill.close()


class GoneSyncFailingDisk(Disk):
    """The first sync of a "gone" tombstone fails with EIO, as a failing volume's can."""

    def __init__(self, journal: Path) -> None:
        self.journal = journal
        self.failed = 0

    def sync(self, fd: int) -> None:
        if (
            not self.failed
            and self.journal.exists()
            and read_journal(self.journal.read_bytes()).gone
        ):
            self.failed += 1
            raise OSError(errno.EIO, "Input/output error")
        super().sync(fd)


async def test_a_drained_segment_whose_deletion_failed_is_deleted_later_and_never_replayed(
    tmp_path: Path,
) -> None:
    """A failed deletion is retried by the next maintenance, with the segment's tombstones kept.

    The spool took a drained segment off its books before deleting it, and a deletion that
    failed (its "gone" tombstone could not be made durable) left the file on disk and off the
    books: its bytes counted for good, and the next compaction of the journal dropped its
    tombstones, so the next start replayed every result in it.
    """
    directory = tmp_path / "spool"
    disk = GoneSyncFailingDisk(directory / JOURNAL_NAME)
    spool = Spool(directory, disk=disk)
    spool.open()
    for index in (1, 2):
        await spool.append(record(index))
    first_segment = spool.segment_files()
    for entry in await spool.due(time.monotonic(), limit=10):
        spool.resolve(entry)  # the segment is drained: maintenance rotates and deletes it
    await spool.settle()
    assert disk.failed == 1, "the deletion's tombstone was never synced"

    await spool.append(record(3))
    [entry] = await spool.due(time.monotonic(), limit=10)
    spool.resolve(entry)  # drains the next segment: maintenance runs again, then compacts
    await spool.close()
    assert not set(first_segment) & set(spool.segment_files()), "the segment is still there"

    reopened = Spool(directory)
    assert reopened.open() == 0
    assert reopened.records() == []
    await reopened.close()
