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

Memory. A pending result is kept in memory only as where it is: one tuple of its payload's
offset and length in its segment, its receive time and its segment number. The payload (up to a
64 KiB token) stays on disk and is read back, checksum checked, when the drainer takes the result
(:meth:`Spool.due`); a replay at startup walks each segment through an ``mmap`` instead of
reading it whole. So a pending result costs about 270 bytes of memory (measured), whatever its
size on disk. Only atomic values in the tuple: the garbage collector stops tracking it, so a
full collection does not walk the backlog (with a handful of objects per pending result, full
collections grew to a quarter of a second at 85,000 results and stalled every request).
:class:`Entry` objects, with the drainer's bookkeeping, exist only for the few results being
replayed or backing off.

Bound. A spool on an ``emptyDir`` with a ``sizeLimit`` must never reach it: past it the kubelet
evicts the pod and deletes the volume with every acknowledged result in it. So the spool takes at
most ``max_bytes`` (its segments on disk plus what is admitted and not yet written) and
``max_records`` (pending plus admitted); an append that would cross either is refused with
:class:`SpoolFullError` before anything is written, and the pingback is answered ``503``. A result
refused is one the provider may retry and the operator's fallback poll recovers; a result
acknowledged and then evicted is lost. :meth:`Spool.fill` lets readiness turn false before the
bound. The current segment is rotated once it holds ``segment_bytes``, so one result the API
server keeps refusing cannot pin the bytes of every result resolved after it.

Compaction. Records are not rewritten or tombstoned: a replayed record that comes back after a
crash is a duplicate the ledger recognises. A segment is deleted once every record in it is
resolved, and the current segment is rotated as soon as the spool is empty.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from captchatask_sidecar.spoolformat import HEADER, SpoolRecord, frame, read_payload, walk

logger = logging.getLogger(__name__)

SEGMENT_PREFIX: Final = "spool-"
SEGMENT_SUFFIX: Final = ".log"
PROBE_NAME: Final = ".probe"
#: The readiness probe writes this much (more than a typical record) and fsyncs it, so a full
#: or read-only volume shows as unready before a pingback finds out.
PROBE_BYTES: Final = 8192
#: Largest segment before rotation: small enough that resolved records free their bytes soon.
MAX_SEGMENT_BYTES: Final = 16 * 1024 * 1024


class SpoolWriteError(Exception):
    """The record could not be made durable; the caller must not acknowledge it."""


