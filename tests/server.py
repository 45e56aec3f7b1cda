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
from typing import Sequence
from pathlib import Path
from typing import Sequence

import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# Start-up takes 2-4 s on this 2-core machine at load 10; the bounds leave room for far worse.
START_SECONDS = 120
PROBE_SECONDS = 10
PORT_ATTEMPTS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(process: subprocess.Popen | None) -> None:
    """SIGTERM, then SIGKILL after 15 s: a server, proxy or database the tests started."""
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class RunningServer:
    url: str  # https://127.0.0.1:PORT
    port: int
    config: Path
    ca_file: Path
    process: subprocess.Popen
    log: Path

    def stop(self) -> None:
        stop_process(self.process)

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
    pki_dir: Path, workdir: Path, *, use_gunicorn_conf: bool = False, venv: Path | None = None,
    wrapper: Sequence[str] = (), **overrides
) -> RunningServer:
    """Start the server on a free port; ``overrides`` are merged into `est init`'s config.

    ``wrapper`` is a command that runs the server command given as its arguments (e.g. to restrict it).
    With ``venv``, that virtualenv's ``est-server`` runs in ``workdir``, away from the checkout.
    A port that another process takes between ``free_port`` and the server's bind is
    given up for another; any other failure to start is raised with the server's log.
    """
    for _ in range(PORT_ATTEMPTS):
        server = _launch(pki_dir, workdir, free_port(), use_gunicorn_conf, venv, wrapper, overrides)
        if _answers(server):
            return server
    raise RuntimeError(f"server found its port taken {PORT_ATTEMPTS} times:\n{server.log.read_text()}")


def _launch(pki_dir: Path, workdir: Path, port: int, use_gunicorn_conf: bool, venv: Path | None, wrapper: Sequence[str], overrides: dict) -> RunningServer:
    config = write_config(pki_dir, workdir / f"config-{port}.yaml", port, **overrides)
    env = {**os.environ, "EST_CONFIG": str(config)}
    bin_dir, cwd = (venv / "bin", workdir) if venv else (BIN, REPO)
    if use_gunicorn_conf:
        cmd = [str(bin_dir / "gunicorn"), "-c", str(REPO / "deploy" / "gunicorn.conf.py"), "wsgi:app"]
    else:
        cmd = [str(bin_dir / "est-server"), "--config", str(config)]
    log = workdir / f"server-{port}.log"
    process = subprocess.Popen([*wrapper, *cmd], cwd=cwd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    return RunningServer(f"https://127.0.0.1:{port}", port, config, pki_dir / "ca.pem", process, log)


def _answers(server: RunningServer) -> bool:
    """Wait until ``cacerts`` answers over TLS (True), or the server gives up its port because it is taken (False)."""
    context = ssl.create_default_context(cafile=str(server.ca_file))
    deadline = time.monotonic() + START_SECONDS
    while True:
        if not server.alive():
            log = server.log.read_text()
            if "in use" in log:  # gunicorn: "Connection in use"; est-server: "... Address already in use"
                return False
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{log}")
        try:
            with urllib.request.urlopen(f"{server.url}/.well-known/est/cacerts", context=context, timeout=PROBE_SECONDS) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"server did not answer within {START_SECONDS} s:\n{server.log.read_text()}")
        time.sleep(0.1)
