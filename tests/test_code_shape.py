"""The shape of the library's code, kept by a test: short functions, few positional parameters
(docs/ARCHITECTURE.md, "Conventions")."""
import ast
from pathlib import Path

import inrank_fx

PACKAGE = Path(inrank_fx.__file__).parent
MAX_LINES = 50  # lines of code in a function, docstring, comments and blank lines aside
MAX_POSITIONAL = 6  # self / cls aside
# Signatures torch dictates: a drop-in module's forward, nn.Module's state-dict hook.
DICTATED = {"forward", "_load_from_state_dict"}


def _functions():
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}", node, lines


def _code_lines(node, lines) -> int:
    numbers = set(range(node.lineno, node.end_lineno + 1))
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
            and isinstance(first.value.value, str):
        numbers -= set(range(first.lineno, first.end_lineno + 1))
    return sum(1 for n in numbers if lines[n - 1].strip() and
               not lines[n - 1].strip().startswith("#"))


def test_no_function_is_longer_than_50_lines_of_code():
    long = {where: n for where, node, lines in _functions()
            if (n := _code_lines(node, lines)) > MAX_LINES}
    assert not long, f"functions over {MAX_LINES} lines of code: {long}"


def test_no_function_takes_more_than_6_positional_parameters():
    def positional(node):
        return [a.arg for a in node.args.posonlyargs + node.args.args
                if a.arg not in ("self", "cls")]

    many = {where: len(positional(node)) for where, node, _ in _functions()
            if len(positional(node)) > MAX_POSITIONAL and node.name not in DICTATED}
    assert not many, f"functions with more than {MAX_POSITIONAL} positional parameters: {many}"
