"""Alembic: the initial migration creates every table and the downgrade removes them, on both backends."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from service.migrate import current_revision, downgrade, upgrade
from service.models import Base
from tests.service.conftest import POSTGRES_URL, postgres_schema_url


@pytest.fixture(params=["sqlite", "postgres"])
def empty_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'm.db'}"
        return
    schema = f"lp_mig_{tmp_path.name[-12:].replace('-', '_').lower()}"
    admin = sa.create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    yield postgres_schema_url(schema)
    with admin.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


def _tables(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _columns(url: str, table: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return {c["name"] for c in sa.inspect(engine).get_columns(table)}
    finally:
        engine.dispose()


HEAD = "0002_device_queue"  # the newest migration


def test_upgrade_downgrade_round_trip(empty_url):
    assert current_revision(empty_url) is None
    upgrade(empty_url)
    assert current_revision(empty_url) == HEAD
    assert _tables(empty_url) == set(Base.metadata.tables) | {"alembic_version"}
    # The migration and the models agree column by column.
    for name, table in Base.metadata.tables.items():
        assert _columns(empty_url, name) == {c.name for c in table.columns}, name
    downgrade(empty_url)
    assert current_revision(empty_url) is None
    assert _tables(empty_url) == {"alembic_version"}
    upgrade(empty_url)
    assert current_revision(empty_url) == HEAD
