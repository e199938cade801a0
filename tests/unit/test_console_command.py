"""``accessflow console``: what it refuses before serving, and the password hashes it prints."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from infra.cli.main import main
from infra.console import auth
from infra.console.app import format_age


class TestHashPassword:
    def test_prints_a_scrypt_hash_of_the_password_on_stdin(self) -> None:
        result = CliRunner().invoke(main, ["console", "hash-password"], input="open sesame\n")
        assert result.exit_code == 0, result.output
        stored = result.output.strip()
        assert stored.startswith("scrypt$")
        assert auth.verify_password("open sesame", stored)
        assert not auth.verify_password("open sesame ", stored)

    def test_two_hashes_of_one_password_differ_by_their_salt(self) -> None:
        assert auth.hash_password("x") != auth.hash_password("x")


class TestServingRefuses:
    def test_without_a_session_secret(self) -> None:
        result = CliRunner().invoke(main, ["console"], env={"ACCESSFLOW_CONSOLE_SESSION_SECRET": ""})
        assert result.exit_code == 2
        assert "ACCESSFLOW_CONSOLE_SESSION_SECRET" in result.output

    def test_without_an_admins_file(self) -> None:
        env = {"ACCESSFLOW_CONSOLE_SESSION_SECRET": "s" * 32, "ACCESSFLOW_CONSOLE_ADMINS_FILE": ""}
        result = CliRunner().invoke(main, ["console"], env=env)
        assert result.exit_code == 2
        assert "ACCESSFLOW_CONSOLE_ADMINS_FILE" in result.output

    def test_with_a_malformed_admins_file(self, tmp_path: Path) -> None:
        path = tmp_path / "admins.json"
        path.write_text('[{"admin_id": "dana", "password_hash": "plain"}]')
        env = {"ACCESSFLOW_CONSOLE_SESSION_SECRET": "s" * 32, "ACCESSFLOW_CONSOLE_ADMINS_FILE": str(path)}
        result = CliRunner().invoke(main, ["console"], env=env)
        assert result.exit_code == 1
        assert "needs admin_id, password_hash, key_file and key_id" in result.output


class TestAges:
    def test_read_as_a_person_reads_them(self) -> None:
        assert [format_age(s) for s in (None, 40, 300, 5 * 3600 + 120, 3 * 86400 + 4 * 3600)] == [
            "",
            "40s",
            "5m",
            "5h 2m",
            "3d 4h",
        ]
