"""The spool: an append-only, fsync'd local log of results the ledger could not take in time.

A pingback is acknowledged only once its result is durable. When the API server is away (or
slower than the ledger budget) "durable" means: appended here and ``fdatasync``'d. The spool
lives on a volume, survives a restart (it is replayed at startup) and is drained into the ledger
by :mod:`.drainer` as soon as the API server answers.

Format. Segment files ``spool-<seq>.log`` of framed, checksummed records; the bytes on disk
(framing, the payload layouts, reading back a torn segment) are :mod:`.spoolformat`'s.

Group commit. Appends from concurrent requests are buffered; one writer job at a time writes the
whole buffer and calls ``fdatasync`` once, in a dedicated single-thread executor (writes stay
ordered, and the event loop never blocks on the disk). Each request waits for the batch holding
its record: at high load a batch holds hundreds of records and costs one thread hop and one
fsync, which is what makes the spool path nearly as fast as an empty handler.

Memory. Everything acknowledged stays in memory until it reaches the ledger, which can be hundreds
of thousands of results while the API server is away. Each is kept as one tuple of its payload
bytes, receive time and segment number: the garbage collector stops tracking such a tuple, so a
full collection does not walk the backlog (with a handful of objects per pending result, full
collections grew to a quarter of a second at 85,000 results and stalled every request).
:class:`Entry` objects, with the drainer's bookkeeping, exist only for the few results being
replayed or backing off.

Compaction. Records are not rewritten or tombstoned: a replayed record that comes back after a
crash is a duplicate the ledger recognises. A segment is deleted once every record in it is
resolved, and the current segment is rotated as soon as the spool is empty.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from captchatask_sidecar.spoolformat import SpoolRecord, frame, scan

logger = logging.getLogger(__name__)

SEGMENT_PREFIX: Final = "spool-"
SEGMENT_SUFFIX: Final = ".log"
PROBE_NAME: Final = ".probe"
#: The readiness probe writes this much (more than a typical record) and fsyncs it, so a full
#: or read-only volume shows as unready before a pingback finds out.
PROBE_BYTES: Final = 8192


class Disk:
    """The spool's blocking file-system calls, in one place so a test can slow or record them.

    Each of these can take as long as the disk wants (an ``fsync`` on a busy volume takes tens of
    milliseconds), which is why the spool calls them only from its writer thread, never on the
    event loop. Tests subclass it to block a call or to record the order of syncs.
    """

    def create(self, path: Path) -> int:
        """Create (or open) a segment file for appending; return its descriptor."""
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

    def sync(self, fd: int) -> None:
        """Make the data appended to ``fd`` durable (what every acknowledgement waits for)."""
        os.fdatasync(fd)

    def sync_directory(self, directory: Path) -> None:
        """Make created or deleted directory entries durable."""
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def unlink(self, path: Path) -> None:
        """Remove a file (already gone is fine)."""
        path.unlink(missing_ok=True)


class SpoolWriteError(Exception):
    """The record could not be made durable; the caller must not acknowledge it."""


@dataclass(slots=True, eq=False)
class Segment:
    """One segment file and how many of its records are not yet resolved."""

    seq: int
    path: Path
    unresolved: int = 0
    size: int = 0


@dataclass(slots=True, eq=False)
class Entry:
    """A durable record in the spool, plus the drainer's bookkeeping for it."""

    id: int
    record: SpoolRecord
    segment: Segment
    attempts: int = 0
    next_attempt: float = 0.0  # monotonic
    in_flight: bool = False


#: What the spool keeps per pending result: payload, receive time, segment number. Only atomic
#: values, so the garbage collector untracks the tuple (see the module docstring).
_Pending = tuple[bytes, float, int]


