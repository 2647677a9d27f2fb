"""The spool's bytes: how one result is framed on disk, and how a segment is read back.

Pure (bytes in, records out; :func:`read_payload` reads back one record the spool located):
:mod:`.spool` owns the files, the group commit and the memory; this module owns the layout, so
it can be read, and tested, apart from them.

Format. Segment files ``spool-<seq>.log``; each record is a 10-byte header (magic ``CT``,
little-endian payload length and CRC-32) followed by the payload. A crash can leave a torn
record at the end of a segment: it fails its length or checksum, is skipped with a warning, and
the reader resynchronises on the next valid header (so a corrupt record in the middle costs only
itself). A process never appends to a segment it did not create, so garbage is never followed by
new data in the same file.

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
        """The record's version 2 payload (see the module docstring; the spool path is hot)."""
        result = self.result
        ref = self.ref
        fields = [
            ref.namespace.encode(),
            ref.name.encode(),
            ref.uid.encode(),
            _ENUM_BYTES[result.kind],
            _ENUM_BYTES[result.delivered_by],
        ]
        lengths = [len(field) for field in fields]
        for value in (
            result.provider_task_id,
            result.token,
            result.user_agent,
            result.code,
            result.message,
        ):
            if value is None:
                lengths.append(ABSENT)
            else:
                field = value.encode()
                fields.append(field)
                lengths.append(len(field))
        for value in (self.received_by, self.source):
            field = value.encode()
            fields.append(field)
            lengths.append(len(field))
        return V2_HEAD.pack(FORMAT_VERSION, self.received_at, *lengths) + b"".join(fields)

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


def frame(payload: bytes) -> bytes:
    """Header + payload, as written to a segment."""
    return HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


@dataclass(slots=True)
class ScanReport:
    """What reading one segment found."""

    records: list[SpoolRecord] = field(default_factory=list)
    #: The payload each record was decoded from (same order as :attr:`records`).
    payloads: list[bytes] = field(default_factory=list)
    skipped_bytes: int = 0
    skipped_at: list[int] = field(default_factory=list)


def scan(data: bytes) -> ScanReport:
    """Read every valid record of a segment; skip (and report) torn or corrupt ones."""
    report = ScanReport()
    for offset, length, record in walk(data):
        if record is None:
            report.skipped_at.append(offset)
            report.skipped_bytes += length
            continue
        report.records.append(record)
        report.payloads.append(data[offset : offset + length])
    return report


def walk(data: bytes | mmap.mmap) -> Iterator[tuple[int, int, SpoolRecord | None]]:
    """Yield ``(payload offset, payload length, record)`` for each record of a segment.

    Torn or corrupt ranges are yielded as ``(offset, skipped length, None)``. ``data`` may be
    an ``mmap`` of the segment file: the spool replays a large segment without reading it into
    memory, and keeps only where each payload is.
    """
    offset = 0
    end = len(data)
    while offset < end:
        if end - offset >= HEADER.size:
            magic, length, crc = HEADER.unpack_from(data, offset)
            start = offset + HEADER.size
            if magic == MAGIC and length <= MAX_RECORD_BYTES and start + length <= end:
                payload = data[start : start + length]
                if zlib.crc32(payload) == crc:
                    try:
                        record = SpoolRecord.decode(payload)
                    except (ValueError, KeyError, TypeError):
                        yield offset, HEADER.size + length, None
                    else:
                        yield start, length, record
                    offset = start + length
                    continue
        # Not a valid record here: resynchronise on the next magic that starts a valid one.
        following = data.find(MAGIC, offset + 1)
        next_offset = end if following < 0 else following
        yield offset, next_offset - offset, None
        offset = next_offset


def read_payload(fd: int, offset: int, length: int) -> bytes:
    """Read back one framed payload at ``offset`` of an open segment, checking its frame.

    Raises
    ------
    ValueError
        The bytes there are not the record written (a damaged disk, a foreign writer).
    """
    data = os.pread(fd, HEADER.size + length, offset - HEADER.size)
    if len(data) != HEADER.size + length:
        raise ValueError("spool record cut short")
    magic, stored_length, crc = HEADER.unpack_from(data)
    payload = data[HEADER.size :]
    if magic != MAGIC or stored_length != length or zlib.crc32(payload) != crc:
        raise ValueError("spool record damaged on disk")
    return payload
