"""The end-to-end launcher itself (tests/server.py): a port taken by another process between
``free_port`` and the server's bind is given up for another, not reported as a failed start.
"""

from __future__ import annotations

import socket

from . import server as server_module
from .e2e_clients import call


def test_a_port_taken_before_the_server_binds_is_given_up_for_another(pki_dir, tmp_path, monkeypatch):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken])
        real_free_port = server_module.free_port
        monkeypatch.setattr(server_module, "free_port", lambda: next(ports, None) or real_free_port())
        server = server_module.start_server(pki_dir, tmp_path, database={"url": f"sqlite:///{tmp_path / 'est.db'}"})
        try:
            assert server.port != taken
            assert "in use" in (tmp_path / f"server-{taken}.log").read_text()  # the first try met the squatter
            assert call(server, "cacerts").status == 200
        finally:
            server.stop()
