"""The codebase's shape, as the project keeps it: short modules and functions, imports that flow one way, exit
codes in one place."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "vaegan_dist"
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 350


def modules() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its own name, for its __init__)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that this one imports, anywhere in it (functions' bodies too): `from a.b import c`
    names a.b.c where that is a module, else a.b."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[:len(package.split(".")) - node.level + 1], *filter(None, [base])])
            targets |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
    return {target for target in targets if target in known and target != name}


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
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
            visit(node)
    return found


def test_no_import_circle_between_modules():
    graph = import_graph()
    graph.pop("vaegan_dist")  # its lazy VAEGAN attribute is what `from vaegan_dist import VAEGAN` asks for
    assert not cycles(graph), cycles(graph)


def test_subpackages_import_one_way():
    """Between the package's rooms (config, exits, model, data, checkpoint, evaluation, training, hub, cli), every
    import points one way: no two rooms import each other, however indirectly."""
    rooms: dict[str, set[str]] = {}
    for name, targets in import_graph().items():
        if name == "vaegan_dist":
            continue
        room = name.split(".")[1]
        rooms.setdefault(room, set()).update(t.split(".")[1] for t in targets if t.count(".") and
                                             t.split(".")[1] != room)
    assert not cycles(rooms), cycles(rooms)


def test_the_circle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_is_longer_than_350_lines():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, long


def test_no_function_is_longer_than_sixty_lines():
    long = [f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in modules().values() for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long


def test_exit_codes_are_defined_and_used_from_one_module():
    paths = modules().values()
    defined = [(path.name, match.group()) for path in paths
               for match in re.finditer(r"^EXIT_\w+ =", path.read_text(), re.MULTILINE)]
    assert {file for file, _ in defined} == {"exits.py"}, defined
    exits = [str(path.relative_to(PACKAGE)) for path in paths if "sys.exit(" in path.read_text()]
    assert set(exits) <= {"exits.py", "cli/train.py"}, exits  # the training command exits with the run's Ending
