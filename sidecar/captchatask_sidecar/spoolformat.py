"""The spool's bytes: how one result is framed on disk, and how a segment is read back.

Pure (bytes in, records out; :func:`read_payload` reads back one record the spool located):
:mod:`.spool` owns the files, the group commit and the memory; this module owns the layout, so
it can be read, and tested, apart from them.

Format. Segment files ``spool-<seq>.log``; each record is a 10-byte header (magic ``CT``,
little-endian payload length and CRC-32) followed by the payload. A crash can leave a torn
record at the end of a segment: it fails its length or checksum, is skipped with a warning, and
the reader resynchronises on the next valid header (so a corrupt record in the middle costs only
itself). A process never appends to a segment it did not create, so garbage is never followed by
new data in the same file: an invalid range followed by valid records is damage to a record
that was acknowledged, which :mod:`.spool` counts and quarantines, not a torn write.

Resolution journal. ``spool.resolved`` holds tombstones, framed like records: a record resolved
(segment number and offset of its frame) or a segment gone (fully resolved, being deleted). A
replay skips what they name, so a result already in the ledger is not replayed after a restart,
nor after a crash that undid a deletion.

Payloads. Version 2 (written now) is a fixed binary layout, because encoding every record as
JSON was a tenth of the spool path's CPU: a version byte, the receive time as a little-endian
float64, then the twelve fields of :data:`V2_FIELDS` as UTF-8, their lengths up front (``u32``
each, :data:`ABSENT` for a field that is ``None``). Version 1 payloads (compact JSON, always
starting with ``{``) are still read, so a spool written by an older sidecar is replayed after an
upgrade.
"""

from __future__ import annotations

import datetime as dt
import json
import mmap
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

from captchatask.decision import Result, ResultKind
from captchatask.model import DeliveredBy, TaskRef

MAGIC: Final = b"CT"
HEADER: Final = struct.Struct("<2sII")  # magic, payload length, crc32(payload)
#: No single record comes near this (a 64 KiB token plus fields); a longer length is garbage.
MAX_RECORD_BYTES: Final = 1 << 20
#: The payload version written; :data:`JSON_VERSION` payloads are still read.
FORMAT_VERSION: Final = 2
JSON_VERSION: Final = 1
#: Field order of a version 2 payload (documentation; :meth:`SpoolRecord.encode` follows it).
V2_FIELDS: Final = (
    "namespace",
    "name",
    "uid",
    "kind",
    "delivered_by",
    "provider_task_id",
    "token",
    "user_agent",
    "code",
    "message",
    "received_by",
    "source",
)
#: Version byte, receive time, one length per field.
V2_HEAD: Final = struct.Struct(f"<Bd{len(V2_FIELDS)}I")
#: The length written for a field that is ``None``.
ABSENT: Final = 0xFFFFFFFF
_ENUM_BYTES: Final[dict[StrEnum, bytes]] = {
    member: member.value.encode() for member in (*ResultKind, *DeliveredBy)
}


@dataclass(frozen=True, slots=True)
class SpoolRecord:
    """One acknowledged result waiting for the ledger."""

    ref: TaskRef
    result: Result
    received_at: float  # wall-clock seconds (for the age gauge and the dead letter)
    received_by: str
    source: str

    def encode(self) -> bytes:
        """The record's version 2 payload (see :func:`encode_record`)."""
        return encode_record(
            self.ref,
            self.result,
            received_at=self.received_at,
            received_by=self.received_by,
            source=self.source,
        )

    @classmethod
    def decode(cls, payload: bytes) -> SpoolRecord:
        """Inverse of :meth:`encode` (and reads version 1); ``ValueError``/``KeyError`` else."""
        if payload[:1] == b"{":
            return cls._decode_json(payload)
        if len(payload) < V2_HEAD.size or payload[0] != FORMAT_VERSION:
            raise ValueError(f"unknown spool record version {payload[:1]!r}")
        _version, received_at, *lengths = V2_HEAD.unpack_from(payload)
        values: list[str | None] = []
        offset = V2_HEAD.size
        for length in lengths:
            if length == ABSENT:
                values.append(None)
                continue
            end = offset + length
            if end > len(payload):
                raise ValueError("spool record field runs past its payload")
            values.append(payload[offset:end].decode())
            offset = end
        if offset != len(payload):
            raise ValueError("spool record has trailing bytes")
        namespace, name, uid, kind, delivered_by, task_id, token, agent, code, message, by, src = (
            values
        )
        if (
            namespace is None
            or name is None
            or uid is None
            or kind is None
            or delivered_by is None
            or by is None
            or src is None
        ):
            raise ValueError("spool record lacks a required field")
        return cls(
            ref=TaskRef(namespace=namespace, name=name, uid=uid),
            result=Result(
                kind=ResultKind(kind),
                delivered_by=DeliveredBy(delivered_by),
                provider_task_id=task_id,
                token=token,
                user_agent=agent,
                code=code,
                message=message,
            ),
            received_at=received_at,
            received_by=by,
            source=src,
        )

    @classmethod
    def _decode_json(cls, payload: bytes) -> SpoolRecord:
        """A version 1 payload: compact JSON with short keys."""
        doc = json.loads(payload)
        if doc.get("v") != JSON_VERSION:
            raise ValueError(f"unknown spool record version {doc.get('v')!r}")
        result = Result(
            kind=ResultKind(doc["k"]),
            delivered_by=DeliveredBy(doc["d"]),
            provider_task_id=doc.get("p"),
            token=doc.get("t"),
            user_agent=doc.get("ua"),
            code=doc.get("c"),
            message=doc.get("m"),
        )
        return cls(
            ref=TaskRef(namespace=doc["ns"], name=doc["n"], uid=doc["u"]),
            result=result,
            received_at=float(doc["at"]),
            received_by=str(doc["by"]),
            source=str(doc["s"]),
        )

    @property
    def received_datetime(self) -> dt.datetime:
        """``received_at`` as an aware datetime."""
        return dt.datetime.fromtimestamp(self.received_at, tz=dt.UTC)


