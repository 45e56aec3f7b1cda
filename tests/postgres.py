"""A throwaway PostgreSQL cluster for the tests: Debian's ``postgresql`` package, initdb into a temp dir.

The cluster listens on a free loopback port (and a socket in its own directory),
asks TCP clients for a password (scram-sha-256) and runs as an unprivileged
user: ``postgres`` when the tests run as root (initdb refuses root), else the
current user. It is stopped at the end; nothing on the machine is used or left.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

from sqlalchemy.engine import URL, make_url

ROLE = "est"


def database_section(url: str, directory: Path) -> dict:
    """The YAML ``database`` section for a SQLAlchemy URL: a password in it moves to a file in
    ``directory`` (``database.password_file``), as configs must have it (a URL holding one is refused)."""
    parsed = make_url(url)
    if parsed.password is None:
        return {"url": url}
    password_file = directory / f"{parsed.username}.password"
    password_file.write_text(str(parsed.password))
    password_file.chmod(0o600)
    bare = URL.create(parsed.drivername, parsed.username, None, parsed.host, parsed.port, parsed.database)
    return {"url": bare.render_as_string(), "password_file": str(password_file)}


def server_bin() -> Optional[Path]:
    """The newest installed server's bin directory (/usr/lib/postgresql/N/bin), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresCluster:
    """One cluster: :meth:`start`, :meth:`stop` (and start again: same data), :meth:`create_database`, :meth:`url`."""

    def __init__(self) -> None:
        bindir = server_bin()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed (Debian package postgresql; .ci/run installs it)")
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="est-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "run"
        self.socket_dir.mkdir()
        self.port = _free_port()
        self.password = secrets.token_urlsafe(18)
        self.password_file = self.root / "password"  # for database.password_file; readable by the tests' user only
        self.password_file.write_text(self.password + "\n")
        self.password_file.chmod(0o600)
        self._as_root = os.geteuid() == 0
        if self._as_root:
            shutil.chown(self.root, "postgres")
            shutil.chown(self.socket_dir, "postgres")
        pwfile = self.root / "initdb-password"
        pwfile.write_text(self.password + "\n")
        if self._as_root:
            shutil.chown(pwfile, "postgres")
        self._run(
            "initdb", "-D", str(self.data), "-U", ROLE, f"--pwfile={pwfile}",
            "--auth-host=scram-sha-256", "--auth-local=trust", "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync",
        )
        pwfile.unlink()
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                f"listen_addresses = '127.0.0.1'\nport = {self.port}\nunix_socket_directories = '{self.socket_dir}'\n"
                "max_connections = 300\nfsync = on\nlog_min_messages = warning\n"
            )
        self._databases = 0

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(self.bindir / tool), *args]
        if self._as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, check=check, capture_output=True, text=True, cwd=self.root)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``immediate``: as if it crashed); the data stays for :meth:`start`."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL as the cluster's superuser over the socket; returns psql's unaligned output."""
        result = self._run("psql", "-h", str(self.socket_dir), "-p", str(self.port), "-U", ROLE, "-d", database,
                           "-v", "ON_ERROR_STOP=1", "-At", "-c", sql)
        return result.stdout.strip()

    def create_database(self, name: Optional[str] = None) -> str:
        """A new empty database; returns its name."""
        self._databases += 1
        name = name or f"est_{self._databases}"
        self.psql(f'CREATE DATABASE "{name}"')
        return name

    def url(self, database: str, password: bool = True) -> str:
        """A SQLAlchemy URL over TCP; without the password for configs that give it in ``database.password_file``."""
        secret = f":{self.password}" if password else ""
        return f"postgresql+psycopg://{ROLE}{secret}@127.0.0.1:{self.port}/{database}"
