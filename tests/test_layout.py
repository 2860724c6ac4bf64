"""The dom0 package's layout is its architecture (docs/ARCHITECTURE.md): imports go one way between the groups.

    cli -> api -> backup, restore -> qubes -> format -> base (errors, text)

A module may import its own group and any group below it; ``backup`` and ``restore`` do not import each other;
nothing imports the simulation package.  Imports inside functions and under ``TYPE_CHECKING`` count too: a lazy
import is still a dependency.  The check reads the source (ast), so it sees every import statement, not only
those a test run happens to execute.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "dom0" / "qubes_backup_dom0"
NAME = "qubes_backup_dom0"

# group -> rank; a module may import groups of a lower rank, and its own group
RANK = {"base": 0, "format": 1, "qubes": 2, "backup": 3, "restore": 3, "api": 4, "cli": 5}
BASE_MODULES = {"errors", "text", "__init__"}
FORBIDDEN_PACKAGES = ("qubes_backup_sim",)
# Still finding the simulator by importing it (issue 19 replaces this with the endpoints only): the only two.
SIM_IMPORTS_LEFT = {"qubes.system", "qubes.transport"}


def group_of(module: str) -> str:
    """The group of a dotted module name below the package (``format.crypto`` -> ``format``)."""
    head = module.split(".")[0]
    if head in BASE_MODULES or head == "":
        return "base"
    if head == "api":
        return "api"
    if head in RANK:
        return head
    raise AssertionError(f"module {module!r} is in no group of docs/ARCHITECTURE.md")


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    return ".".join(rel.parts)


def imported_modules(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import statement in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text() if source is None else source, str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] if node.level > 1 else package
                mod = ".".join([NAME, *base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            # "from pkg import submodule" imports the submodule
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
    return out


def violations(path: Path, source: str | None = None) -> list[str]:
    me = module_name(path)
    mine = group_of(me)
    bad = []
    for line, target in imported_modules(path, source):
        if target.startswith(FORBIDDEN_PACKAGES):
            if me in SIM_IMPORTS_LEFT:
                continue
            bad.append(f"{me}:{line} imports the simulation ({target})")
            continue
        if not target.startswith(NAME + "."):
            continue
        rest = target[len(NAME) + 1 :]
        parts = rest.split(".")
        # "from qubes_backup_dom0.format.crypto import Keys" -> format.crypto.Keys: the module is a prefix
        while parts and not (PKG.joinpath(*parts).with_suffix(".py").exists() or PKG.joinpath(*parts).is_dir()):
            parts.pop()
        theirs = group_of(".".join(parts)) if parts else "base"
        if theirs == mine:
            continue
        if RANK[theirs] >= RANK[mine]:
            bad.append(f"{me}:{line} ({mine}) imports {target} ({theirs})")
    return bad


MODULES = sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_is_in_a_group() -> None:
    assert len(MODULES) > 30
    for p in MODULES:
        group_of(module_name(p))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_go_one_way(path: Path) -> None:
    assert violations(path) == []


def test_the_check_catches_a_wrong_way_import() -> None:
    """The rule itself: upward imports (also lazy and relative ones), backup <-> restore and the simulation."""
    fmt = PKG / "format" / "crypto.py"
    cases = {
        "from qubes_backup_dom0.qubes.interface import Qubes\n": "(format) imports qubes_backup_dom0.qubes",
        "from qubes_backup_dom0.cli import common\n": "(format) imports qubes_backup_dom0.cli.common (cli)",
        "def f():\n    from qubes_backup_dom0.restore.plan import RestorePlan\n": "(format) imports",
        "import qubes_backup_sim.launch\n": "imports the simulation",
        "from ..backup import plan\n": "(format) imports qubes_backup_dom0.backup.plan (backup)",
    }
    for source, expected in cases.items():
        found = violations(fmt, source)
        assert found and expected in found[0], (source, found)
    assert violations(fmt, "from qubes_backup_dom0.errors import BackupError\nfrom . import header\n") == []
    found = violations(PKG / "restore" / "apply.py", "from qubes_backup_dom0.backup import plan\n")
    assert found and "(restore) imports qubes_backup_dom0.backup.plan (backup)" in found[0]


def test_no_import_cycle_between_modules() -> None:
    """No two modules import each other, directly or through others (pools <-> thinmap was one)."""
    graph: dict[str, set[str]] = {}
    for p in MODULES:
        me = module_name(p)
        deps = set()
        for _, target in imported_modules(p):
            if target.startswith(NAME + "."):
                parts = target[len(NAME) + 1 :].split(".")
                while parts and not PKG.joinpath(*parts).with_suffix(".py").exists():
                    parts.pop()
                if parts and ".".join(parts) != me:
                    deps.add(".".join(parts))
        graph[me] = deps
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, set())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack, node, nxt]))
            if nxt not in state:
                visit(nxt, [*stack, node])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
