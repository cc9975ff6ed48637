"""
Running ``polystream`` as a real subprocess, as an operator would: one clean
environment, one free port, one way to run a command (shared by the CLI,
operator and shutdown tests).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def clean_env(**settings: str) -> dict[str, str]:
    """
    This process's environment without the caller's ``POLYSTREAM_*`` (nor
    systemd's ``STATE_DIRECTORY``/``NOTIFY_SOCKET``), with JSON logs, then
    ``settings`` (variable name -> value).
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("POLYSTREAM_") and k not in ("STATE_DIRECTORY", "NOTIFY_SOCKET")
    }
    env.update({"POLYSTREAM_LOG__FORMAT": "json"} | settings)
    return env


def run_polystream(
    *args: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """
    ``python -m polystream ARGS`` to completion (``timeout`` seconds at most:
    a hang guard, raises ``subprocess.TimeoutExpired``); text stdout/stderr.
    """
    return subprocess.run(
        [sys.executable, "-m", "polystream", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )
