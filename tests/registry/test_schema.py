"""The models and the alembic migrations agree, on SQLite and PostgreSQL; the schema
is created only by migrations; SCHEMA_HEAD (the cheap check) matches alembic's head."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from registry.api import Registry
from registry.db import SCHEMA_HEAD, alembic_config, current_revision
from registry.errors import RegistryError
from registry.models import Base


def test_schema_head_constant_matches_alembic():
    from alembic.script import ScriptDirectory

    assert ScriptDirectory.from_config(alembic_config()).get_heads() == [SCHEMA_HEAD]


def test_models_match_migrations(reg):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    assert current_revision(reg.engine) == SCHEMA_HEAD
    with reg.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_models_differing_from_migrations_are_detected(reg):
    """The check above can fail: an extra model column shows up as a difference."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import Column, Integer, MetaData

    md = MetaData()
    for t in Base.metadata.tables.values():
        t.to_metadata(md)
    md.tables["versions"].append_column(Column("extra", Integer))
    with reg.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), md)
    assert any(d[0] == "add_column" and d[3].name == "extra" for d in diff)


def test_db_upgrade_command_on_fresh_sqlite(tmp_path):
    from click.testing import CliRunner

    from adapters_cli.main import cli

    res = CliRunner().invoke(cli, ["db", "upgrade", "--home", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    assert f'"to": "{SCHEMA_HEAD}"' in res.stdout and '"from": null' in res.stdout
    res = CliRunner().invoke(cli, ["db", "upgrade", "--home", str(tmp_path)])
    assert res.stdout.strip() == f"schema already at {SCHEMA_HEAD}"


def test_outdated_server_schema_asks_for_upgrade(reg, db_url, registry_home):
    if db_url is None:
        pytest.skip("the embedded SQLite store upgrades itself")
    with reg.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0000_old'"))
    with pytest.raises(RegistryError, match="run `adapters db upgrade`"):
        Registry.open(home=registry_home, db_url=db_url)
