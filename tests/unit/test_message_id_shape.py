"""The shape of a message id: what the edge accepts always fits where the guard writes it."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa

from infra.db import orm
from infra.messaging.envelope import MAX_MESSAGE_ID_CHARS, body_id, is_message_id


def message_id_columns() -> list[sa.Column[str]]:
    return [table.c.message_id for table in orm.metadata.tables.values() if "message_id" in table.c]


class TestTheIdsTheEdgeAccepts:
    def test_fit_every_message_id_column(self) -> None:
        # Given every column that stores a message id (counters, dead letters, refusals, the inbox)
        columns = message_id_columns()
        assert columns

        # Then the longest id the edge accepts, and the name a refusal is kept under, fit each
        for column in columns:
            assert isinstance(column.type, sa.String) and column.type.length is not None
            assert column.type.length >= max(MAX_MESSAGE_ID_CHARS, len(body_id(b""))), column

    @pytest.mark.parametrize(
        "value",
        [str(uuid.uuid4()), uuid.uuid4().hex, body_id(b"x"), "a", "a" * MAX_MESSAGE_ID_CHARS, "msg-1.2_3:4"],
    )
    def test_include_uuids_hashes_and_dotted_names(self, value: str) -> None:
        assert is_message_id(value)

    @pytest.mark.parametrize(
        "value",
        [
            "",
            "a" * (MAX_MESSAGE_ID_CHARS + 1),
            "a" * 201,
            "-a",
            ".a",
            "a b",
            "a\n",
            "a\x00",
            "ä",
            1,
            None,
            b"a",
        ],
    )
    def test_exclude_the_long_the_unprintable_and_what_is_no_string(self, value: object) -> None:
        assert not is_message_id(value)