def encode_record(
    ref: TaskRef, result: Result, *, received_at: float, received_by: str, source: str
) -> bytes:
    """A version 2 payload straight from its parts (see the module docstring).

    The spool path's hot spot: no :class:`SpoolRecord` is built, every field is encoded once
    and the payload is one ``join``. A field that is ``None`` is written as :data:`ABSENT`.
    """
    namespace = ref.namespace.encode()
    name = ref.name.encode()
    uid = ref.uid.encode()
    kind = _ENUM_BYTES[result.kind]
    delivered_by = _ENUM_BYTES[result.delivered_by]
    task_id = result.provider_task_id
    token = result.token
    agent = result.user_agent
    code = result.code
    message = result.message
    task_id_b = b"" if task_id is None else task_id.encode()
    token_b = b"" if token is None else token.encode()
    agent_b = b"" if agent is None else agent.encode()
    code_b = b"" if code is None else code.encode()
    message_b = b"" if message is None else message.encode()
    by = received_by.encode()
    src = source.encode()
    head = V2_HEAD.pack(
        FORMAT_VERSION,
        received_at,
        len(namespace),
        len(name),
        len(uid),
        len(kind),
        len(delivered_by),
        ABSENT if task_id is None else len(task_id_b),
        ABSENT if token is None else len(token_b),
        ABSENT if agent is None else len(agent_b),
        ABSENT if code is None else len(code_b),
        ABSENT if message is None else len(message_b),
        len(by),
        len(src),
    )
    return b"".join(
        (
            head,
            namespace,
            name,
            uid,
            kind,
            delivered_by,
            task_id_b,
            token_b,
            agent_b,
            code_b,
            message_b,
            by,
            src,
        )
    )


def frame_header(payload: bytes) -> bytes:
    """The header that precedes ``payload`` in a segment."""
    return HEADER.pack(MAGIC, len(payload), zlib.crc32(payload))


def frame(payload: bytes) -> bytes:
    """Header + payload, as written to a segment."""
    return HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


@dataclass(slots=True)
class ScanReport:
    """What reading one segment found."""

    records: list[SpoolRecord] = field(default_factory=list)
    #: The payload each record was decoded from (same order as :attr:`records`).
    payloads: list[bytes] = field(default_factory=list)
    #: Where each record's frame starts in the segment: its identity in a tombstone.
    offsets: list[int] = field(default_factory=list)
    skipped_bytes: int = 0
    skipped_at: list[int] = field(default_factory=list)


def walk(data: bytes | mmap.mmap) -> Iterator[tuple[int, int, bool]]:
    """Yield ``(frame offset, length, valid)`` for each frame of a file, in order.

    For a valid frame (magic, length and checksum hold) ``length`` is its payload's; for a
    torn or corrupt range it is how many bytes are skipped, the reader resynchronising on the
    next magic that starts a valid frame. ``data`` may be an ``mmap`` of a segment: the spool
    replays a large segment without reading it into memory, keeping only where each payload is.
    """
    offset = 0
    end = len(data)
    while offset < end:
        if end - offset >= HEADER.size:
            magic, length, crc = HEADER.unpack_from(data, offset)
            start = offset + HEADER.size
            if (
                magic == MAGIC
                and length <= MAX_RECORD_BYTES
                and start + length <= end
                and zlib.crc32(data[start : start + length]) == crc
            ):
                yield offset, length, True
                offset = start + length
                continue
        following = data.find(MAGIC, offset + 1)
        next_offset = end if following < 0 else following
        yield offset, next_offset - offset, False
        offset = next_offset


