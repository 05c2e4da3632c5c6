"""The logger's files: one open file per event hour and kind, rolled to disk as temp file ->
fsync -> rename -> fsync of the directory; a file holds back the offsets of its rows until it
is renamed. Stale temp files of a crashed writer are removed at start.

On an object store (`--out s3://bucket/prefix`, stream.logger.storage) there is no rename: the
file is encoded in memory first, then uploaded once under its final, unique key (the logger's
start time, a random tag and a sequence number) and its size checked; an object exists only once
its upload completed, so a writer killed mid-upload leaves no object a reader could take, and
the rows' offsets stay held until the upload returned."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stream.logger.codec import concat
from stream.logger.schema import IMPRESSIONS_DIR, OUTCOMES_DIR, partition_dir
from stream.logger.storage import is_uri, resolve

log = logging.getLogger("rta.logger")

HOUR_MS = 3_600_000
# an upload that fails (S3 503 SlowDown, a network blip, pyarrow's own 3 attempts spent) is tried
# again under the same key after these pauses, while its rows keep holding their offsets; only
# when all fail does the roll fail (and the logger stop, nothing committed past it). ~15 s in
# all: well inside the consumer's max.poll.interval.
UPLOAD_BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0)
_TEMP_MAX_AGE_S = 60.0  # a temp file lives for one write; older ones are a crash's leftovers

Holds = dict[tuple[str, int], int]


def _merge_holds(into: Holds, other: Holds) -> None:
    for tp, o in other.items():
        if o < into.get(tp, o + 1):
            into[tp] = o



@dataclass
class _OpenFile:
    tables: list[pa.Table] = field(default_factory=list)
    nbytes: int = 0
    rows: int = 0
    opened: float = field(default_factory=time.monotonic)
    holds: Holds = field(default_factory=dict)


class _Sink:
    """Open files of one kind (impressions or outcomes), one per event hour, rolled to disk."""

    def __init__(self, root: Path | str, kind: str, prefix: str, order: Any, fs: Any = None) -> None:
        self.kind, self.prefix, self.order, self.fs = kind, prefix, order, fs
        self.local = fs is None or fs.type_name == "local"
        self.root: Any = Path(root) / kind if self.local else f"{root}/{kind}"
        self.files: dict[int, _OpenFile] = {}
        self.seq = 0

    def add(self, table: pa.Table, holds: Holds) -> None:
        """Rows to their event hour's open file; the file holds `holds` until it is renamed."""
        if not table.num_rows:
            return
        hours = table.column("ts_ms").to_numpy() // HOUR_MS
        uniq, inv = np.unique(hours, return_inverse=True)
        for k, hour in enumerate(uniq.tolist()):
            part = table if len(uniq) == 1 else table.filter(pa.array(inv == k))
            f = self.files.setdefault(hour, _OpenFile())
            f.tables.append(part)
            f.nbytes += part.nbytes
            f.rows += part.num_rows
            _merge_holds(f.holds, holds)

    def due(self, now: float, roll_bytes: int, roll_seconds: float, max_open: int) -> list[int]:
        """Hours whose file is big or old enough, plus the oldest beyond `max_open` open files
        (traffic spread over many event hours must not hold many small files open)."""
        due = [h for h, f in self.files.items() if f.nbytes >= roll_bytes or now - f.opened >= roll_seconds]
        extra = len(self.files) - len(due) - max_open
        if extra > 0:
            rest = sorted((f.opened, h) for h, f in self.files.items() if h not in set(due))
            due += [h for _, h in rest[:extra]]
        return due

    def roll(self, hour: int) -> tuple[Path | str, int, int]:
        """Write one open file: temp name, fsync, rename, fsync the directory (on S3: one upload
        under the final key). (path, rows, bytes). The file leaves `files` (and so its rows stop
        holding their offsets back) only once it is in place: a failed write keeps holding them,
        nothing is committed past it."""
        f = self.files[hour]
        table = self.order(concat(f.tables))
        if not self.local:
            return self._upload(hour, f, table)
        directory = self.root / partition_dir(hour * HOUR_MS)
        _makedirs(directory)
        self.seq += 1
        final = directory / f"part-{self.prefix}-{self.seq:06d}.parquet"
        temp = directory / f".{final.name}.tmp"
        pq.write_table(table, temp, compression="zstd")
        fd = os.open(temp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, final)
        _fsync_dir(directory)
        del self.files[hour]
        return final, f.rows, final.stat().st_size

    def _upload(self, hour: int, f: _OpenFile, table: pa.Table) -> tuple[str, int, int]:
        """Encode in memory (an encoding error uploads nothing), put the object once under its
        final key, and check the store holds all of it before the rows stop holding offsets."""
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue()
        self.seq += 1
        final = f"{self.root}/{partition_dir(hour * HOUR_MS)}/part-{self.prefix}-{self.seq:06d}.parquet"
        for attempt, pause in enumerate((*UPLOAD_BACKOFF_S, None)):
            try:
                size = self._put(final, data)
                break
            except (OSError, pa.ArrowException) as exc:
                if pause is None:
                    raise
                # the same key again: a PUT that landed before its reply was lost is overwritten
                # with the same bytes, not duplicated under a new key
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                log.warning("upload of s3://%s failed (attempt %d, again in %.1f s): %s", final, attempt + 1,
                            pause, first, extra={"event": "upload_retry", "attempt": attempt + 1})
                time.sleep(pause)
        del self.files[hour]
        return f"s3://{final}", f.rows, size

    def _put(self, final: str, data: pa.Buffer) -> int:
        """One upload under `final` and its size read back (a HEAD: needs s3:GetObject)."""
        with self.fs.open_output_stream(final) as out:
            out.write(data)
        size = self.fs.get_file_info(final).size
        if size != data.size:  # never seen; a short object must not stay where readers look
            with contextlib.suppress(OSError):
                self.fs.delete_file(final)
            raise OSError(f"s3://{final}: the store holds {size} bytes of {data.size} after the upload")
        return size

    def holds(self) -> Holds:
        out: Holds = {}
        for f in self.files.values():
            _merge_holds(out, f.holds)
        return out

    @property
    def buffered_rows(self) -> int:
        return sum(f.rows for f in self.files.values())


