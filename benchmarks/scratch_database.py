"""A throwaway PostgreSQL database for the service benchmarks."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url


@contextmanager
def scratch_database(admin_url: str) -> Iterator[tuple[str, str]]:
    """Create a new database on the server of ``admin_url`` and yield its name and URL; drop it (and
    its connections) afterwards, whatever happened."""
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"dosebench_bench_{uuid.uuid4().hex[:10]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield name, make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