def frames(data: bytes) -> tuple[list[tuple[int, bytes]], list[int], int]:
    """Every valid frame of a file as ``(offset, payload)``, plus where and how much was skipped.

    See :func:`walk`.
    """
    found: list[tuple[int, bytes]] = []
    skipped_at: list[int] = []
    skipped_bytes = 0
    for offset, length, valid in walk(data):
        if valid:
            start = offset + HEADER.size
            found.append((offset, data[start : start + length]))
        else:
            skipped_at.append(offset)
            skipped_bytes += length
    return found, skipped_at, skipped_bytes


class DamagedRecord(ValueError):
    """A frame read back is not the record written; :attr:`frame` holds the bytes found.

    The bytes travel with the error so the spool can copy them into its quarantine.
    """

    def __init__(self, message: str, frame: bytes) -> None:
        super().__init__(message)
        self.frame = frame


def read_payload(fd: int, offset: int, length: int) -> bytes:
    """Read back the payload of the frame at ``offset`` of an open segment, checking the frame.

    Raises
    ------
    DamagedRecord
        The bytes there are not the record written (a damaged disk, a foreign writer).
    """
    data = os.pread(fd, HEADER.size + length, offset)
    if len(data) != HEADER.size + length:
        raise DamagedRecord("spool record cut short", data)
    magic, stored_length, crc = HEADER.unpack_from(data)
    payload = data[HEADER.size :]
    if magic != MAGIC or stored_length != length or zlib.crc32(payload) != crc:
        raise DamagedRecord("spool record damaged on disk", data)
    return payload


def scan(data: bytes) -> ScanReport:
    """Read every valid record of a segment; skip (and report) torn or corrupt ones."""
    found, skipped_at, skipped_bytes = frames(data)
    report = ScanReport(skipped_bytes=skipped_bytes, skipped_at=skipped_at)
    for offset, payload in found:
        try:
            report.records.append(SpoolRecord.decode(payload))
        except (ValueError, KeyError, TypeError):
            report.skipped_at.append(offset)
            report.skipped_bytes += HEADER.size + len(payload)
            continue
        report.payloads.append(payload)
        report.offsets.append(offset)
    report.skipped_at.sort()
    return report


# -- the resolution journal -----------------------------------------------------------------------

#: One journal entry: kind, segment number, record offset (0 where it has none).
JOURNAL_ENTRY: Final = struct.Struct("<BQQ")
#: A record was resolved (it is in the ledger or a dead letter): never replay it.
RESOLVED: Final = 1
#: A segment was fully resolved and is being deleted: ignore it if it comes back.
GONE: Final = 2


def journal_entry(kind: int, seq: int, offset: int = 0) -> bytes:
    """One framed journal entry (see :func:`read_journal`)."""
    return frame(JOURNAL_ENTRY.pack(kind, seq, offset))


@dataclass(slots=True)
class Journal:
    """What the resolution journal says: which records and segments must never be replayed."""

    gone: set[int] = field(default_factory=set)
    resolved: set[tuple[int, int]] = field(default_factory=set)
    skipped_bytes: int = 0

    def is_gone(self, seq: int) -> bool:
        """Whether segment ``seq`` was fully resolved (its file, if any, is a leftover)."""
        return seq in self.gone


def read_journal(data: bytes) -> Journal:
    """Read the resolution journal; a torn or unknown entry is skipped (counted, not fatal).

    A lost tombstone only means a replay the ledger recognises as a duplicate, so a damaged
    journal never stops a start.
    """
    found, _skipped_at, skipped_bytes = frames(data)
    journal = Journal(skipped_bytes=skipped_bytes)
    for _offset, payload in found:
        if len(payload) != JOURNAL_ENTRY.size:
            journal.skipped_bytes += HEADER.size + len(payload)
            continue
        kind, seq, offset = JOURNAL_ENTRY.unpack(payload)
        if kind == RESOLVED:
            journal.resolved.add((seq, offset))
        elif kind == GONE:
            journal.gone.add(seq)
        else:
            journal.skipped_bytes += HEADER.size + len(payload)
    return journal
