"""Rate-limit counts in a Redis that asks for a password: the password comes from a file, never the YAML.

A real ``redis-server --requirepass`` (tests/redis_server.py). The counts must land in
Redis itself: with a wrong or missing password Flask-Limiter would fall back to each
worker's memory, still answering 429, so the test looks into Redis.
"""

from __future__ import annotations

import secrets

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
