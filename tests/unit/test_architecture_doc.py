"""The README's architecture section names every module of infra/, room by room, and nothing else."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def documented_modules() -> set[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("`infra/`, room by room.") :]
    block = section[section.index("```\n") + 4 :]
    block = block[: block.index("```")]
    found: set[str] = set()
    room = ""
    for line in block.splitlines():
        if match := re.match(r"^(infra/(?:\w+/)?)(\S*)", line):
            room, name = match.group(1), match.group(2)
            if name:
                found.add(room + name.rstrip(","))
            elif room.endswith("/") and room != "infra/":
                found.add(room)
        elif line.startswith("  "):  # a room's modules: every name.py on the line is one of them
            found.update(room + name for name in re.findall(r"\b\w+\.py\b", line))
    return found


def modules_on_disk() -> set[str]:
    infra = ROOT / "infra"
    return {
        path.relative_to(ROOT).as_posix()
        for path in infra.rglob("*.py")
        if path.name != "__init__.py" and "migrations" not in path.parts
    }


def test_every_infra_module_is_in_the_architecture_section() -> None:
    documented = documented_modules()
    assert modules_on_disk() - documented == set()


def test_every_module_the_section_names_exists() -> None:
    named = {name for name in documented_modules() if name.endswith(".py")}
    assert {name for name in named if not (ROOT / name).exists()} == set()


def test_every_room_the_section_names_is_a_package() -> None:
    rooms = {name for name in documented_modules() if name.endswith("/")}
    assert rooms == {
        "infra/db/",
        "infra/messaging/",
        "infra/mail/",
        "infra/credentials/",
        "infra/gateway/",
        "infra/observability/",
        "infra/cli/",
        "infra/console/",
    }
    assert all((ROOT / room / "__init__.py").exists() for room in rooms)
