"""Shared fixtures."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

# --- PostgreSQL --------------------------------------------------------------------------------

PG_SERVER_ENV = "CVAE_SEARCH_TEST_PG"
PG_SERVER_DEFAULT = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session (dropped afterwards), as a SQLAlchemy URL.

    The server is ``$CVAE_SEARCH_TEST_PG`` (a maintenance database URL on it). Unreachable, the
    tests that need it skip, or fail when ``CI=true``.
    """
    import psycopg2
    from psycopg2 import sql
    from sqlalchemy.engine import make_url

    server = os.environ.get(PG_SERVER_ENV, PG_SERVER_DEFAULT)
    try:
        admin = psycopg2.connect(server, connect_timeout=5)
    except psycopg2.OperationalError as e:
        message = f"PostgreSQL at {server} ({PG_SERVER_ENV}) is unreachable: {' '.join(str(e).split())}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    admin.autocommit = True
    name = f"cvae_test_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = make_url(server).set(drivername="postgresql+psycopg2", database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.close()
