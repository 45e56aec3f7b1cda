"""Serving under gunicorn: the options derived from the YAML, and ``est-server``.

``deploy/gunicorn.conf.py`` and the ``est-server --config FILE`` entry point
both take their gunicorn settings from :func:`gunicorn_options`, so bind,
workers and TLS are configured in one place, the YAML.
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
from pathlib import Path

from gunicorn.app.base import BaseApplication
from gunicorn.util import parse_address

from . import metrics
from .ca import load_authorities
from .config import ConfigError, Settings, load_config
from .worker import worker_class

TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


# TLS 1.2 only with forward secrecy and an AEAD cipher (no CBC, no static RSA); TLS 1.3 suites are all AEAD.
# libest (TLS 1.2 at most) negotiates ECDHE with AES-GCM.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def gunicorn_options(settings: Settings) -> dict:
    """gunicorn settings for ``settings``: est_app.worker's worker (greenlets, app threads), TLS from the YAML."""
    server, tls = settings.server, settings.tls
    options = {
        "bind": [server.bind],
        "workers": server.workers,
        "worker_class": worker_class(settings),
        "worker_connections": server.max_connections,
        "keepalive": server.keepalive,
        "timeout": server.timeout,
        "graceful_timeout": server.graceful_timeout,
        "accesslog": "-" if server.access_log else None,
        "errorlog": "-",
        "loglevel": settings.log_level.lower(),
        # gunicorn's runtime control socket is not needed, and would collide between instances.
        "control_socket_disable": True,
        **metrics.gunicorn_hooks(),  # PROMETHEUS_MULTIPROC_DIR for the workers' metrics
    }
    if tls.cert_file:
        minimum = TLS_VERSIONS[tls.min_version]
        # Client certificates are requested, never required (Basic-auth clients have none), and
        # must chain to a CA issuing here, a label's own too (device re-enrollment), or to
        # tls.client_ca_file (RA certificates).
        cas = [settings.ca, *(label.ca for label in settings.labels.values() if label.ca)]
        cas += [previous for ca in cas for previous in ca.previous]  # retired by a rollover: their devices re-enroll
        anchors = [p for p in (*(f for ca in cas for f in (ca.cert_file, ca.chain_file)), tls.client_ca_file) if p]

        def ssl_context(conf, default_ssl_context_factory):
            # Called in the master when it starts or reloads (HUP), not per worker (est_app.worker): one set of
            # TLS session-ticket keys for all workers; renewed files take effect at a reload or restart.
            context = default_ssl_context_factory()
            context.minimum_version = minimum
            context.set_ciphers(TLS12_CIPHERS)
            for anchor in anchors:
                context.load_verify_locations(cafile=str(anchor))
            context.verify_mode = ssl.CERT_OPTIONAL
            return context

        options.update(certfile=str(tls.cert_file), keyfile=str(tls.key_file), ssl_context=ssl_context)
    return options


def check_bind(bind: str) -> None:
    """Refuse at once, in one line, an address that cannot be listened on (gunicorn retries for 5 s, exits 1)."""
    address = parse_address(bind)
    if not isinstance(address, tuple):
        return  # a Unix socket path: gunicorn reports it
    with socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn does: TIME_WAIT is no obstacle
        try:
            probe.bind(address)
        except OSError as exc:
            raise ConfigError(f"server.bind {bind}: cannot listen there: {exc.strerror or exc}") from None


class ESTServer(BaseApplication):
    """gunicorn running ``create_app(config)`` with the options from the same file."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.settings = load_config(config_path)
        load_authorities(self.settings)  # fail here, once, rather than in every worker
        check_bind(self.settings.server.bind)
        super().__init__()

    def load_config(self) -> None:
        for key, value in gunicorn_options(self.settings).items():
            self.cfg.set(key, value)

    def load(self):
        from . import create_app

        return create_app(self.config_path)


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``est-server --config FILE``."""
    parser = argparse.ArgumentParser(prog="est-server", description="Serve EST over HTTPS with gunicorn.")
    parser.add_argument("--config", default=os.environ.get("EST_CONFIG"), help="YAML configuration (default: $EST_CONFIG)")
    args = parser.parse_args(argv)
    if not args.config:
        parser.error("--config FILE (or $EST_CONFIG) is required")
    try:
        server = ESTServer(Path(args.config).resolve())
    except ConfigError as exc:
        parser.exit(2, f"est-server: {exc}\n")
    server.run()