def open_root(out: Path | str) -> tuple[Any, Path | str, int]:
    """(file system or None for the disk, root, stale temp files removed) of `--out`. A local
    root is created and swept of a crashed writer's temp files; an S3 root's bucket must answer
    (endpoint, credentials) before any row is read, so a wrong setting stops the logger at once."""
    if not is_uri(out):
        root = Path(out)
        root.mkdir(parents=True, exist_ok=True)
        return None, root, _remove_stale_temps(root)
    from pyarrow import fs as pafs

    fs, path = resolve(out)
    bucket = path.split("/", 1)[0]
    if fs.get_file_info(bucket).type == pafs.FileType.NotFound:  # OSError: unreachable, refused
        raise OSError(f"s3://{bucket}: no such bucket")
    return fs, path, 0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs(directory: Path) -> None:
    """mkdir -p, fsyncing each parent whose entry was created (a renamed file must survive)."""
    if directory.is_dir():
        return
    missing = []
    d = directory
    while not d.is_dir():
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
        _fsync_dir(d.parent)


def _remove_stale_temps(root: Path) -> int:
    """Temp files of a crashed writer (never renamed, so no offset of theirs was committed)."""
    removed = 0
    now = time.time()
    for kind in (IMPRESSIONS_DIR, OUTCOMES_DIR):
        for p in (root / kind).glob("date=*/hour=*/.part-*.tmp"):
            try:
                if now - p.stat().st_mtime > _TEMP_MAX_AGE_S:
                    p.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
    return removed

