"""The benchmarks' bare reference: a plain Flask view returning a fixed body, served by est-server's own
gunicorn worker class, TLS and settings (``est_app.server.gunicorn_options`` of the same YAML).

What an answer costs on it is the framework's share (gunicorn, TLS, the greenlet-to-app-thread
hand-off, Flask's dispatch); est_app's cost is what an EST request costs above it.

    python -m tests.benchmarks.bare_reference --config FILE     # serves until SIGTERM
"""

from __future__ import annotations

import argparse
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from flask import Flask, Response
from gunicorn.app.base import BaseApplication

if __package__ in (None, ""):  # run as a path: make `tests` and `est_app` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from est_app.config import load_config  # noqa: E402
from est_app.server import gunicorn_options  # noqa: E402
from tests.server import REPO, RunningServer, free_port, write_config  # noqa: E402

BODY = b"M" * 1000 + b"\n"  # about the size of a base64 certs-only enrollment answer
START_SECONDS = 60


def bare_app() -> Flask:
    """Every path, GET or POST: 200 with :data:`BODY`, reading nothing (the worker has read the body)."""
    app = Flask(__name__)

    @app.route("/", defaults={"path": ""}, methods=["GET", "POST"])
    @app.route("/<path:path>", methods=["GET", "POST"])
    def fixed(path: str) -> Response:
        return Response(BODY, content_type="text/plain")

    return app


class BareServer(BaseApplication):
    def __init__(self, config: Path) -> None:
        self.settings = load_config(config)
        super().__init__()

    def load_config(self) -> None:
        for key, value in gunicorn_options(self.settings).items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        return bare_app()


def start_bare_reference(pki_dir: Path, workdir: Path, **overrides) -> RunningServer:
    """The bare reference on a free loopback port, with ``pki_dir``'s config and ``overrides`` (as tests.server.start_server)."""
    port = free_port()
    config = write_config(pki_dir, workdir / f"bare-{port}.yaml", port, **overrides)
    log = workdir / f"bare-{port}.log"
    process = subprocess.Popen([sys.executable, "-m", "tests.benchmarks.bare_reference", "--config", str(config)], cwd=REPO,
                               stdout=log.open("wb"), stderr=subprocess.STDOUT)  # fmt: skip
    server = RunningServer(f"https://127.0.0.1:{port}", port, config, pki_dir / "ca.pem", process, log)
    context = ssl.create_default_context(cafile=str(server.ca_file))
    deadline = time.monotonic() + START_SECONDS
    while True:
        try:
            with urllib.request.urlopen(f"{server.url}/", context=context, timeout=5) as answer:
                if answer.read() == BODY:
                    return server
        except OSError:
            pass
        if not server.alive() or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"the bare reference did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(prog="bare_reference", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    BareServer(parser.parse_args().config).run()


if __name__ == "__main__":
    main()
