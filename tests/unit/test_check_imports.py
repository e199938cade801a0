"""scripts/check_imports.py finds each kind of broken import rule, and nothing in a tree that keeps them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_checker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_imports", ROOT / "scripts" / "check_imports.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_imports"] = module
    spec.loader.exec_module(module)
    return module


checker = load_checker()


def tree(root: Path, files: dict[str, str]) -> Path:
    for package in checker.PACKAGES:
        (root / package).mkdir(parents=True, exist_ok=True)
        (root / package / "__init__.py").touch()
    for name, text in files.items():
        (root / name).write_text(text)
    return root


def test_a_tree_that_keeps_the_rules_has_no_findings(tmp_path: Path) -> None:
    root = tree(
        tmp_path,
        {
            "domain/model.py": "import enum\nfrom datetime import datetime\n",
            "domain/handlers.py": "from domain import model\nfrom domain.model import datetime\n",
            "messages/v1.py": "import pydantic\nfrom domain import model\n",
            "infra/db.py": "import sqlalchemy\nfrom domain import handlers\nfrom messages import v1\n",
            "infra/cli.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from workers import actors\n",
            "workers/actors.py": "from infra import db\n\ndef run() -> None:\n    import json\n",
        },
    )
    assert checker.findings(root) == []


@pytest.mark.parametrize(
    ("files", "finding"),
    [
        (
            {"domain/model.py": "import sqlalchemy\n"},
            "domain imports beyond the standard library: domain/model.py imports sqlalchemy",
        ),
        (
            {"domain/model.py": "from infra import db\n", "infra/db.py": ""},
            "domain imports beyond the standard library: domain/model.py imports infra.db",
        ),
        (
            {"messages/v1.py": "from workers import actors\n", "workers/actors.py": ""},
            "messages imports workers: messages/v1.py imports workers.actors",
        ),
        (
            {"infra/cli.py": "def main() -> None:\n    from infra import demo\n", "infra/demo.py": ""},
            "function import: infra/cli.py:main imports infra.demo",
        ),
        (
            {
                "infra/a.py": "from infra import b\n",
                "infra/b.py": "import infra.c\n",
                "infra/c.py": "from infra.a import x\n",
            },
            "import cycle: infra.a <-> infra.b <-> infra.c",
        ),
        (
            {"infra/producer.py": "from workers.registry import explain\n", "workers/registry.py": ""},
            "infra imports workers outside the composition root: infra/producer.py imports workers.registry",
        ),
        (
            # Importing a package's module from outside runs the package's __init__ too.
            {
                "workers/__init__.py": "from workers import actors\n",
                "workers/actors.py": "from infra import db\n",
                "infra/db.py": "import workers.actors\n",
            },
            "import cycle: infra.db <-> workers <-> workers.actors",
        ),
    ],
)
def test_each_broken_rule_is_found(tmp_path: Path, files: dict[str, str], finding: str) -> None:
    assert finding in checker.findings(tree(tmp_path, files))


def test_the_composition_root_may_import_workers(tmp_path: Path) -> None:
    files = {
        "infra/bootstrap.py": "from workers.actors import ACTORS\n",
        "workers/actors.py": "ACTORS = ()\n",
    }
    assert checker.findings(tree(tmp_path, files)) == []


def test_this_repository_breaks_no_rule() -> None:
    assert checker.findings(ROOT) == []