class SpoolFullError(SpoolWriteError):
    """The record would cross the spool's bound; it was not written (refuse, don't evict)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the spool is full ({reason})")
        self.reason = reason


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


#: What the spool keeps per pending result: its payload's offset and length in the segment file,
#: receive time, segment number. Only atomic values, so the garbage collector untracks the tuple
#: (see the module docstring).
_Pending = tuple[int, int, float, int]


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
    max_bytes, max_records
        The bound (see the module docstring); ``None``: unbounded.
    segment_bytes
        Rotate the current segment once it is this large (default: an eighth of ``max_bytes``,
        at most :data:`MAX_SEGMENT_BYTES`).
    """

    def __init__(
        self,
        directory: Path,
        *,
        on_append: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
        max_bytes: int | None = None,
        max_records: int | None = None,
        segment_bytes: int | None = None,
    ) -> None:
        self.directory = directory
        self.on_append = on_append
        self._clock = clock
        self.max_bytes = max_bytes
        self.max_records = max_records
        if segment_bytes is None:
            segment_bytes = MAX_SEGMENT_BYTES
            if max_bytes is not None:
                segment_bytes = max(1, min(MAX_SEGMENT_BYTES, max_bytes // 8))
        self.segment_bytes = segment_bytes
        #: Bytes of the segments on disk plus bytes admitted and not yet written.
        self._bytes = 0
        #: Records admitted by :meth:`append` and not yet pending (buffered or being written).
        self._admitted = 0
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
            segment = Segment(seq=seq, path=path, size=path.stat().st_size)
            found = self._replay_segment(segment)
            if not found:
                path.unlink()
                continue
            self._segments[seq] = segment
            self._bytes += segment.size
            replayed += found
        if replayed:
            logger.warning("spool: %d acknowledged results replayed from disk", replayed)
        self._start_segment(highest + 1)
        return replayed

    def _replay_segment(self, segment: Segment) -> int:
        """Register a segment's valid records as pending (by location); return how many."""
        if not segment.size:
            return 0
        found = skipped = 0
        skipped_at: list[int] = []
        with (
            segment.path.open("rb") as file,
            mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data,
        ):
            for offset, length, record in walk(data):
                if record is None:
                    skipped += length
                    skipped_at.append(offset)
                    continue
                self._add_pending(offset, length, record.received_at, segment)
                found += 1
        if skipped:
            logger.warning(
                "spool segment %s: skipped %d bytes of torn or corrupt records at offsets %s",
                segment.path.name,
                skipped,
                skipped_at[:10],
            )
        return found

    def _start_segment(self, seq: int) -> None:
        path = self.directory / f"{SEGMENT_PREFIX}{seq:012d}{SEGMENT_SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._fsync_directory()
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self._current = Segment(seq=seq, path=path)
        self._segments[seq] = self._current

    def _fsync_directory(self) -> None:
        """Make a created or deleted segment's directory entry durable."""
        dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _add_pending(self, offset: int, length: int, received_at: float, segment: Segment) -> int:
        self._next_id += 1
        self._pending[self._next_id] = (offset, length, received_at, segment.seq)
        segment.unresolved += 1
        return self._next_id

    # -- appends ------------------------------------------------------------------------------

    async def append(self, record: SpoolRecord) -> Entry:
        """Append one record and return once it is fsync'd (group commit).

        Raises
        ------
        SpoolFullError
            The record would cross the bound; nothing was written.
        SpoolWriteError
            The write or the fsync failed; the record is not durable.
        """
        if self.closed or self._current is None:
            raise SpoolWriteError("the spool is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Entry] = loop.create_future()
        payload = record.encode()
        framed = frame(payload)
        self._admit(len(framed))
        self._buffer.append(framed)
        self._batch.append((record, payload, future))
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush_loop())
        # Each request has its own future: a cancelled request cancels only that future, and
        # its record is still written and registered with the batch.
        return await future

    def _admit(self, size: int) -> None:
        """Reserve room for a record of ``size`` bytes, or refuse it (see the module docstring)."""
        if self.max_records is not None and self.held_records + 1 > self.max_records:
            raise SpoolFullError("records")
        if self.max_bytes is not None and self._bytes + size > self.max_bytes:
            raise SpoolFullError("bytes")
        self._bytes += size
        self._admitted += 1

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._buffer:
                data = b"".join(self._buffer)
                batch = self._batch
                self._buffer, self._batch = [], []
                segment = self._current
                assert segment is not None
                offset = segment.size  # where this batch starts: one writer at a time
                try:
                    await loop.run_in_executor(self._executor, self._write, data, segment)
                except OSError as exc:
                    # Counted against the bound until here: the batch was on its way to disk.
                    self._admitted -= len(batch)
                    self._bytes -= len(data)  # cut off again by _write
                    self.writable = False
                    error = SpoolWriteError(f"spool write failed: {exc.strerror or exc}")
                    logger.error("spool: %d results could not be written: %s", len(batch), exc)  # noqa: TRY400 - errno is enough
                    for _record, _payload, future in batch:
                        if not future.done():
                            future.set_exception(error)
                    continue
                self.writable = True
                self._admitted -= len(batch)
                for record, payload, future in batch:
                    offset += HEADER.size
                    entry_id = self._add_pending(offset, len(payload), record.received_at, segment)
                    offset += len(payload)
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
            os.fdatasync(self._fd)
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
        self._forget(entry.id, entry.segment)

    def _forget(self, entry_id: int, segment: Segment) -> None:
        self._entries.pop(entry_id, None)
        if self._pending.pop(entry_id, None) is None:
            return
        segment.unresolved -= 1
        if segment is not self._current and segment.unresolved == 0:
            self._delete(segment)
        self._maybe_rotate()

    # -- the drainer's view -------------------------------------------------------------------

    def due(self, now: float, limit: int) -> list[Entry]:
        """Up to ``limit`` pending entries, oldest first, not in flight and not backing off.

        ``now`` is monotonic. Entries are materialised here (their payload read back from its
        segment and decoded), for the drainer only, and kept with their bookkeeping until
        resolved: at most ``limit`` small reads per call, usually from the page cache. A record
        that no longer reads back as written (a damaged disk) is logged and dropped, since
        retrying it could never succeed.
        """
        found: list[Entry] = []
        if limit <= 0:
            return found
        unreadable: list[int] = []
        with _Reader(self._segments) as reader:
            for entry_id, (offset, length, _received_at, seq) in self._pending.items():
                entry = self._entries.get(entry_id)
                if entry is None:
                    try:
                        loaded = SpoolRecord.decode(reader.payload(seq, offset, length))
                    except (OSError, ValueError, KeyError) as exc:
                        logger.error(  # noqa: TRY400 - the reason is enough
                            "spool: a record in segment %d at %d cannot be read back: %s",
                            seq,
                            offset,
                            exc,
                        )
                        unreadable.append(entry_id)
                        continue
                    entry = Entry(id=entry_id, record=loaded, segment=self._segments[seq])
                    self._entries[entry_id] = entry
                elif entry.in_flight or entry.next_attempt > now:
                    continue
                found.append(entry)
                if len(found) >= limit:
                    break
        for entry_id in unreadable:
            # The disk no longer holds what was written; keeping it would retry it forever.
            self._forget(entry_id, self._segments[self._pending[entry_id][3]])
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
        """Every pending record, oldest first (reads each back: for tests and diagnostics)."""
        with _Reader(self._segments) as reader:
            return [
                SpoolRecord.decode(reader.payload(seq, offset, length))
                for offset, length, _at, seq in self._pending.values()
            ]

    def _delete(self, segment: Segment) -> None:
        if self._segments.pop(segment.seq, None) is not None:
            self._bytes -= segment.size
        try:
            segment.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("spool: could not delete drained segment %s: %s", segment.path.name, exc)

    def _maybe_rotate(self) -> None:
        """Start a new segment when the current one is drained or large (nothing in flight).

        A large segment with results still pending stays on disk until they are resolved.
        """
        current = self._current
        if (
            current is None
            or self.closed
            or self._flusher is not None
            or not current.size
            or (current.unresolved and current.size < self.segment_bytes)
        ):
            return
        try:
            self._start_segment(current.seq + 1)
        except OSError as exc:
            logger.warning("spool: could not rotate segment: %s", exc)
            return
        if not current.unresolved:
            self._delete(current)

    # -- observation --------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Results acknowledged but not yet in the ledger."""
        return len(self._pending)

    @property
    def held_records(self) -> int:
        """Results pending plus those admitted and not yet written (what the bound counts)."""
        return len(self._pending) + self._admitted

    @property
    def held_bytes(self) -> int:
        """Bytes of the segments on disk plus those admitted and not yet written."""
        return self._bytes

    def fill(self) -> float:
        """How full the spool is against its bound: the larger of the two ratios (0 unbounded)."""
        ratios = [0.0]
        if self.max_bytes:
            ratios.append(self._bytes / self.max_bytes)
        if self.max_records:
            ratios.append(self.held_records / self.max_records)
        return min(1.0, max(ratios))

    def oldest_age(self) -> float:
        """Seconds since the oldest pending result was received (0 when empty)."""
        for _offset, _length, received_at, _seq in self._pending.values():
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


class _Reader:
    """Reads payloads back from segment files, opening each segment at most once per use."""

    def __init__(self, segments: dict[int, Segment]) -> None:
        self._segments = segments
        self._fds: dict[int, int] = {}

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *_exc: object) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def payload(self, seq: int, offset: int, length: int) -> bytes:
        fd = self._fds.get(seq)
        if fd is None:
            path = self._segments[seq].path
            fd = self._fds[seq] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        return read_payload(fd, offset, length)
