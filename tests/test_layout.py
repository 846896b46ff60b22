"""The package's module graph: no import circles, and modules that stay apart stay apart.

Read from the source with :mod:`ast`, imports under ``if TYPE_CHECKING:`` and inside
functions included: a circle there is still two modules that each need the other to be
understood.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "trio_relay"


def _modules() -> dict[str, Path]:
    """Every module of the package, by dotted name relative to it (``_topics``,
    ``testing._relay``; ``__init__`` for the package itself)."""
    modules: dict[str, Path] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> dict[str, set[str]]:
    """The package's modules that ``name`` imports, each with the names taken from it."""
    package = [] if name == "__init__" else name.split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: dict[str, set[str]] = {}

    def add(module: list[str], names: set[str]) -> None:
        dotted = ".".join(module) or "__init__"
        if dotted in modules and dotted != name:
            found.setdefault(dotted, set()).update(names)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                head, *rest = alias.name.split(".")
                if head == "trio_relay":
                    add(rest, set())
        elif isinstance(node, ast.ImportFrom):
            parts = node.module.split(".") if node.module else []
            if node.level:
                module = [*package[: len(package) - node.level + 1], *parts]
            elif parts[0] == "trio_relay":
                module = parts[1:]
            else:
                continue
            for alias in node.names:
                if ".".join([*module, alias.name]) in modules:  # from . import _console
                    add([*module, alias.name], set())
                else:
                    add(module, {alias.name})
    return found


def _graph() -> dict[str, dict[str, set[str]]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _private_uses(path: Path) -> list[str]:
    """The ``something._name`` uses in ``path`` of private names that its own code does not
    define (as a function, a class, a class attribute or a ``self._name`` attribute)."""
    tree = ast.parse(path.read_text(), str(path))
    own = set(_NAMEDTUPLE_API)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            own.add(node.name)
        if isinstance(node, ast.ClassDef):
            for statement in node.body:
                targets = (
                    statement.targets
                    if isinstance(statement, ast.Assign)
                    else [statement.target]
                    if isinstance(statement, ast.AnnAssign)
                    else []
                )
                own.update(target.id for target in targets if isinstance(target, ast.Name))
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id == "self"
        ):
            own.add(node.attr)
    return [
        f"{path.relative_to(PACKAGE)}:{node.lineno}: {ast.unparse(node)}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and node.attr not in own
        and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
    ]


_NAMEDTUPLE_API = ("_asdict", "_fields", "_make", "_replace")


def _cycle(graph: dict[str, dict[str, set[str]]]) -> list[str] | None:
    """One import circle of ``graph`` (as a path that ends where it starts), or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        if name in path:
            return [*path[path.index(name) :], name]
        if name in done:
            return None
        path.append(name)
        for target in sorted(graph[name]):
            if (found := visit(target)) is not None:
                return found
        path.pop()
        done.add(name)
        return None

    for name in sorted(graph):
        if (found := visit(name)) is not None:
            return found
    return None


def test_the_graph_reader_sees_circles_and_all_kinds_of_import() -> None:
    assert _cycle({"a": {"b": set()}, "b": {"c": set()}, "c": {"a": set()}}) == [
        "a",
        "b",
        "c",
        "a",
    ]
    assert _cycle({"a": {"b": set()}, "b": {}, "c": {"a": set(), "b": set()}}) is None
    graph = _graph()
    assert set(graph["__init__"]) >= {"_server", "_topics", "_broadcast"}
    assert "_client" in graph["testing._relay"]  # from .._client import ...
    assert "testing._streams" in graph["testing._relay"]  # from ._streams import ...


def test_the_package_has_no_import_circle() -> None:
    assert _cycle(_graph()) is None


def test_counters_side_port_and_topics_depend_on_public_faces_only() -> None:
    graph = _graph()
    assert graph.get("_counters") == {}, "the counters import nothing from the package"
    apart = {"_server", "_connection"}  # the side port reads the relay through RelayView
    for name, avoided in [
        ("_view", apart),
        ("_sideport", apart),
        ("_metrics", apart),
        ("_console", apart),
        ("_topics", {"_backplane", "_server", "_connection"}),  # a Backplane is a Protocol
    ]:
        assert name in graph, name
        assert not avoided & set(graph[name]), f"{name} imports {avoided & set(graph[name])}"


def test_no_module_imports_another_modules_private_names() -> None:
    reach_ins = [
        f"{name} imports {private} from {target}"
        for name, targets in _graph().items()
        for target, names in targets.items()
        for private in sorted(names)
        if private.startswith("_") and not private.startswith("__")
    ]
    assert reach_ins == []


def test_no_module_uses_private_attributes_another_module_defines() -> None:
    assert [use for path in _modules().values() for use in _private_uses(path)] == []
