"""A throwaway PostgreSQL server from Debian's packages (initdb, pg_ctl), on loopback, trusting local
connections: for the review store's tests and its load bench. Run as the `postgres` user when this
process is root (PostgreSQL refuses to run as root)."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


class PostgresUnavailable(RuntimeError):
    """Why no server could be started here (the tests skip, saying so)."""


def _bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)),
                                       None)
    if found is None:
        raise PostgresUnavailable(f"no {name}: install Debian's postgresql package")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalPostgres:
    """`with LocalPostgres() as pg: pg.database("name")` -> a SQLAlchemy URL of a new, empty database."""

    def __enter__(self) -> LocalPostgres:
        try:
            import psycopg  # noqa: F401 - the driver the URLs name
        except ImportError as e:
            raise PostgresUnavailable(f"no psycopg driver ({e})") from e
        initdb, self._pg_ctl = _bin("initdb"), _bin("pg_ctl")
        self.dir = Path(tempfile.mkdtemp(prefix="scoft-pg-"))
        self._as = []
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.dir, "postgres")
        self.port = _free_port()
        data = self.dir / "data"
        self._run([initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"], "initdb")
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._data = data
        self._run([self._pg_ctl, "-D", str(data), "-o", options, "-l", str(self.dir / "log"), "-w", "-t", "60",
                   "start"], "pg_ctl start")
        return self

    def _run(self, cmd: list[str], what: str) -> None:
        try:
            out = subprocess.run([*self._as, *cmd], capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise PostgresUnavailable(f"{what}: {e}") from e
        if out.returncode != 0:
            log = (self.dir / "log").read_text()[-500:] if (self.dir / "log").is_file() else ""
            raise PostgresUnavailable(f"{what} failed: {(out.stderr or out.stdout).strip()[-500:]} {log}")

    def database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def __exit__(self, *exc) -> None:
        if getattr(self, "_data", None) is not None:
            subprocess.run([*self._as, self._pg_ctl, "-D", str(self._data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)
