"""
Rotating gzip files: one set of ``<directory>/<prefix>-<UTC open time>Z<suffix>``.

Blocking code, run in a worker thread by the recorder (one batch per hop).
A file is written as ``<name>.part`` and renamed to ``<name>`` once complete
(gzip trailer written, data and directory fsynced), so a reader never
finds a half file under a final name. Names carry the UTC time the file was
opened, to the millisecond (``market-20261207T150000.000Z.jsonl.gz``): they
all have one length, so sorting them by name sorts them by time; a name
already taken (a file, or a ``.part`` of another run) moves 1 ms on.

Durability (docs/recording.md, "What a crash loses"): :meth:`FileSet.sync`
ends the deflate block with a sync flush (``Z_SYNC_FLUSH``: every byte
written so far decompresses from the file alone) and fsyncs, so a crash
loses what was written after the last sync; the ``.part`` file then has no
trailer, and :meth:`polystream.replay.Capture.load` reads its complete lines.
"""

from __future__ import annotations

import gzip
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

import attrs

__all__ = ["COMPRESS_LEVEL", "PART_SUFFIX", "FileSet", "file_name", "leftover_parts"]

COMPRESS_LEVEL = 6
"""zlib level: about 3x faster than gzip's default 9, within a few per cent of its size."""
PART_SUFFIX = ".part"
"""Appended to the name of a file being written; removed by the rename that completes it."""


def file_name(prefix: str, opened_ms: int, suffix: str) -> str:
    """``<prefix>-YYYYmmddTHHMMSS.mmmZ<suffix>`` for ``opened_ms`` (unix milliseconds, UTC)."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(opened_ms // 1000))
    return f"{prefix}-{stamp}.{opened_ms % 1000:03d}Z{suffix}"


def leftover_parts(directory: Path, prefix: str) -> list[Path]:
    """``.part`` files of ``prefix`` in ``directory`` (a run that died), by name; [] if none."""
    return sorted(directory.glob(f"{prefix}-*{PART_SUFFIX}")) if directory.is_dir() else []


def _fsync_directory(directory: Path) -> None:
    """Make a create or rename in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@attrs.define(eq=False)
class FileSet:
    """
    One rotating set of gzip files of lines (see the module docstring).

    A file is opened by the first :meth:`write` after the previous one was
    finished, and finished by :meth:`finish` or when the next line would
    take it past ``rotate_bytes`` of uncompressed data (a line is never
    split; a longer line gets a file of its own).

    Attributes:
        directory: where the files go (created when the first file opens).
        prefix, suffix: the name around the time (suffix e.g. ``.jsonl.gz``).
        rotate_bytes: uncompressed bytes per file, at most (> 0).
        wall_clock: unix time in seconds (float), for the names.
        on_finished: called with the final path, its line count and its
            uncompressed bytes once a file is complete.
    """

    directory: Path
    prefix: str
    suffix: str
    rotate_bytes: int
    wall_clock: Callable[[], float] = time.time
    on_finished: Callable[[Path, int, int], None] | None = None
    _file: BinaryIO | None = None
    _gzip: gzip.GzipFile | None = None
    _path: Path | None = None
    _size: int = 0
    _lines: int = 0
    _dirty: bool = False
    _last_ms: int = -1

    @property
    def part_path(self) -> Path | None:
        """The ``.part`` file being written, or None."""
        return None if self._path is None else self._partial(self._path)

    def write(self, lines: Iterable[bytes]) -> None:
        """Append ``lines`` (each ending with a line end), rotating by size. Raises OSError."""
        batch: list[bytes] = []
        size = self._size
        for line in lines:
            if size + len(line) > self.rotate_bytes and size > 0:
                self._put(batch)
                self.finish()
                batch, size = [], 0
            batch.append(line)
            size += len(line)
        if batch:
            self._put(batch)

    def sync(self) -> None:
        """Sync-flush the compressor and fsync, if anything was written since. Raises OSError."""
        if self._gzip is None or self._file is None or not self._dirty:
            return
        self._gzip.flush()  # zlib.Z_SYNC_FLUSH, then the file object's flush
        os.fsync(self._file.fileno())
        self._dirty = False

    def finish(self) -> Path | None:
        """
        Complete the open file: gzip trailer, fsync, rename to its final
        name, fsync the directory. Returns that name, or None when no file
        was open. Raises OSError (the ``.part`` file is then left behind).
        """
        gz, file, path = self._gzip, self._file, self._path
        if gz is None or file is None or path is None:
            return None
        lines, size = self._lines, self._size
        self._gzip = self._file = self._path = None
        self._size = self._lines = 0
        self._dirty = False
        try:
            gz.close()  # the trailer; leaves ``file`` open
            file.flush()
            os.fsync(file.fileno())
        finally:
            file.close()
        os.rename(self._partial(path), path)
        _fsync_directory(self.directory)
        if self.on_finished is not None:
            self.on_finished(path, lines, size)
        return path

    def _put(self, lines: list[bytes]) -> None:
        """Write ``lines`` to the open file, opening one first if need be."""
        if self._gzip is None:
            self._open()
        assert self._gzip is not None
        data = b"".join(lines)
        self._gzip.write(data)
        self._size += len(data)
        self._lines += len(lines)
        self._dirty = True

    def _open(self) -> None:
        """A new ``.part`` file, named by the wall clock (1 ms on per name already taken)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        opened_ms = max(int(self.wall_clock() * 1000), self._last_ms + 1)
        while True:
            path = self.directory / file_name(self.prefix, opened_ms, self.suffix)
            if not path.exists():
                try:
                    file = self._partial(path).open("xb")
                    break
                except FileExistsError:
                    pass
            opened_ms += 1
        self._last_ms = opened_ms
        self._file, self._path = file, path
        self._gzip = gzip.GzipFile(
            filename=path.name,
            mode="wb",
            compresslevel=COMPRESS_LEVEL,
            fileobj=file,
            mtime=opened_ms // 1000,
        )
        _fsync_directory(self.directory)

    @staticmethod
    def _partial(path: Path) -> Path:
        return path.with_name(path.name + PART_SUFFIX)
