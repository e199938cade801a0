"""The CLI's tables (rich): what a script reads from them when they are piped."""

from __future__ import annotations

import click
from click.testing import CliRunner

from infra.cli.common import print_table


@click.command()
def _table() -> None:
    print_table(
        ["id", "attempts", "last error"],
        [("row-1", 3, "[Errno 111] refused " + "x" * 300), ("row-2", None, "")],
        empty="nothing",
    )


@click.command()
def _empty() -> None:
    print_table(["id"], [], empty="no rows")


class TestAPipedTable:
    def test_keeps_each_row_on_one_line_whatever_its_width(self) -> None:
        result = CliRunner().invoke(_table)
        assert result.exit_code == 0, result.output
        [line] = [line for line in result.output.splitlines() if "row-1" in line]
        assert "[Errno 111] refused " + "x" * 300 in line

    def test_prints_brackets_and_colons_as_they_are(self) -> None:
        # rich would read "[Errno 111]" as markup, and ":smile:" as an emoji, unless told not to
        assert "[Errno 111]" in CliRunner().invoke(_table).output

    def test_has_a_header_and_a_row_per_item(self) -> None:
        lines = [line for line in CliRunner().invoke(_table).output.splitlines() if line.strip()]
        assert lines[0].split() == ["id", "attempts", "last", "error"]
        assert [line.split()[0] for line in lines[2:]] == ["row-1", "row-2"]

    def test_says_so_when_there_is_nothing(self) -> None:
        assert CliRunner().invoke(_empty).output == "no rows\n"
