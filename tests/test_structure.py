"""The shape of the package, checked: what a newcomer relies on when reading or changing it.

- No import circle between the package's modules (lazy imports count too: a circle broken by a
  lazy import is still a circle).
- The pure core imports nothing that touches the system, so it can be reasoned about and
  property-tested without a node.
- `Daemon` stays wiring (about 250 lines); its decisions live in the core.
- Tests drive `Daemon` through its public surface, never through its private attributes.

Read from the source with ``ast``: importing the modules would prove nothing about lazy imports.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "daemon" / "calico_mount_reaper"
PREFIX = "calico_mount_reaper"

# Pure functions over plain data: parsing, matching, verdicts, plan, timers, schedule, naming.
CORE = frozenset(
    {"model", "mountinfo", "targets", "plan", "grace", "schedule", "stopping", "unitname"}
)
# Standard modules that reach the system (files, processes, sockets, syscalls).
SYSTEM = frozenset(
    {"os", "io", "socket", "select", "selectors", "subprocess", "ctypes", "signal", "pathlib"}
    | {"shutil", "tempfile", "time", "fcntl", "mmap", "threading", "multiprocessing"}
)
# The mountinfo parser still holds the two functions that read a mountinfo file (`read`,
# `read_all`, with ``io``); everything else in it is text to data.
SYSTEM_ALLOWED = {"mountinfo": frozenset({"io"})}
DAEMON_CLASS_MAX_LINES = 260


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return ".".join(rel.parts)


def modules() -> dict[str, ast.Module]:
    return {
        module_name(p): ast.parse(p.read_text(), str(p))
        for p in sorted(PACKAGE.rglob("*.py"))
        if p.name != "__init__.py"
    }


def _type_checking_blocks(tree: ast.Module) -> set[int]:
    """Line numbers inside ``if TYPE_CHECKING:`` blocks (imports for annotations only)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                lines.update(range(inner.lineno, (inner.end_lineno or inner.lineno) + 1))
    return lines


def imports(tree: ast.Module) -> Iterator[str]:
    """Every module imported at runtime, anywhere in the file (absolute names)."""
    typing_only = _type_checking_blocks(tree)
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in typing_only:
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            if node.module == PREFIX:  # from calico_mount_reaper import journal
                yield from (f"{PREFIX}.{alias.name}" for alias in node.names)


def internal_graph() -> dict[str, set[str]]:
    trees = modules()
    graph: dict[str, set[str]] = {}
    for name, tree in trees.items():
        targets = {i[len(PREFIX) + 1 :] for i in imports(tree) if i.startswith(PREFIX + ".")}
        graph[name] = {t for t in targets if t in trees} - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the list of modules around it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_in_the_package() -> None:
    cycle = find_cycle(internal_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_core_imports_nothing_that_touches_the_system() -> None:
    trees = modules()
    graph = internal_graph()
    assert set(trees) >= CORE, CORE - set(trees)
    for name in sorted(CORE):
        outside = graph[name] - CORE
        assert not outside, f"core module {name} imports the shell: {sorted(outside)}"
        stdlib = {i.split(".")[0] for i in imports(trees[name]) if not i.startswith(PREFIX)}
        system = stdlib & SYSTEM - SYSTEM_ALLOWED.get(name, frozenset())
        assert not system, f"core module {name} imports {sorted(system)}"


def test_the_daemon_class_is_wiring_sized() -> None:
    tree = modules()["daemon"]
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Daemon")
    length = (cls.end_lineno or cls.lineno) - cls.lineno + 1
    assert length <= DAEMON_CLASS_MAX_LINES, f"Daemon is {length} lines"


def test_no_test_touches_a_private_attribute_of_the_daemon() -> None:
    offenders = []
    for path in sorted((REPO / "tests").rglob("*.py")) + sorted((REPO / "bench").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        daemons = {
            target.id
            for node in ast.walk(tree)
            if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and ast.unparse(node.value.func).split(".")[-1] == "Daemon"
            for target in node.targets
            if isinstance(target, ast.Name)
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in daemons
                and node.attr.startswith("_")
            ):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {ast.unparse(node)}")
    assert not offenders, offenders
