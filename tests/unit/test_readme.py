"""The README is the operator's manual: it must not drift from the code."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from infra.cli.main import main
from infra.settings import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


class TestTheSettingsTable:
    def test_lists_every_setting_and_nothing_else(self) -> None:
        documented = set(re.findall(r"^\| `(ACCESSFLOW_[A-Z0-9_]+)` \|", README, flags=re.MULTILINE))
        actual = {f"ACCESSFLOW_{name.upper()}" for name in Settings.model_fields}
        assert documented == actual


class TestTheCliTable:
    def test_names_only_commands_that_exist(self) -> None:
        rows = re.findall(r"^\| `([a-z][a-z ]+?)(?: [A-Z\[].*?)?` \|", README, flags=re.MULTILINE)
        assert len(rows) >= 10
        for command in rows:
            result = CliRunner().invoke(main, [*command.split(), "--help"])
            assert result.exit_code == 0, f"`accessflow {command}` from the README: {result.output}"
