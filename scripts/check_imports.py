"""Check the import rules of the four packages; ``make lint`` runs it, so CI does too.

The rules (README, "Architecture"):

- ``domain/`` imports only the standard library (and itself);
- ``messages/`` never imports ``infra/`` or ``workers/``;
- no import cycle among the modules of ``domain``, ``messages``, ``infra`` and ``workers``;
- no import inside a function: a cycle hidden that way is still a cycle, and a reader looks for
  a module's dependencies at its top;
- ``infra/`` imports ``workers/`` only in the composition root, :mod:`infra.bootstrap`, which
  registers the actors: the CLI, the producer and the adapters never depend on an actor.

Imports under ``if TYPE_CHECKING:`` are for the type checker only and count for none of these
(``workers.registry`` names ``infra.bootstrap.Services`` in its annotations that way).

Exit status 0 when every rule holds, 1 with one line per finding otherwise.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("domain", "messages", "infra", "workers")
#: Directories that are not modules of the application: Alembic's scripts run in its own context.
SKIPPED = ("infra/db/migrations",)

#: The one infra module that may import ``workers``: the composition root registers the actors.
COMPOSITION_ROOT = "infra.bootstrap"


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, dotted
    target: str  # what it imports, dotted, resolved
    path: Path
    line: int
    function: str | None  # the enclosing function, or None at module level


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_block(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _targets(
    node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: set[str]
) -> list[str]:
    """The modules an import statement imports: ``from infra import orm`` imports infra.db.orm."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: resolve against the importing module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, base] if base else package)
    named = [f"{base}.{alias.name}" for alias in node.names]
    return [target if target in modules else base for target in named]


def imports_of(path: Path, root: Path, modules: set[str]) -> Iterator[Import]:
    module = module_name(path, root)
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"

    def visit(node: ast.AST, function: str | None) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if _type_checking_block(child):
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                for target in dict.fromkeys(_targets(child, module, is_package, modules)):
                    yield Import(module, target, path, child.lineno, function)
            inner = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else function
            yield from visit(child, inner)

    yield from visit(tree, None)


def _stdlib(name: str) -> bool:
    return name.split(".")[0] in sys.stdlib_module_names or name == "__future__"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def _imported_modules(imp: Import, modules: set[str]) -> set[str]:
    """The modules an import runs: the target and, from outside a package, the package's ``__init__``."""
    parts = imp.target.split(".")
    found = {imp.target} if imp.target in modules else set()
    for i in range(1, len(parts)):
        package = ".".join(parts[:i])
        # From inside the package its __init__ has run already: that edge is no cycle.
        if package in modules and not (imp.module + ".").startswith(package + "."):
            found.add(package)
    found.discard(imp.module)
    return found


def findings(root: Path) -> list[str]:
    files = [
        path
        for package in PACKAGES
        for path in sorted((root / package).rglob("*.py"))
        if not any(path.relative_to(root).as_posix().startswith(skip) for skip in SKIPPED)
    ]
    modules = {module_name(path, root) for path in files}
    found: list[str] = []
    graph: dict[str, set[str]] = {module: set() for module in modules}
    for path in files:
        where = path.relative_to(root).as_posix()
        for imp in imports_of(path, root, modules):
            top = imp.target.split(".")[0]
            if imp.function is not None and not _stdlib(imp.target):
                found.append(f"function import: {where}:{imp.function} imports {imp.target}")
            if imp.module.split(".")[0] == "domain" and not (_stdlib(imp.target) or top == "domain"):
                found.append(f"domain imports beyond the standard library: {where} imports {imp.target}")
            if imp.module.split(".")[0] == "messages" and top in ("infra", "workers"):
                found.append(f"messages imports {top}: {where} imports {imp.target}")
            if imp.module.split(".")[0] == "infra" and top == "workers" and imp.module != COMPOSITION_ROOT:
                found.append(
                    f"infra imports workers outside the composition root: {where} imports {imp.target}"
                )
            if imp.function is None:
                graph[imp.module].update(_imported_modules(imp, modules))
    for cycle in _cycles(graph):
        found.append(f"import cycle: {' <-> '.join(cycle)}")
    return list(dict.fromkeys(found))


REPOSITORY = Path(__file__).resolve().parent.parent


def main() -> int:
    found = findings(REPOSITORY)
    for finding in found:
        print(finding)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
