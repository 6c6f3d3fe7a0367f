"""The codebase's shape, as the project keeps it: functions short enough to read whole, exit codes in one place."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "vaegan_dist"
MAX_FUNCTION_LINES = 60


def functions():
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                yield path.name, node


def test_no_function_is_longer_than_sixty_lines():
    long = [f"{file}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for file, node in functions() if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long


def test_exit_codes_are_defined_and_used_from_one_module():
    defined = [(path.name, match.group()) for path in PACKAGE.glob("*.py")
               for match in re.finditer(r"^EXIT_\w+ =", path.read_text(), re.MULTILINE)]
    assert {file for file, _ in defined} == {"exits.py"}, defined
    exits = [path.name for path in PACKAGE.glob("*.py") if "sys.exit(" in path.read_text()]
    assert set(exits) <= {"exits.py", "train.py"}, exits  # train.main exits with the run's Ending
