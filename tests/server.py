"""Run the real server for end-to-end tests and benchmarks: gunicorn, TLS, a loopback port.

``start_server`` takes a directory made by `est init`, writes a config.yaml
beside its own with the given overrides and a free port, starts
``est-server`` (or gunicorn with deploy/gunicorn.conf.py) and waits until
``cacerts`` answers over TLS.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    url: str  # https://127.0.0.1:PORT
    port: int
    config: Path
    ca_file: Path
    process: subprocess.Popen
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def alive(self) -> bool:
        return self.process.poll() is None


def write_config(pki_dir: Path, path: Path, port: int, **overrides) -> Path:
    data = yaml.safe_load((pki_dir / "config.yaml").read_text())
    data["server"] = {**data.get("server", {}), "bind": f"127.0.0.1:{port}"}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path.write_text(yaml.safe_dump(data))
    return path


def start_server(
    pki_dir: Path, workdir: Path, *, use_gunicorn_conf: bool = False, wrapper: Sequence[str] = (), **overrides
) -> RunningServer:
    """Start the server on a free port; ``overrides`` are merged into `est init`'s config.

    ``wrapper`` is a command that runs the server command given as its arguments (e.g. to restrict it).
    """
    port = free_port()
    config = write_config(pki_dir, workdir / f"config-{port}.yaml", port, **overrides)
    env = {**os.environ, "EST_CONFIG": str(config)}
    if use_gunicorn_conf:
        cmd = [str(BIN / "gunicorn"), "-c", str(REPO / "deploy" / "gunicorn.conf.py"), "wsgi:app"]
    else:
        cmd = [str(BIN / "est-server"), "--config", str(config)]
    log = workdir / f"server-{port}.log"
    process = subprocess.Popen([*wrapper, *cmd], cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    server = RunningServer(f"https://127.0.0.1:{port}", port, config, pki_dir / "ca.pem", process, log)
    context = ssl.create_default_context(cafile=str(server.ca_file))
    deadline = time.monotonic() + 30
    while True:
        if not server.alive():
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{server.url}/.well-known/est/cacerts", context=context, timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"server did not answer within 30 s:\n{log.read_text()}")
        time.sleep(0.1)