class Spool:
    """The spool directory: replay at open, group-committed appends, compaction.

    Parameters
    ----------
    directory
        The spool volume (created if missing).
    on_append
        Called (on the loop) after records became durable, e.g. to wake the drainer.
    clock
        Wall clock in seconds (tests inject one).
    disk
        The blocking file-system calls (tests inject one that blocks or records).
    """

    def __init__(
        self,
        directory: Path,
        *,
        on_append: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
        disk: Disk | None = None,
    ) -> None:
        self.directory = directory
        self._disk = disk or Disk()
        self.on_append = on_append
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool-writer")
        self._segments: dict[int, Segment] = {}
        self._current: Segment | None = None
        self._fd = -1
        self._next_id = 0
        self._pending: dict[int, _Pending] = {}
        #: Entries handed to the drainer (in flight or backing off), by id.
        self._entries: dict[int, Entry] = {}
        self._buffer: list[bytes] = []
        self._batch: list[tuple[SpoolRecord, bytes, asyncio.Future[Entry]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self.writable = True
        self.closed = False

    # -- startup ------------------------------------------------------------------------------

    def open(self) -> int:
        """Replay existing segments into the pending results and start a fresh segment.

        Blocking (startup only). Returns the number of records replayed.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        highest = 0
        replayed = 0
        for path in sorted(self.directory.glob(f"{SEGMENT_PREFIX}*{SEGMENT_SUFFIX}")):
            seq_text = path.name[len(SEGMENT_PREFIX) : -len(SEGMENT_SUFFIX)]
            if not seq_text.isdigit():
                continue
            seq = int(seq_text)
            highest = max(highest, seq)
            report = scan(path.read_bytes())
            if report.skipped_bytes:
                logger.warning(
                    "spool segment %s: skipped %d bytes of torn or corrupt records at offsets %s",
                    path.name,
                    report.skipped_bytes,
                    report.skipped_at[:10],
                )
            if not report.records:
                path.unlink()
                continue
            segment = Segment(seq=seq, path=path, size=path.stat().st_size)
            self._segments[seq] = segment
            for record, payload in zip(report.records, report.payloads, strict=True):
                self._add_pending(payload, record.received_at, segment)
            replayed += len(report.records)
        if replayed:
            logger.warning("spool: %d acknowledged results replayed from disk", replayed)
        self._start_segment(highest + 1)
        return replayed

    def _start_segment(self, seq: int) -> None:
        path = self.directory / f"{SEGMENT_PREFIX}{seq:012d}{SEGMENT_SUFFIX}"
        fd = self._disk.create(path)
        self._disk.sync_directory(self.directory)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self._current = Segment(seq=seq, path=path)
        self._segments[seq] = self._current

    def _add_pending(self, payload: bytes, received_at: float, segment: Segment) -> int:
        self._next_id += 1
        self._pending[self._next_id] = (payload, received_at, segment.seq)
        segment.unresolved += 1
        return self._next_id

    # -- appends ------------------------------------------------------------------------------

    async def append(self, record: SpoolRecord) -> Entry:
        """Append one record and return once it is fsync'd (group commit).

        Raises
        ------
        SpoolWriteError
            The write or the fsync failed; the record is not durable.
        """
        if self.closed or self._current is None:
            raise SpoolWriteError("the spool is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Entry] = loop.create_future()
        payload = record.encode()
        self._buffer.append(frame(payload))
        self._batch.append((record, payload, future))
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush_loop())
        # Each request has its own future: a cancelled request cancels only that future, and
        # its record is still written and registered with the batch.
        return await future

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._buffer:
                data = b"".join(self._buffer)
                batch = self._batch
                self._buffer, self._batch = [], []
                segment = self._current
                assert segment is not None
                try:
                    await loop.run_in_executor(self._executor, self._write, data, segment)
                except OSError as exc:
                    self.writable = False
                    error = SpoolWriteError(f"spool write failed: {exc.strerror or exc}")
                    logger.error("spool: %d results could not be written: %s", len(batch), exc)  # noqa: TRY400 - errno is enough
                    for _record, _payload, future in batch:
                        if not future.done():
                            future.set_exception(error)
                    continue
                self.writable = True
                for record, payload, future in batch:
                    entry_id = self._add_pending(payload, record.received_at, segment)
                    if not future.done():
                        future.set_result(Entry(id=entry_id, record=record, segment=segment))
                if self.on_append is not None:
                    self.on_append()
        finally:
            self._flusher = None
            self._maybe_rotate()

    def _write(self, data: bytes, segment: Segment) -> None:
        """Runs on the writer thread: write all of ``data``, then fdatasync once."""
        view = memoryview(data)
        written = 0
        try:
            while written < len(view):
                written += os.write(self._fd, view[written:])
            self._disk.sync(self._fd)
        except OSError:
            # Cut the partial batch off so the next batch does not follow garbage.
            try:
                os.ftruncate(self._fd, segment.size)
            except OSError:
                logger.warning("spool: could not truncate a failed write (torn tail remains)")
            raise
        segment.size += len(data)

    # -- resolution and compaction ------------------------------------------------------------

    def resolve(self, entry: Entry) -> None:
        """The entry's result is in the ledger or a dead letter: forget it (idempotent)."""
        self._entries.pop(entry.id, None)
        if self._pending.pop(entry.id, None) is None:
            return
        entry.segment.unresolved -= 1
        if entry.segment is not self._current and entry.segment.unresolved == 0:
            self._delete(entry.segment)
        self._maybe_rotate()

    # -- the drainer's view -------------------------------------------------------------------

    def due(self, now: float, limit: int) -> list[Entry]:
        """Up to ``limit`` pending entries, oldest first, not in flight and not backing off.

        ``now`` is monotonic. Entries are materialised (their payload decoded) here, for the
        drainer only, and kept with their bookkeeping until resolved.
        """
        found: list[Entry] = []
        if limit <= 0:
            return found
        for entry_id, (payload, _received_at, seq) in self._pending.items():
            entry = self._entries.get(entry_id)
            if entry is None:
                entry = Entry(
                    id=entry_id, record=SpoolRecord.decode(payload), segment=self._segments[seq]
                )
                self._entries[entry_id] = entry
            elif entry.in_flight or entry.next_attempt > now:
                continue
            found.append(entry)
            if len(found) >= limit:
                break
        return found

    def next_due(self, now: float) -> float | None:
        """Monotonic time the next pending entry is due (``now`` or earlier if one is due now).

        ``None`` when every pending entry is in flight (or nothing is pending).
        """
        if len(self._pending) > len(self._entries):
            return now  # an entry the drainer has not seen yet is due at once
        return min(
            (e.next_attempt for e in self._entries.values() if not e.in_flight), default=None
        )

    def records(self) -> list[SpoolRecord]:
        """Every pending record, oldest first (decodes each: for tests and diagnostics)."""
        return [SpoolRecord.decode(payload) for payload, _at, _seq in self._pending.values()]

    def _delete(self, segment: Segment) -> None:
        self._segments.pop(segment.seq, None)
        try:
            self._disk.unlink(segment.path)
        except OSError as exc:
            logger.warning("spool: could not delete drained segment %s: %s", segment.path.name, exc)

    def _maybe_rotate(self) -> None:
        """Start a new segment when the current one is fully drained (and nothing is in flight)."""
        current = self._current
        if (
            current is None
            or self.closed
            or self._flusher is not None
            or current.unresolved
            or not current.size
        ):
            return
        try:
            self._start_segment(current.seq + 1)
        except OSError as exc:
            logger.warning("spool: could not rotate segment: %s", exc)
            return
        self._delete(current)

    # -- observation --------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Results acknowledged but not yet in the ledger."""
        return len(self._pending)

    def oldest_age(self) -> float:
        """Seconds since the oldest pending result was received (0 when empty)."""
        for _payload, received_at, _seq in self._pending.values():
            return max(0.0, self._clock() - received_at)
        return 0.0

    def segment_files(self) -> list[Path]:
        """The segment files currently on disk (for tests and diagnostics)."""
        return sorted(self.directory.glob(f"{SEGMENT_PREFIX}*{SEGMENT_SUFFIX}"))

    async def probe(self) -> bool:
        """Check that the volume takes a write and an fsync; updates :attr:`writable`."""
        if self.closed:
            return self.writable
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._probe)
        except OSError as exc:
            if self.writable:
                logger.error("spool: the volume cannot be written: %s", exc)  # noqa: TRY400
            self.writable = False
            return False
        self.writable = True
        return True

    def _probe(self) -> None:
        path = self.directory / PROBE_NAME
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"\0" * PROBE_BYTES)
            os.fdatasync(fd)
        finally:
            os.close(fd)
            path.unlink(missing_ok=True)

    # -- shutdown -----------------------------------------------------------------------------

    async def close(self) -> None:
        """Flush what is buffered, then close; pending records stay on disk for the next start."""
        if self._flusher is not None:
            await asyncio.shield(self._flusher)
        self.closed = True
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._current is not None and not self._current.size:
            self._delete(self._current)
        self._executor.shutdown(wait=True)
