"""The role SQL db upgrade runs, or prints for an administrator (infra/db/roles.py)."""

from __future__ import annotations

import pytest

from infra.db import roles


class TestRoleStatements:
    def test_create_each_role_once_however_many_databases_or_upgrades_race(self) -> None:
        statements = roles.role_statements()

        for role in roles.ROLES:
            [create] = [s for s in statements if f"CREATE ROLE {role} " in s]
            assert "EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL" in create
        assert not [s for s in statements if "PASSWORD" in s]

    def test_set_only_the_passwords_given_as_quoted_literals(self) -> None:
        statements = roles.role_statements({roles.RUNTIME: "SCRAM-SHA-256$it's"})

        assert f"ALTER ROLE {roles.RUNTIME} PASSWORD 'SCRAM-SHA-256$it''s'" in statements
        assert not [s for s in statements if f"ALTER ROLE {roles.READONLY}" in s]

    def test_the_administrators_sql_grants_the_schema_and_says_what_else_to_do(self) -> None:
        sql = roles.admin_sql()

        assert f"GRANT USAGE, CREATE ON SCHEMA public TO {roles.MIGRATOR}" in sql
        assert f"GRANT {roles.MIGRATOR} TO <the role db upgrade connects as>" in sql


class TestMakeAppendOnly:
    @pytest.mark.parametrize("name", ["audit_log; DROP TABLE x", '"quoted"', "public.audit_log", ""])
    def test_takes_only_a_plain_table_name(self, name: str) -> None:
        with pytest.raises(ValueError, match="not a plain table name"):
            roles.make_append_only(name)
