"""accessflow decide-bulk refuses a selection it cannot sign before it reads a key or touches the broker."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from infra.cli.main import main


class TestDecideBulkRefuses:
    @pytest.mark.parametrize(
        "selection",
        [[], ["--ids", "1b4e28ba-2fa1-41d2-883f-0016d3cca427", "--plan", "gold"]],
        ids=["nothing-selected", "ids-and-a-filter"],
    )
    def test_no_selection_or_two_at_once(self, selection: list[str]) -> None:
        # When the admin names no requests, or ids and a filter together
        result = CliRunner().invoke(
            main, ["decide-bulk", "approve", "--reason", "r", *selection, "--admin", "dana"]
        )

        # Then it is a usage error that says what to give
        assert result.exit_code == 2
        assert "give --ids, or a filter: --plan, --consumer, --older-than" in result.output

    def test_a_reason_is_required(self) -> None:
        result = CliRunner().invoke(main, ["decide-bulk", "reject", "--plan", "gold", "--admin", "dana"])
        assert result.exit_code == 2 and "--reason" in result.output

    def test_an_unreadable_time(self) -> None:
        result = CliRunner().invoke(
            main, ["decide-bulk", "reject", "--reason", "r", "--older-than", "last week", "--admin", "dana"]
        )
        assert result.exit_code == 2 and "--older-than" in result.output
