"""The logger's files: one open file per event hour and kind, rolled to disk as temp file ->
fsync -> rename -> fsync of the directory; a file holds back the offsets of its rows until it
is renamed. Stale temp files of a crashed writer are removed at start."""

from __future__ import annotations

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

HOUR_MS = 3_600_000
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

    def __init__(self, root: Path, kind: str, prefix: str, order: Any) -> None:
        self.root, self.kind, self.prefix, self.order = root / kind, kind, prefix, order
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

    def roll(self, hour: int) -> tuple[Path, int, int]:
        """Write one open file: temp name, fsync, rename, fsync the directory. (path, rows, bytes).
        The file leaves `files` (and so its rows stop holding their offsets back) only once it
        is renamed into place: a failed write keeps holding them, nothing is committed past it."""
        f = self.files[hour]
        table = self.order(concat(f.tables))
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

    def holds(self) -> Holds:
        out: Holds = {}
        for f in self.files.values():
            _merge_holds(out, f.holds)
        return out

    @property
    def buffered_rows(self) -> int:
        return sum(f.rows for f in self.files.values())


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

