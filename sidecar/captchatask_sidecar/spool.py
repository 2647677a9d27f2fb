"""The spool: an append-only, fsync'd local log of results the ledger could not take in time.

A pingback is acknowledged only once its result is durable. When the API server is away (or
slower than the ledger budget) "durable" means: appended here by a synchronous write (the
segment is opened ``O_DSYNC``: the write returns once its data is on the volume, as after an
``fdatasync``). The spool
lives on a volume, survives a restart (it is replayed at startup) and is drained into the ledger
by :mod:`.drainer` as soon as the API server answers.

Format. Segment files ``spool-<seq>.log`` of framed, checksummed records; the bytes on disk
(framing, the payload layouts, reading back a torn segment) are :mod:`.spoolformat`'s.

Damage. A torn tail (the newest segment's last write, cut by a crash before it returned, so
never acknowledged) is discarded. Any other record that fails its checksum or decoding, at
startup or when read back, was acknowledged and is lost to the spool: it is reported through
``on_damage`` (a counter, so an alert can ring) and its bytes are copied into the quarantine
(:mod:`.quarantine`) before its segment can be deleted with them.

Group commit. Appends from concurrent requests are buffered; one writer job at a time writes the
whole buffer in one synchronous write, in a dedicated single-thread executor (writes stay
ordered). Each request waits for the batch holding its record: at high load a batch holds
tens of records and costs one thread hop and one sync. Before it writes a batch the flusher
lets the event loop catch up (:data:`GROUP_COMMIT_QUIET_TURNS`): at saturation the handlers of the
pingbacks already read run over the next few turns of the loop, and a batch written as soon as
the first of them appended held a handful of records, each paying a share of a sync
(tens of microseconds of kernel time) and of a thread hop. On an idle loop the wait is a few
empty turns; a stream that never pauses is cut at :data:`GROUP_COMMIT_MAX_RECORDS`,
:data:`GROUP_COMMIT_MAX_BYTES` or :data:`GROUP_COMMIT_MAX_WAIT_SECONDS`.

No disk work on the event loop. Every call that can block on the volume (:class:`Disk`: segment
creation and its directory sync, the synchronous appends, ``unlink``, the journal, reading a
payload back) runs on one of three threads: the writer (appends), the cleaner (tombstones, rotation,
deletion, compaction) and the reader (payloads for the drainer), so a slow disk delays the
pingbacks or replays that wait for it, never the loop and every other request on it, and a
hanging deletion never holds up an append. When the current segment is drained (or large) the
cleaner creates the next one; appends go on to the current segment until the switch, so none
waits for a directory sync. Only :meth:`Spool.open` (startup) and the diagnostics
:meth:`Spool.entry` and :meth:`Spool.records` read on the calling thread.

Memory. Everything acknowledged stays pending until it reaches the ledger, which can be hundreds
of thousands of results while the API server is away. A pending result is kept in memory only as
where it is: one tuple of its payload's length, its receive time, its segment number and its
frame's offset. The payload (up to a 64 KiB token) stays on disk and is read back, checksum
checked, on the reader thread when the drainer takes the result (:meth:`Spool.due`); a replay at
startup walks each segment through an ``mmap`` instead of reading it whole. So a pending result
costs a few hundred bytes of memory, whatever its size on disk. Only atomic values in the tuple:
the garbage collector stops tracking it, so a full collection does not walk the backlog (with a
handful of objects per pending result, full collections grew to a quarter of a second at 85,000
results and stalled every request).
:class:`Entry` objects, with the drainer's bookkeeping, exist only for the few results being
replayed, backing off, or read ahead for the drainer (at most :data:`READ_AHEAD` at a time).

Bound. A spool on an ``emptyDir`` with a ``sizeLimit`` must never reach it: past it the kubelet
evicts the pod and deletes the volume with every acknowledged result in it. So the spool holds at
most ``max_bytes`` (its segments and journal on disk plus what is admitted and not yet written)
and ``max_records`` (pending plus admitted); an append that would cross either is refused with
:class:`SpoolFullError` before anything is written, and the pingback is answered ``503``. A result
refused is one the provider may retry and the operator's fallback poll recovers; a result
acknowledged and then evicted is lost. :meth:`Spool.fill` lets readiness turn false before the
bound. The current segment is also rotated once it holds ``segment_bytes``, so one result the API
server keeps refusing cannot pin the bytes of every result resolved after it.

Resolution is durable. A record in the ledger (or a dead letter) gets a tombstone in the
resolution journal (:mod:`.spoolformat`), written in batches by the cleaner and ``fdatasync``'d;
a replay at startup skips tombstoned records. Without it, a restart replayed every record of a
partly drained segment, and once the task was deleted such a replay became a spurious
``TaskNotFound`` dead letter. A segment is deleted once every record in it is resolved: a
"gone" tombstone is made durable first, then the file is unlinked and the directory synced, so a
crash at any point (even one that undoes the unlink) replays nothing resolved. The current
segment is rotated as soon as it is drained. The journal is compacted (rewritten to the
tombstones of live segments, then renamed over) when the spool is empty or it has doubled.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from captchatask_sidecar.quarantine import Quarantine
from captchatask_sidecar.spoolformat import (
    GONE,
    HEADER,
    RESOLVED,
    DamagedRecord,
    Journal,
    SpoolRecord,
    frame_header,
    journal_entry,
    read_journal,
    read_payload,
    walk,
)

logger = logging.getLogger(__name__)

SEGMENT_PREFIX: Final = "spool-"
SEGMENT_SUFFIX: Final = ".log"
PROBE_NAME: Final = ".probe"
#: The resolution journal (tombstones; see the module docstring).
JOURNAL_NAME: Final = "spool.resolved"
#: Compact the journal once it is this big (or a segment's rotation size, if smaller: it counts
#: against the bound) and twice its size after the last compaction.
JOURNAL_COMPACT_BYTES: Final = 1 << 20
#: The readiness probe writes this much (more than a typical record) and fsyncs it, so a full
#: or read-only volume shows as unready before a pingback finds out.
PROBE_BYTES: Final = 8192
#: Largest segment before rotation: small enough that resolved records free their bytes soon.
MAX_SEGMENT_BYTES: Final = 16 * 1024 * 1024
#: Pending results :meth:`Spool.due` reads back at once when it has to read one (see there),
#: and at most this many payload bytes (tokens can be 64 KiB): the read-ahead's memory bound.
READ_AHEAD: Final = 64
READ_AHEAD_BYTES: Final = 1024 * 1024
#: A batch is written once this many turns of the event loop in a row appended nothing: the loop
#: has caught up with the requests it had read. A request takes two turns from its bytes arriving
#: (read, parse) to its handler appending, and a turn may run only reads or only answers; with
#: four, a batch at saturation held about 26 records instead of 19 with two (measured with wrk, 64
#: connections). On an idle loop four empty turns cost microseconds, against an fsync's hundreds.
GROUP_COMMIT_QUIET_TURNS: Final = 4
#: ... or once it holds this many records: a stream that never pauses still gets written, and at
#: saturation the loop handles the next requests while this batch's fsync runs instead of idling
#: with every connection waiting on one batch (with 64 connections, 32 gave 52 % of the framework
#: ceiling where 256 gave 47 %: more fsyncs, but no core idle while one runs).
GROUP_COMMIT_MAX_RECORDS: Final = 32
#: ... or this many bytes (a few full-size tokens are enough for one write).
GROUP_COMMIT_MAX_BYTES: Final = 1 << 20
#: ... or once it has waited this long for the loop (a bound on the latency the wait adds).
GROUP_COMMIT_MAX_WAIT_SECONDS: Final = 0.002
#: The most the quarantine of damaged frames keeps (and a sixteenth of ``max_bytes`` at most):
#: room for a few damaged full-size records, small against the volume's headroom.
QUARANTINE_MAX_BYTES: Final = 4 * 1024 * 1024
#: Where damage to an acknowledged record was found: replaying the segments at startup, or
#: reading a pending record back for the drainer (the ``stage`` label of the damage counters).
RECOVERY: Final = "recovery"
READBACK: Final = "readback"

#: Told of each damaged range: ``(stage, bytes, kept in the quarantine)``.
DamageHook = Callable[[str, int, bool], None]


class Disk:
    """The spool's blocking file-system calls, in one place so a test can slow or record them.

    Each of these can take as long as the disk wants (an ``fsync`` on a busy volume takes tens of
    milliseconds), which is why the spool calls them only from its writer thread, never on the
    event loop. Tests subclass it to block a call or to record the order of syncs.
    """

    def create(self, path: Path) -> int:
        """Create (or open) a file for appending (the journal); return its descriptor."""
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

    def create_segment(self, path: Path) -> int:
        """Create (or open) a segment file for :meth:`append`; return its descriptor.

        ``O_DSYNC``: a write to it returns only once its data, and the file size that makes the
        data readable, are durable, as a write followed by ``fdatasync`` would, in one system
        call and one trip out of the interpreter per group commit instead of two.
        """
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_DSYNC
        return os.open(path, flags, 0o600)

    def append(self, fd: int, data: bytes) -> None:
        """Append all of ``data`` to a segment and return once it is durable.

        What every acknowledgement waits for; ``fd`` comes from :meth:`create_segment`, so the
        write itself is synchronous.
        """
        _write_all(fd, data)

    def sync(self, fd: int) -> None:
        """Make the data appended to ``fd`` durable (the journal's tombstones, the probe)."""
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

    def read_back(self, wanted: list[tuple[int, Path, int, int]]) -> list[bytes | ValueError]:
        """Each ``(id, segment file, frame offset, length)``'s payload, or its damage."""
        return _read_back(wanted)

    def write_file(self, path: Path, data: bytes) -> None:
        """Write a whole file durably and atomically (a quarantined frame).

        A temporary file, synced, renamed over ``path``, then its directory entry synced. On
        ``OSError`` nothing is left under ``path`` or the temporary name.
        """
        temp = path.with_name(path.name + ".tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except OSError:
            temp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        os.replace(temp, path)
        self.sync_directory(path.parent)

    def truncate(self, path: Path, size: int) -> None:
        """Cut a file to ``size`` bytes, durably (a torn tail, at startup)."""
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)


class SpoolWriteError(Exception):
    """The record could not be made durable; the caller must not acknowledge it."""


class SpoolFullError(SpoolWriteError):
    """The record would cross the spool's bound; it was not written (refuse, don't evict)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the spool is full ({reason})")
        self.reason = reason


@dataclass(slots=True, eq=False)
class Segment:
    """One segment file: how many of its records are unresolved, and which are resolved."""

    seq: int
    path: Path
    unresolved: int = 0
    size: int = 0
    #: Open for appending (the current and the next segment), else -1.
    fd: int = -1
    #: Offsets of its resolved records (what a journal compaction keeps as tombstones).
    resolved: list[int] = field(default_factory=list)


@dataclass(slots=True, eq=False)
class Entry:
    """A durable record in the spool, plus the drainer's bookkeeping for it."""

    id: int
    record: SpoolRecord
    segment: Segment
    offset: int = 0  # where its frame starts in the segment (its identity in a tombstone)
    attempts: int = 0
    next_attempt: float = 0.0  # monotonic
    in_flight: bool = False


#: What the spool keeps per pending result: payload length, receive time, segment number, frame
#: offset (the payload stays on disk). Only atomic values, so the garbage collector untracks the
#: tuple (see the module docstring).
_Pending = tuple[int, float, int, int]


class Spool:
    """The spool directory: replay at open, group-committed appends, durable resolution.

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
    max_bytes, max_records
        The bound (see the module docstring); ``None``: unbounded.
    segment_bytes
        Rotate the current segment once it is this large (default: an eighth of ``max_bytes``,
        at most :data:`MAX_SEGMENT_BYTES`).
    on_damage
        Told of each damaged acknowledged record (see :meth:`open` and :meth:`due`): the
        metrics' counter. Called on the thread that found it.
    quarantine_bytes
        The quarantine's bound (default :data:`QUARANTINE_MAX_BYTES`, at most a sixteenth of
        ``max_bytes``); counted in the spool's own bound.
    """

    def __init__(
        self,
        directory: Path,
        *,
        on_append: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
        disk: Disk | None = None,
        max_bytes: int | None = None,
        max_records: int | None = None,
        segment_bytes: int | None = None,
        on_damage: DamageHook | None = None,
        quarantine_bytes: int | None = None,
    ) -> None:
        self.directory = directory
        self.on_append = on_append
        self.on_damage = on_damage
        if quarantine_bytes is None:
            quarantine_bytes = QUARANTINE_MAX_BYTES
            if max_bytes is not None:
                quarantine_bytes = min(QUARANTINE_MAX_BYTES, max_bytes // 16)
        self._disk = disk or Disk()
        self._quarantine = Quarantine(directory, max_bytes=quarantine_bytes, disk=self._disk)
        #: Damaged frames found by :meth:`_materialise`, to be kept: (segment, offset, bytes).
        self._damaged: list[tuple[int, int, bytes]] = []
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
        #: Records admitted by :meth:`append_payload` and not yet pending (buffered or on their
        #: way to disk).
        self._admitted = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool-writer")
        self._cleaner_executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="spool-cleaner"
        )
        #: Reads payloads back for the drainer: neither behind an fsync nor behind a deletion.
        self._reader_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool-reader")
        self._segments: dict[int, Segment] = {}
        self._current: Segment | None = None
        #: The next segment, created (and its directory entry synced) ahead by the cleaner.
        self._spare: Segment | None = None
        self._next_id = 0
        self._pending: dict[int, _Pending] = {}
        #: Entries handed to the drainer (in flight or backing off), by id.
        self._entries: dict[int, Entry] = {}
        self._buffer: list[bytes] = []
        #: Bytes in :attr:`_buffer` (the group commit's size cut).
        self._buffer_bytes = 0
        self._batch: list[tuple[bytes, float, asyncio.Future[int]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._cleaner: asyncio.Task[None] | None = None
        #: Resolved records whose tombstones are not written yet: (segment number, offset).
        self._tombstones: list[tuple[int, int]] = []
        self._journal_fd = -1
        self._journal_size = 0
        self._journal_compacted_size = 0
        self.writable = True
        self.closed = False
        self._shut_down = False

    # -- startup ------------------------------------------------------------------------------

    def open(self) -> int:
        """Replay the unresolved records of existing segments and start a fresh segment.

        Blocking (startup only). Returns the number of records replayed.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        journal_path = self.directory / JOURNAL_NAME
        journal = read_journal(journal_path.read_bytes()) if journal_path.exists() else Journal()
        if journal.skipped_bytes:
            logger.warning(
                "spool journal: skipped %d bytes of torn or corrupt tombstones",
                journal.skipped_bytes,
            )
        highest = max((*journal.gone, *(seq for seq, _offset in journal.resolved)), default=0)
        self._quarantine.load()
        replayed = 0
        already_resolved = 0
        removed = False
        found: list[tuple[int, Path]] = []
        for path in sorted(self.directory.glob(f"{SEGMENT_PREFIX}*{SEGMENT_SUFFIX}")):
            seq_text = path.name[len(SEGMENT_PREFIX) : -len(SEGMENT_SUFFIX)]
            if seq_text.isdigit():
                found.append((int(seq_text), path))
        # The only segment a crash can have cut a write in: the newest one with bytes (a spare
        # created ahead may be newer and empty). See _replay_segment.
        newest = max(
            (seq for seq, path in found if not journal.is_gone(seq) and path.stat().st_size),
            default=None,
        )
        for seq, path in found:
            highest = max(highest, seq)
            if journal.is_gone(seq):
                self._disk.unlink(path)  # a deletion that a crash undid
                removed = True
                continue
            segment = Segment(seq=seq, path=path, size=path.stat().st_size)
            self._replay_segment(segment, journal, newest=seq == newest)
            already_resolved += len(segment.resolved)
            if not segment.unresolved:
                self._disk.unlink(path)
                removed = True
                continue
            self._segments[seq] = segment
            self._bytes += segment.size
            replayed += segment.unresolved
        if removed:
            self._disk.sync_directory(self.directory)
        if replayed:
            logger.warning("spool: %d acknowledged results replayed from disk", replayed)
        if already_resolved:
            logger.info("spool: %d records already resolved were not replayed", already_resolved)
        self._current = self._create_segment(highest + 1)
        self._segments[self._current.seq] = self._current
        self._compact(self._live_tombstones())
        return replayed

    def _replay_segment(self, segment: Segment, journal: Journal, *, newest: bool) -> None:
        """Register a segment's valid, unresolved records as pending, by location only.

        Torn tail or damage. A write the process died in (before it returned, so before any
        acknowledgement) can only be the last bytes of the newest segment: the sidecar appends
        only to the segments it created, moves on to a new one at every start, and cuts a
        failed write off before the next. Such a torn tail is discarded, as it always was, and
        cut from the file, so that at the next start, when the segment is no longer the newest,
        nothing invalid is left at its end. Any other invalid range (followed by valid frames,
        or at the end of an older segment), and a frame whose checksum holds but whose payload
        does not decode, is an acknowledged record the disk no longer holds: counted as damage
        and copied into the quarantine (:mod:`.quarantine`).
        """
        if not segment.size:
            return
        damaged: list[tuple[int, int, bytes]] = []  # offset, length, the bytes to keep
        torn_at: int | None = None
        with (
            segment.path.open("rb") as file,
            mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data,
        ):
            for offset, length, valid in walk(data):
                if valid:
                    start = offset + HEADER.size
                    try:
                        record = SpoolRecord.decode(data[start : start + length])
                    except (ValueError, KeyError, TypeError):
                        whole = data[offset : start + length]
                        damaged.append((offset, len(whole), whole))
                    else:
                        if (segment.seq, offset) in journal.resolved:
                            segment.resolved.append(offset)
                        else:
                            self._add_pending(length, record.received_at, segment, offset)
                elif newest and offset + length == segment.size:
                    torn_at = offset
                else:
                    # At most the quarantine's bound is copied out of a run of garbage.
                    end = offset + min(length, self._quarantine.max_bytes + 1)
                    damaged.append((offset, length, data[offset:end]))
        if torn_at is not None:
            self._cut_torn_tail(segment, torn_at)
        for offset, length, found in damaged:
            self._damage(RECOVERY, segment.seq, offset, found, length=length)

    def _cut_torn_tail(self, segment: Segment, torn_at: int) -> None:
        """Discard the newest segment's torn tail and cut it from the file.

        Why it is cut: see :meth:`_replay_segment`.
        """
        logger.warning(
            "spool segment %s: discarded a torn tail of %d bytes (a write cut by a crash,"
            " never acknowledged)",
            segment.path.name,
            segment.size - torn_at,
        )
        try:
            self._disk.truncate(segment.path, torn_at)
        except OSError as exc:
            # Left in place, it is taken for damage once a newer segment exists: a false
            # alarm, never a lost result, so the start goes on.
            logger.warning(
                "spool segment %s: could not cut the torn tail: %s", segment.path.name, exc
            )
        else:
            segment.size = torn_at

    def _damage(
        self, stage: str, seq: int, offset: int, found: bytes, *, length: int | None = None
    ) -> None:
        """Keep a damaged frame in the quarantine (blocking), count it and say so in the log.

        Never logs the bytes themselves: they hold a solution token.
        """
        try:
            kept = self._quarantine.keep(seq, offset, found)
        except OSError as exc:
            logger.error("spool: could not copy a damaged record to the quarantine: %s", exc)  # noqa: TRY400 - errno is enough
            kept = False
        logger.error(
            "spool: an acknowledged record in segment %d at offset %d is damaged (%d bytes, found"
            " at %s); %s",
            seq,
            offset,
            len(found) if length is None else length,
            stage,
            f"copied to {self._quarantine.name(seq, offset, found)}"
            if kept
            else "not copied (the quarantine is full or cannot be written)",
        )
        if self.on_damage is not None:
            self.on_damage(stage, len(found) if length is None else length, kept)

    def _create_segment(self, seq: int) -> Segment:
        """Create a segment file and make its directory entry durable (writer or cleaner)."""
        path = self.directory / f"{SEGMENT_PREFIX}{seq:012d}{SEGMENT_SUFFIX}"
        fd = self._disk.create_segment(path)
        try:
            self._disk.sync_directory(self.directory)
        except OSError:
            os.close(fd)
            raise
        return Segment(seq=seq, path=path, fd=fd)

    def _add_pending(self, length: int, received_at: float, segment: Segment, offset: int) -> int:
        self._next_id += 1
        self._pending[self._next_id] = (length, received_at, segment.seq, offset)
        segment.unresolved += 1
        return self._next_id

    # -- appends ------------------------------------------------------------------------------

    def append(self, record: SpoolRecord) -> asyncio.Future[int]:
        """Append one record; the future resolves to its entry id once it is fsync'd.

        Raises
        ------
        SpoolFullError
            The record would cross the bound (at once, not from the future); nothing was written.
        SpoolWriteError
            The write or the fsync failed (from the future); the record is not durable.
        """
        return self.append_payload(record.encode(), record.received_at)

    def append_payload(self, payload: bytes, received_at: float) -> asyncio.Future[int]:
        """:meth:`append` for a payload already encoded (the hot path: no record object).

        Not a coroutine on purpose: the caller awaits the future directly, one coroutine frame
        less to create and resume per pingback. Group commit: the record joins the buffer and
        the running flusher (or a new one) writes it with everything else buffered, in one
        synchronous write for all of them.
        """
        if self.closed or self._current is None:
            raise SpoolWriteError("the spool is closed")
        size = HEADER.size + len(payload)
        self._admit(size)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self._buffer.append(frame_header(payload))
        self._buffer.append(payload)
        self._buffer_bytes += size
        self._batch.append((payload, received_at, future))
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush_loop())
        # Each request has its own future: a cancelled request cancels only that future, and
        # its record is still written and registered with the batch.
        return future

    def _admit(self, size: int) -> None:
        """Reserve room for a record of ``size`` bytes, or refuse it (see the module docstring)."""
        if self.max_records is not None and self.held_records + 1 > self.max_records:
            raise SpoolFullError("records")
        if self.max_bytes is not None and self.held_bytes + size > self.max_bytes:
            raise SpoolFullError("bytes")
        self._bytes += size
        self._admitted += 1

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._buffer:
                await self._catch_up(loop)
                data = b"".join(self._buffer)
                batch = self._batch
                self._buffer, self._batch = [], []
                self._buffer_bytes = 0
                segment = self._current
                assert segment is not None
                offset = segment.size  # only this loop writes: the batch starts here
                try:
                    await loop.run_in_executor(self._executor, self._write, data, segment)
                except OSError as exc:
                    # Counted against the bound until here: the batch was on its way to disk.
                    self._admitted -= len(batch)
                    self._bytes -= len(data)  # cut off again by _write
                    self.writable = False
                    error = SpoolWriteError(f"spool write failed: {exc.strerror or exc}")
                    logger.error("spool: %d results could not be written: %s", len(batch), exc)  # noqa: TRY400 - errno is enough
                    for _payload, _received_at, future in batch:
                        if not future.done():
                            future.set_exception(error)
                    continue
                self.writable = True
                self._admitted -= len(batch)  # now pending, and their bytes the segment's
                # Inlined _add_pending: this loop runs once per acknowledged pingback.
                pending = self._pending
                seq = segment.seq
                entry_id = self._next_id
                for payload, received_at, future in batch:
                    entry_id += 1
                    pending[entry_id] = (len(payload), received_at, seq, offset)
                    if not future.done():
                        future.set_result(entry_id)
                    offset += HEADER.size + len(payload)
                self._next_id = entry_id
                segment.unresolved += len(batch)
                if self.on_append is not None:
                    self.on_append()
        finally:
            self._flusher = None
            self._maybe_rotate()

    async def _catch_up(self, loop: asyncio.AbstractEventLoop) -> None:
        """Let the records of requests the loop is still handling join the batch.

        Returns once :data:`GROUP_COMMIT_QUIET_TURNS` turns in a row appended nothing, or the
        batch reached one of its bounds (see the module docstring). Only delays writes: every
        record still waits for the synchronous write of its own batch.
        """
        deadline = loop.time() + GROUP_COMMIT_MAX_WAIT_SECONDS
        batch_size = len(self._batch)
        quiet = 0
        while (
            quiet < GROUP_COMMIT_QUIET_TURNS
            and batch_size < GROUP_COMMIT_MAX_RECORDS
            and self._buffer_bytes < GROUP_COMMIT_MAX_BYTES
        ):
            await asyncio.sleep(0)
            grown = len(self._batch)
            if grown == batch_size:
                quiet += 1
            else:
                batch_size, quiet = grown, 0
            if loop.time() >= deadline:
                return

    def _write(self, data: bytes, segment: Segment) -> None:
        """Runs on the writer thread: append all of ``data``, durably (see :meth:`Disk.append`)."""
        try:
            self._disk.append(segment.fd, data)
        except OSError:
            # Cut the partial batch off so the next batch does not follow garbage.
            try:
                os.ftruncate(segment.fd, segment.size)
            except OSError:
                logger.warning("spool: could not truncate a failed write (torn tail remains)")
            raise
        segment.size += len(data)

    # -- resolution and compaction ------------------------------------------------------------

    def resolve(self, entry: Entry) -> None:
        """The entry's result is in the ledger or a dead letter: forget it (idempotent).

        Never touches the disk: the tombstone, and the deletion of a drained segment, are the
        cleaner's (see the module docstring).
        """
        self._forget(entry.id, entry.segment, entry.offset)

    def _forget(self, entry_id: int, segment: Segment, offset: int) -> None:
        self._entries.pop(entry_id, None)
        if self._pending.pop(entry_id, None) is None:
            return
        segment.unresolved -= 1
        segment.resolved.append(offset)
        self._tombstones.append((segment.seq, offset))
        self._kick_cleaner()

    def _maybe_rotate(self) -> None:
        if self._rotation_due():
            self._kick_cleaner()

    def _rotation_due(self) -> bool:
        """The current segment is drained or large (and nothing is being written to it).

        A large segment with results still pending stays on disk until they are resolved.
        """
        current = self._current
        return (
            current is not None
            and not self.closed
            and self._flusher is None
            and current.size > 0
            and (not current.unresolved or current.size >= self.segment_bytes)
        )

    def _kick_cleaner(self) -> None:
        if self._cleaner is None and self._current is not None and not self.closed:
            self._cleaner = asyncio.get_running_loop().create_task(self._clean_loop())

    async def _clean_loop(self) -> None:
        """Tombstones, rotation, deletion and compaction, one step at a time, off the loop."""
        try:
            while await self._clean_step():
                pass
        except OSError as exc:
            # Nothing acknowledged depends on this work: a missing tombstone costs a duplicate
            # replay, an undeleted segment some disk. The next resolution retries.
            logger.warning("spool: maintenance failed (retried on the next resolution): %s", exc)
        finally:
            self._cleaner = None

    async def _clean_step(self) -> bool:
        """Do the first piece of maintenance that is due; ``False`` when nothing was."""
        loop = asyncio.get_running_loop()
        run = self._cleaner_executor
        if self._tombstones:
            entries = b"".join(journal_entry(RESOLVED, seq, off) for seq, off in self._tombstones)
            self._tombstones = []
            await loop.run_in_executor(run, self._append_journal, entries)
            return True
        if self._rotation_due():
            current = self._current
            assert current is not None
            if self._spare is None:
                self._spare = await loop.run_in_executor(run, self._create_segment, current.seq + 1)
                self._segments[self._spare.seq] = self._spare
            if self._rotation_due():
                self._current, self._spare = self._spare, None
                return True
        keep = (self._current, self._spare)
        doomed = [s for s in self._segments.values() if not s.unresolved and s not in keep]
        if doomed:
            for segment in doomed:
                del self._segments[segment.seq]
            try:
                await loop.run_in_executor(run, self._delete_segments, doomed)
            except BaseException:
                # Back on the books. Off them, the file stayed on disk (and in the bytes
                # counted) until a restart, and the next compaction dropped its tombstones, so
                # that start replayed all of it. The next maintenance deletes it again (a second
                # "gone" tombstone, or a file already unlinked, is fine).
                for segment in doomed:
                    self._segments[segment.seq] = segment
                raise
            # Only now: a deletion that failed leaves its bytes on the volume, and counted.
            self._bytes -= sum(segment.size for segment in doomed)
            return True
        if self._journal_size > self._journal_compacted_size and (
            not self._pending
            or self._journal_size
            > max(min(JOURNAL_COMPACT_BYTES, self.segment_bytes), 2 * self._journal_compacted_size)
        ):
            await loop.run_in_executor(run, self._compact, self._live_tombstones())
            return True
        return False

    def _append_journal(self, entries: bytes) -> None:
        """Cleaner thread: append tombstones to the journal and make them durable."""
        _write_all(self._journal_fd, entries)
        self._disk.sync(self._journal_fd)
        self._journal_size += len(entries)

    def _delete_segments(self, segments: list[Segment]) -> None:
        """Cleaner thread: "gone" tombstones first (durable), then unlink, then sync the directory.

        In this order a crash at any point leaves either the file with its tombstone or no
        file: a resolved record is never replayed.
        """
        self._append_journal(b"".join(journal_entry(GONE, segment.seq) for segment in segments))
        for segment in segments:
            if segment.fd >= 0:
                os.close(segment.fd)
                segment.fd = -1
            try:
                self._disk.unlink(segment.path)
            except OSError as exc:
                logger.warning(
                    "spool: could not delete drained segment %s: %s", segment.path.name, exc
                )
        self._disk.sync_directory(self.directory)

    def _live_tombstones(self) -> bytes:
        """The journal's compacted content: the tombstones of segments still on disk."""
        return b"".join(
            journal_entry(RESOLVED, segment.seq, offset)
            for segment in self._segments.values()
            for offset in segment.resolved
        )

    def _compact(self, content: bytes) -> None:
        """Rewrite the journal as ``content`` (temp file, sync, rename, directory sync)."""
        path = self.directory / JOURNAL_NAME
        temp = path.with_name(JOURNAL_NAME + ".tmp")
        fd = self._disk.create(temp)
        try:
            os.ftruncate(fd, 0)
            _write_all(fd, content)
            self._disk.sync(fd)
        except OSError:
            os.close(fd)
            raise
        os.replace(temp, path)
        self._disk.sync_directory(self.directory)
        if self._journal_fd >= 0:
            os.close(self._journal_fd)
        self._journal_fd = fd
        self._journal_size = self._journal_compacted_size = len(content)

    # -- the drainer's view -------------------------------------------------------------------

    async def due(self, now: float, limit: int) -> list[Entry]:
        """Up to ``limit`` pending entries, oldest first, not in flight and not backing off.

        ``now`` is monotonic. Entries are materialised here (their payload read back from its
        segment on the reader thread, checksum checked, and decoded), for the drainer only, and
        kept with their bookkeeping until resolved. A read-back also materialises the next
        pending results, up to :data:`READ_AHEAD` (and :data:`READ_AHEAD_BYTES`): the drainer
        asks for one result each time a replay ends, and a thread hop per replay cost the event
        loop more than the replay's own work while the API server was at its limit. A record
        that no longer reads back as written (a damaged disk, a foreign writer) is dropped,
        since retrying it could never succeed, but not silently: it is counted as damage and its
        bytes are copied into the quarantine, on the reader thread (see :meth:`_replay_segment`).

        Raises
        ------
        OSError
            A segment could not be read (``EIO``, too many open files): nothing is dropped, the
            records stay pending for a later pass (the supervised drainer restarts).
        """
        if limit <= 0:
            return []
        chosen: list[int] = []
        unread: list[tuple[int, Path, int, int]] = []  # id, segment file, frame offset, length
        pending = iter(self._pending.items())
        for entry_id, (length, _received_at, seq, offset) in pending:
            entry = self._entries.get(entry_id)
            if entry is None:
                unread.append((entry_id, self._segments[seq].path, offset, length))
            elif entry.in_flight or entry.next_attempt > now:
                continue
            chosen.append(entry_id)
            if len(chosen) >= limit:
                break
        if unread:
            # The hop to the reader thread is paid anyway: read the next ones too, so that the
            # drainer's closed loop (one more each time a replay ends) mostly finds them here.
            ahead_bytes = sum(length for *_where, length in unread)
            for entry_id, (length, _received_at, seq, offset) in pending:
                if len(unread) >= READ_AHEAD or ahead_bytes >= READ_AHEAD_BYTES:
                    break
                if entry_id not in self._entries:
                    unread.append((entry_id, self._segments[seq].path, offset, length))
                    ahead_bytes += length
            loop = asyncio.get_running_loop()
            read_back = self._disk.read_back
            payloads = await loop.run_in_executor(self._reader_executor, read_back, unread)
            for (entry_id, *_where), payload in zip(unread, payloads, strict=True):
                self._materialise(entry_id, payload)
            if self._damaged:
                damaged, self._damaged = self._damaged, []
                await loop.run_in_executor(self._reader_executor, self._keep_damaged, damaged)
        return [self._entries[i] for i in chosen if i in self._entries and i in self._pending]

    def _materialise(self, entry_id: int, payload: bytes | ValueError) -> None:
        """Make the :class:`Entry` of a pending result from its payload (or drop it, unreadable)."""
        pending = self._pending.get(entry_id)
        if pending is None or entry_id in self._entries:
            return  # resolved, or materialised meanwhile
        _length, _received_at, seq, offset = pending
        segment = self._segments[seq]
        try:
            if isinstance(payload, ValueError):
                raise payload
            record = SpoolRecord.decode(payload)
        except (ValueError, KeyError, TypeError) as exc:
            logger.error(  # noqa: TRY400 - the reason is enough
                "spool: the record in segment %d at %d cannot be read back, dropped: %s",
                seq,
                offset,
                exc,
            )
            # What was found there: the bytes read back, or the frame that passed its checksum.
            found = exc.frame if isinstance(exc, DamagedRecord) else None
            if found is None and isinstance(payload, bytes):
                found = frame_header(payload) + payload
            self._damaged.append((seq, offset, found or b""))
            # The disk no longer holds what was written; keeping it would retry it forever.
            self._forget(entry_id, segment, offset)
            return
        self._entries[entry_id] = Entry(id=entry_id, record=record, segment=segment, offset=offset)

    def _keep_damaged(self, damaged: list[tuple[int, int, bytes]]) -> None:
        """Reader thread: quarantine and count what :meth:`_materialise` found damaged."""
        for seq, offset, found in damaged:
            self._damage(READBACK, seq, offset, found)

    def entry(self, entry_id: int) -> Entry:
        """The pending entry ``entry_id`` (what :meth:`append` resolved to), materialised.

        Reads its payload on the calling thread: for tests and diagnostics, not the event loop's
        hot path (the drainer uses :meth:`due`).
        """
        entry = self._entries.get(entry_id)
        if entry is None:
            length, _received_at, seq, offset = self._pending[entry_id]
            segment = self._segments[seq]
            (payload,) = _read_back([(entry_id, segment.path, offset, length)])
            if isinstance(payload, ValueError):
                raise payload
            entry = Entry(
                id=entry_id, record=SpoolRecord.decode(payload), segment=segment, offset=offset
            )
            self._entries[entry_id] = entry
        return entry

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
        """Every pending record, oldest first.

        Reads each back on the calling thread: for tests and diagnostics.
        """
        wanted = [
            (entry_id, self._segments[seq].path, offset, length)
            for entry_id, (length, _at, seq, offset) in self._pending.items()
        ]
        found = []
        for payload in _read_back(wanted):
            if isinstance(payload, ValueError):
                raise payload
            found.append(SpoolRecord.decode(payload))
        return found

    # -- observation --------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Results acknowledged but not yet in the ledger."""
        return len(self._pending)

    @property
    def disk_bytes(self) -> int:
        """Bytes of the segment files on disk (resolved records included until compaction)."""
        return sum(segment.size for segment in self._segments.values())

    @property
    def held_records(self) -> int:
        """Results pending plus those admitted and not yet written (what the bound counts)."""
        return len(self._pending) + self._admitted

    @property
    def held_bytes(self) -> int:
        """Bytes the spool holds on its volume: segments, journal, quarantine, and admitted."""
        return self._bytes + self._journal_size + self._quarantine.size

    def fill(self) -> float:
        """How full the spool is against its bound: the larger of the two ratios (0 unbounded)."""
        ratios = [0.0]
        if self.max_bytes:
            ratios.append(self.held_bytes / self.max_bytes)
        if self.max_records:
            ratios.append(self.held_records / self.max_records)
        return min(1.0, max(ratios))

    def oldest_age(self) -> float:
        """Seconds since the oldest pending result was received (0 when empty)."""
        for pending in self._pending.values():
            return max(0.0, self._clock() - pending[1])
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
            self._disk.sync(fd)
        finally:
            os.close(fd)
            path.unlink(missing_ok=True)

    # -- shutdown -----------------------------------------------------------------------------

    async def settle(self) -> None:
        """Wait until every append and every resolution so far is on disk (and compacted)."""
        while self._flusher is not None or self._cleaner is not None:
            task = self._flusher or self._cleaner
            assert task is not None
            await asyncio.shield(task)

    async def close(self) -> None:
        """Flush what is buffered, write the tombstones, then close; all of it off the loop.

        Pending records stay on disk for the next start. Idempotent.
        """
        if self._shut_down:
            return
        self._shut_down = True
        await self.settle()
        self.closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._cleaner_executor, self._close_files)
        for executor in (self._executor, self._cleaner_executor, self._reader_executor):
            await loop.run_in_executor(None, executor.shutdown)

    def _close_files(self) -> None:
        """Cleaner thread: close every descriptor; remove segments that never got a record."""
        empty = False
        for segment in list(self._segments.values()):
            if segment.fd >= 0:
                os.close(segment.fd)
                segment.fd = -1
            if not segment.size and not segment.unresolved:
                self._segments.pop(segment.seq, None)
                try:
                    self._disk.unlink(segment.path)
                except OSError as exc:
                    logger.warning("spool: could not delete %s: %s", segment.path.name, exc)
                empty = True
        if self._journal_fd >= 0:
            os.close(self._journal_fd)
            self._journal_fd = -1
        if empty:
            try:
                self._disk.sync_directory(self.directory)
            except OSError as exc:
                logger.warning("spool: could not sync the spool directory: %s", exc)


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` (``os.write`` may write less than asked)."""
    view = memoryview(data)
    written = 0
    while written < len(view):
        written += os.write(fd, view[written:])


def _read_back(wanted: list[tuple[int, Path, int, int]]) -> list[bytes | ValueError]:
    """Reader thread: each ``(id, segment file, frame offset, length)``'s payload, or its damage.

    Each segment is opened once per call. A damaged record is returned as its ``ValueError``, so
    it does not hide the others; an ``OSError`` is raised (it says nothing about the record).
    """
    fds: dict[Path, int] = {}
    found: list[bytes | ValueError] = []
    try:
        for _entry_id, path, offset, length in wanted:
            fd = fds.get(path)
            if fd is None:
                fd = fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                found.append(read_payload(fd, offset, length))
            except ValueError as exc:
                found.append(exc)
    finally:
        for fd in fds.values():
            os.close(fd)
    return found
