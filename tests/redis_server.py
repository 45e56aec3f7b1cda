"""A throwaway Redis for the tests: Debian's ``redis-server`` on a free loopback port, nothing written to disk.

Started with ``--save "" --appendonly no`` (no snapshots, no append-only file),
stopped at the end; it can be stopped and started again on the same port, as
an outage and a recovery.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from .server import free_port, stop_process


class RedisServer:
    """``password``: started with ``--requirepass`` (clients then AUTH)."""

    def __init__(self, workdir: Path, password: str | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (Debian package redis-server; .ci/run installs it)")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.log = workdir / "redis.log"
        self.process: subprocess.Popen | None = None
        self.password = password

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30) -> None:
        command = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(self.workdir), "--logfile", "", *(("--requirepass", self.password) if self.password else ()),
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        import redis

        client = self.client()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                if client.ping():
                    return
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer within {timeout} s:\n{self.log.read_text()}")
            time.sleep(0.1)

    def client(self):
        """A redis-py client of this server (authenticated when it has a password)."""
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=2)

    def stop(self) -> None:
        stop_process(self.process)
