"""
Giving freed heap memory back to the operating system.

A full load of the TP/SL rules (100,000 positions) and the start-up reconcile
build and drop tens of megabytes of rows; glibc's allocator keeps the pages it
got for them, so the daemon's resident size stays at that peak and the
initial book dump comes on top of it. :func:`release_free_memory` asks glibc
to hand every free page back (``malloc_trim(0)``, see malloc_trim(3)): at
10,000 assets and 100,000 positions about 4 MiB before the dump
(``bench/scale.py``). Elsewhere (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes

import trio

__all__ = ["release_free_memory", "trim_heap"]


def trim_heap() -> bool:
    """
    ``malloc_trim(0)``: return the allocator's free pages to the OS (blocking,
    a few milliseconds for a 100 MiB heap). True when glibc released memory,
    False when it had none to release or this is not glibc.
    """
    try:  # the process's own symbols: libc is loaded already, nothing is searched
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    return bool(malloc_trim(0))


async def release_free_memory() -> bool:
    """:func:`trim_heap` in a worker thread (the call releases the GIL), off the event loop."""
    return await trio.to_thread.run_sync(trim_heap)
