"""The spool's quarantine: a copy of each damaged frame, kept beside the spool for an operator.

Why keep the bytes. The spool acknowledges a pingback only once its record is durable, so a
record that later fails its checksum or does not decode is a result the disk lost (it returned
other bytes than were written, or something else wrote to the file). A log line was all that
used to remain of it, and once the other records of its segment were resolved the segment was
deleted with the damaged bytes in it. The copy lets an operator see what was lost (the task's
namespace, name and uid are often still legible), tell a failing disk from a foreign writer,
and take a result by hand from a payload that is mostly intact.

Where. ``quarantine/`` inside the spool directory, on the spool's volume: one file per damaged
frame, named after its segment, offset and checksum, so a frame found again at the next start
(its segment still holds other pending records) is kept once. The files hold what the segments
hold, solution tokens included: mode ``0600`` like the segments, and their bytes are never
logged.

Bound. The volume has a size limit the spool must never reach (see :mod:`.spool`), so the
quarantine keeps at most ``max_bytes`` (counted in the spool's bound); a frame that does not fit
is only counted. Nothing here is read back by the sidecar: an operator copies the files out and
deletes them (see the runbook of the ``CaptchataskSpoolDamaged`` alert).
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Final, Protocol

#: The quarantine's folder, inside the spool directory (segments are files at its top level).
QUARANTINE_DIR: Final = "quarantine"
QUARANTINE_SUFFIX: Final = ".damaged"


class FileWriter(Protocol):
    """What the quarantine needs of the spool's :class:`~.spool.Disk`: one durable file write."""

    def write_file(self, path: Path, data: bytes) -> None:
        """Write ``data`` to ``path`` durably and atomically."""


class Quarantine:
    """Damaged frames copied out of the spool's segments, within a byte bound.

    Blocking: the spool calls it at startup (:meth:`Spool.open <.spool.Spool.open>`) and on its
    reader thread, never on the event loop.
    """

    def __init__(self, spool_dir: Path, *, max_bytes: int, disk: FileWriter) -> None:
        self.directory = spool_dir / QUARANTINE_DIR
        self.max_bytes = max_bytes
        #: The spool's file-system calls (one seam for every durable write of the spool).
        self._disk = disk
        #: Bytes of the files in the quarantine (what it adds to the spool's volume).
        self.size = 0

    def load(self) -> None:
        """Count what earlier runs kept (startup)."""
        if self.directory.is_dir():
            self.size = sum(
                path.stat().st_size for path in self.directory.glob(f"*{QUARANTINE_SUFFIX}")
            )

    def name(self, seq: int, offset: int, data: bytes) -> str:
        """The file that holds the damaged frame at ``offset`` of segment ``seq``."""
        return f"spool-{seq:012d}-{offset:012d}-{zlib.crc32(data):08x}{QUARANTINE_SUFFIX}"

    def keep(self, seq: int, offset: int, data: bytes) -> bool:
        """Copy a damaged frame durably; ``False`` when it does not fit (only counted then).

        A frame kept by an earlier run (same place, same bytes) is not written twice.

        Raises
        ------
        OSError
            The copy could not be written (the volume is full or read-only); nothing is left
            half-written under the frame's name.
        """
        path = self.directory / self.name(seq, offset, data)
        if path.exists():
            return True
        if self.size + len(data) > self.max_bytes:
            return False
        self.directory.mkdir(mode=0o700, exist_ok=True)
        self._disk.write_file(path, data)
        self.size += len(data)
        return True
