"""
``polystream record``: the market channel to rotating gzip capture files.

Every frame the venue sends is written with its receive time, as an
envelope line ``{"received_ms":N,"frame":<frame>}`` that ``polystream
replay`` reads (examples/README.md, "Capture format"; docs/recording.md).

The modules, each importing only from those above it:

* :mod:`~polystream.record.files`: one rotating set of gzip files
  (:class:`FileSet`: ``.part`` names, sync flushes, fsync, renames);
* :mod:`~polystream.record.sink`: what is written for each message, in a
  worker thread (:class:`RecordSink`, :func:`raw_line`, :class:`RecordStats`);
* :mod:`~polystream.record.recorder`: the feed's tap, the writer task and
  the wiring (:class:`Recorder`, :func:`run_record`).

Importing the package opens, reads and starts nothing.
"""

from __future__ import annotations

from polystream.record.files import FileSet, file_name, leftover_parts
from polystream.record.recorder import (
    CAPTURE_SUFFIX,
    MIB,
    RAW_SUFFIX,
    BatchSink,
    Recorder,
    Recording,
    RecordOptions,
    run_record,
)
from polystream.record.sink import Received, RecordSink, RecordStats, raw_line

__all__ = [
    "CAPTURE_SUFFIX",
    "MIB",
    "RAW_SUFFIX",
    "BatchSink",
    "FileSet",
    "Received",
    "RecordOptions",
    "RecordSink",
    "RecordStats",
    "Recorder",
    "Recording",
    "file_name",
    "leftover_parts",
    "raw_line",
    "run_record",
]
