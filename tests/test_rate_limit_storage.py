"""Rate-limit counts in a Redis that asks for a password: the password comes from a file, never the YAML.

A real ``redis-server --requirepass`` (tests/redis_server.py). The counts must land in
Redis itself: with a wrong or missing password Flask-Limiter would fall back to each
worker's memory, still answering 429, so the test looks into Redis.
"""

from __future__ import annotations

import secrets
import socket

import pytest

from est_app import create_app
from est_app.config import ConfigError

from .redis_server import RedisServer


@pytest.fixture(scope="module")
def redis_with_password(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis-auth"), password=secrets.token_urlsafe(18))
    server.start()
    yield server
    server.stop()


def test_a_storage_uri_holding_a_password_is_refused_in_one_line(make_settings):
    with pytest.raises(ConfigError) as caught:
        make_settings(rate_limit={"storage_uri": "redis://:s3cret@127.0.0.1:6379/0"})
    message = str(caught.value)
    assert "\n" not in message and "s3cret" not in message
    assert "rate_limit: storage_uri holds a password" in message and "rate_limit.storage_password_file" in message


def test_storage_password_file_is_for_redis_only(make_settings, tmp_path):
    with pytest.raises(ConfigError, match="storage_password_file is for a redis"):
        make_settings(rate_limit={"storage_uri": "memory://", "storage_password_file": str(tmp_path / "redis-password")})


def test_counts_go_to_a_redis_with_a_password_from_its_file(make_settings, redis_with_password, tmp_path):
    password_file = tmp_path / "redis-password"
    password_file.write_text(redis_with_password.password + "\n")
    password_file.chmod(0o600)
    limit = {"enabled": True, "limit": "2 per hour", "storage_uri": redis_with_password.url, "storage_password_file": str(password_file)}
    client = create_app(make_settings(rate_limit=limit)).test_client()
    statuses = [client.get("/.well-known/est/cacerts").status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    assert redis_with_password.client().dbsize() > 0, "the counts stayed in the worker's memory: Redis refused the password"


def test_exempt_routes_stay_unthrottled_and_the_rest_exactly_counted_while_the_storage_is_unreachable(make_app):
    """Redis not answering: each worker counts in memory (Flask-Limiter's fallback). /healthz, /ocsp and
    /crl must stay exempt there too (FreeRADIUS asks for every pump from one address); cacerts is counted exactly."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = make_app(rate_limit={"enabled": True, "limit": "3 per hour", "storage_uri": f"redis://127.0.0.1:{port}/0"})
    client = app.test_client()
    assert [client.get("/.well-known/est/cacerts").status_code for _ in range(4)] == [200, 200, 200, 429]
    for _ in range(6):
        assert client.get("/healthz").status_code == 200
        assert client.get("/crl").status_code == 200
        assert client.post("/ocsp", data=b"\x30\x00", headers={"Content-Type": "application/ocsp-request"}).status_code == 200
    assert client.get("/.well-known/est/cacerts").status_code == 429
